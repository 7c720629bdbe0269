"""Ingest: images per second for a folder import (hash, full decode check,
content-addressed store, database row).

    .venv/bin/python -m bench.ingest [--images 1000 --size 128]
"""

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import fresh_data_dir, load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    fresh_data_dir("ingest")
    from core.db import session_scope
    from core.demo import generate_demo_folder
    from core.ingest import import_folder

    folder = generate_demo_folder(
        Path(tempfile.mkdtemp(prefix="bench-folder-")), per_category=args.images // 5, size=args.size
    )
    print(f"load average {load_average():.2f}")
    started = time.perf_counter()
    with session_scope() as session:
        report = import_folder(folder, session=session, parallel=True)
    seconds = time.perf_counter() - started
    print(
        f"{report.summary()} in {seconds:.2f} s: {report.count('stored') / seconds:.0f} images/s; load average {load_average():.2f}"
    )


if __name__ == "__main__":
    main()
