"""Command line: `python -m cli COMMAND`. Everything the dashboard does, headless.

This is an edge like the pages and the API: it imports `jobs` (and so Huey)
for the commands that touch the queue; the core library itself never does.
`python -m core COMMAND`, the name it had when it lived in `core`, still works.
The commands are grouped by what they act on: `cli/images.py` (the dataset),
`cli/training.py` (jobs and versions), `cli/admin.py` (tokens, users, serving).
"""

import argparse
import logging
import sys

from cli import admin, images, training
from core.config import get_settings
from core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cli", description="Training dashboard, from the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (images, training, admin):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
