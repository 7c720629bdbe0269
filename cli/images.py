"""Commands about the dataset: demo, import, listing, review, suspects, look-alikes, categories."""

from pathlib import Path

from sqlmodel import col, select

from core import duplicates, review, suspects, uploads
from core.access import CLI_ACTOR as WHO
from core.db import session_scope
from core.errors import UserError
from core.models import Category, ImageStatus, TrainingImage


def cmd_demo(args) -> int:
    status = ImageStatus.pending if args.pending else ImageStatus.validated
    with session_scope() as session:
        report = uploads.load_demo(
            session=session, actor=WHO, per_category=args.per_category, size=args.size, status=status
        )
    print(f"Demo dataset: {report.summary()} ({status.value}).")
    return 0


def cmd_import(args) -> int:
    status = ImageStatus.validated if args.validated else ImageStatus.pending
    with session_scope() as session:
        # On every core: `python -m cli` is a guarded main (core.ingest.checker).
        report = uploads.import_directory(Path(args.folder), session=session, actor=WHO, status=status, parallel=True)
    print(f"Imported from {args.folder}: {report.summary()} ({status.value}).")
    for result in report.refused:
        print(f"  refused {result.reason}")
    return 0


def cmd_images(args) -> int:
    with session_scope() as session:
        query = select(TrainingImage, Category.name).join(Category).order_by(col(TrainingImage.id).desc())
        if args.status:
            query = query.where(TrainingImage.status == ImageStatus(args.status))
        rows = session.exec(query.limit(args.limit)).all()
        print(f"{'id':>6}  {'status':<10} {'category':<16} {'source':<7} {'size':>9}  file")
        for image, name in rows:
            size = f"{image.width}x{image.height}"
            print(
                f"{image.id:>6}  {image.status.value:<10} {name:<16} {image.source.value:<7} {size:>9}  {image.original_filename}"
            )
        counts = review.status_counts(session=session)
    print("Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_review(args) -> int:
    with session_scope() as session:
        if args.command == "relabel":
            n = review.relabel_images(args.ids, args.category, session=session, actor=WHO)
        else:
            status = {"validate": ImageStatus.validated, "reject": ImageStatus.rejected}[args.command]
            n = review.set_status(args.ids, status, session=session, actor=WHO)
    print(f"{args.command}: {n} image(s) updated.")
    return 0


def cmd_suspects(args) -> int:
    if args.action:
        if not args.ids:
            raise UserError(f"Name the images: python -m cli suspects {args.action} IMAGE_ID...")
        with session_scope() as session:
            done = [suspects.resolve(i, args.action, session=session, actor=WHO) for i in args.ids]
        for row in done:
            print(f"image {row.image_id}: {row.resolution} ({row.given_label} -> {row.suggested_label})")
        return 0
    with session_scope() as session:
        rows = suspects.list_suspects(session=session, limit=args.limit, include_resolved=args.all)
        total = suspects.count_suspects(session=session, include_resolved=args.all)
    if not rows:
        print("No suspected mislabels: they are scored after each completed training round.")
        return 0
    print(f"{'id':>6}  {'given -> suggested':<28} {'p(given)':>8} {'margin':>7}  {'version':<8} {'decision':<9} file")
    for s in rows:
        change = f"{s.row.given_label} -> {s.row.suggested_label}"
        print(
            f"{s.image.id:>6}  {change:<28} {s.row.given_probability:>8.3f} {s.row.margin:>7.3f}  "
            f"{s.row.model_version:<8} {s.row.resolution or 'open':<9} {s.image.original_filename}"
        )
    print(f"{len(rows)} of {total} shown, most likely mislabelled first.")
    return 0


def cmd_duplicates(args) -> int:
    if args.validate or args.reject:
        return _act_on_cluster(args)
    with session_scope() as session:
        groups = duplicates.clusters(session=session)
        if not groups:
            print("No look-alikes among the images that are not rejected.")
            return 0
        for n, ids in enumerate(groups, start=1):
            print(f"cluster {n}: {len(ids)} images")
            for image, name in duplicates.labelled_images(ids, session=session):
                print(f"  {image.id:>6}  {image.status.value:<10} {name:<16} {image.original_filename}")
    sizes = ", ".join(str(len(ids)) for ids in groups)
    print(
        f"{len(groups)} cluster(s) of {sizes} images; act on one with `python -m cli duplicates --validate|--reject N`."
    )
    return 0


def _act_on_cluster(args) -> int:
    action, number = ("validate", args.validate) if args.validate else ("reject", args.reject)
    with session_scope() as session:
        groups = duplicates.clusters(session=session)
        if not 1 <= number <= len(groups):
            raise UserError(f"There is no cluster {number}: `python -m cli duplicates` lists {len(groups)}")
        ids = groups[number - 1]
        question = review.confirmation(action, len(ids))
        if question and args.yes != len(ids):
            answer = input(f"{question} Type {len(ids)} to confirm: ").strip()
            if answer != str(len(ids)):
                print(f"Nothing changed (cluster {number} has {len(ids)} images; --yes {len(ids)} confirms).")
                return 1
        status = ImageStatus.validated if action == "validate" else ImageStatus.rejected
        changed = review.set_status(ids, status, session=session, actor=WHO)
    print(f"{changed} image(s) of cluster {number} {status.value}.")
    return 0


def cmd_categories(args) -> int:
    with session_scope() as session:
        if args.add:
            review.add_category(args.add, session=session, actor=WHO)
        if args.rename:
            review.rename_category(args.rename[0], args.rename[1], session=session, actor=WHO)
        counts = review.validated_counts(session=session)
    for name, n in counts.items():
        print(f"{name:<20} {n:>6} validated")
    return 0


def add_commands(sub) -> None:
    """Register this group's commands on the `python -m cli` parser."""
    p = sub.add_parser("demo", help="load the demo dataset (5 categories x 60 drawn images, validated)")
    p.add_argument("--per-category", type=int, default=60)
    p.add_argument("--size", type=int, default=96, help="picture size in pixels (default 96)")
    p.add_argument("--pending", action="store_true", help="leave the images pending review")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import", help="import DIR/<category>/<image> files")
    p.add_argument("folder")
    p.add_argument("--validated", action="store_true", help="mark the images validated (default: pending)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("images", help="list images")
    p.add_argument("--status", choices=[s.value for s in ImageStatus])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_images)

    for name, text in (("validate", "mark images validated"), ("reject", "mark images rejected")):
        p = sub.add_parser(name, help=text)
        p.add_argument("ids", nargs="+", type=int)
        p.set_defaults(func=cmd_review)
    p = sub.add_parser("relabel", help="move images to another category")
    p.add_argument("ids", nargs="+", type=int)
    p.add_argument("--category", required=True)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser(
        "suspects",
        help="list suspected mislabels (most likely first), or accept|keep|reject them",
        description="Without an action: the open suspects, most likely mislabelled first "
        "(scored after each completed round). accept: move the image to the suggested category; "
        "keep: keep its label (it stays kept in later rounds); reject: reject the image.",
    )
    p.add_argument("action", nargs="?", choices=list(suspects.ACTIONS), help="decide about the images IMAGE_ID...")
    p.add_argument("ids", nargs="*", type=int, metavar="IMAGE_ID", help="images to decide about (with an action)")
    p.add_argument("--limit", type=int, default=50, help="rows to list (default 50)")
    p.add_argument("--all", action="store_true", help="list decided suspects too")
    p.set_defaults(func=cmd_suspects)
    p = sub.add_parser(
        "duplicates", help="list clusters of look-alike images (not rejected), largest first, or act on one"
    )
    p.set_defaults(func=cmd_duplicates)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--validate", type=int, metavar="N", help="validate every image of cluster N")
    group.add_argument("--reject", type=int, metavar="N", help="reject every image of cluster N")
    p.add_argument(
        "--yes", type=int, metavar="COUNT", help="confirm an action on more than 5 images by giving their count"
    )

    p = sub.add_parser("categories", help="list, add or rename categories")
    p.add_argument("--add", metavar="NAME")
    p.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"))
    p.set_defaults(func=cmd_categories)
