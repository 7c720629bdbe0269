"""The fleet's scale: N pictures, 100 versions, 1,000 rounds and their audit
trail, then each page's first render and the API under load.

    .venv/bin/python -m bench.scale [--n 200000 --chunks 10 --size 32]

1. Draws N small pictures (the demo's shapes, `--size` px) in `--chunks`
   folders and imports each with `core.ingest.import_folder` (the command
   line's `python -m core import`): images/s per chunk, so a rate that falls
   as the database grows shows, and over all.
2. Writes 100 versions (realistic metrics: confusion matrix, misclassified
   validation images, test counts), 1,000 finished rounds (the 5 newest with
   a snapshot of every image, as a round of this dataset has; older ones of
   1,000) and an audit trail (a review of every other image, the trainings
   and promotions) straight into the database.
3. The first render (`AppTest.run()` on the real page, signed in as an
   admin) of the review page, Overview, Models and the audit page, each
   from a new AppTest; the review page makes its 48 thumbnails.
4. The API under load (bench/api_load.py) against `python -m core serve`
   on this data folder.
"""

import argparse
import random
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bench.api_load import Served, measure, show
from bench.common import ROOT, fresh_data_dir, load_average

PAGES = ("review", "overview", "models", "audit")
CLASSES = ["circle", "square", "triangle", "cross", "ring"]


def import_pictures(n: int, chunks: int, size: int) -> list[tuple[int, float]]:
    """(images stored, seconds) per chunk of n/chunks pictures. Each chunk
    also says its images per CPU second of this process: what one free core
    would sustain, whatever else runs on the machine (the files' fsync is
    I/O, not CPU, and is left out of that figure)."""
    from core.db import session_scope
    from core.demo import generate_demo_folder
    from core.ingest import import_folder

    per_chunk = n // chunks
    figures = []
    for chunk in range(chunks):
        folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        generate_demo_folder(folder, per_category=per_chunk // len(CLASSES), size=size, seed=chunk)
        started, cpu = time.perf_counter(), time.process_time()
        with session_scope() as session:
            report = import_folder(folder, session=session, parallel=True)
        seconds = time.perf_counter() - started
        shutil.rmtree(folder)
        cpu = time.process_time() - cpu
        figures.append((report.count("stored"), seconds))
        print(
            f"  chunk {chunk + 1}/{chunks}: {report.summary()} in {seconds:.1f} s, "
            f"{report.count('stored') / seconds:.0f} images/s ({report.count('stored') / cpu:.0f} per CPU second); "
            f"load average {load_average():.2f}",
            flush=True,
        )
    return figures


def _metrics(rng: random.Random, val: int, test: int) -> dict:
    matrix = [[rng.randint(0, val // 25) for _ in CLASSES] for _ in CLASSES]
    correct = round(test * rng.uniform(0.7, 0.95))
    return {
        "train_accuracy": round(rng.uniform(85, 99), 2),
        "val_accuracy": round(rng.uniform(70, 95), 2),
        "best_epoch": 10,
        "epochs_trained": 12,
        "train_images": val * 8,
        "val_images": val,
        "per_class_accuracy": {name: round(rng.uniform(60, 99), 2) for name in CLASSES},
        "confusion_matrix": matrix,
        "misclassified": [
            {"id": rng.randint(1, 10**6), "label": rng.choice(CLASSES), "predicted": rng.choice(CLASSES)}
            for _ in range(val // 10)
        ],
        "test_accuracy": round(100 * correct / test, 2),
        "test_per_class_accuracy": {name: round(rng.uniform(60, 99), 2) for name in CLASSES},
        "test_images": test,
        "test_correct": correct,
        "test_majority": test // 4,
        "test_per_class_images": {name: test // len(CLASSES) for name in CLASSES},
        "model_size_mb": 6.1,
    }


def write_history(n_versions: int, n_rounds: int) -> tuple[str, str]:
    """Versions, rounds and audit rows straight into the database; returns
    (an Authorization header of a viewer token, a completed round's job id)."""
    from sqlmodel import select

    from core.access import CLI_ACTOR
    from core.db import session_scope
    from core.models import (
        AuditEvent,
        Category,
        ModelVersion,
        PromotionEvent,
        RoundStatus,
        TrainingImage,
        TrainingRound,
        utcnow,
    )
    from core.tokens import create_token
    from tests.factories import add_fake_version

    rng = random.Random(0)
    with session_scope() as session:
        images = session.exec(select(TrainingImage.id, TrainingImage.sha256, Category.name).join(Category)).all()
    full = [{"id": i, "sha256": sha, "label": label} for i, sha, label in images]
    val, test = len(images) // 10, len(images) // 10
    now = utcnow()
    with session_scope() as session:
        rounds = []
        for r in range(n_rounds):
            newest = r >= n_rounds - 5
            snapshot = full if newest else full[:1000]
            started = now - timedelta(hours=2 * (n_rounds - r))
            rounds.append(
                TrainingRound(
                    parameters={"epochs": 12, "batch_size": 32},
                    status=RoundStatus.completed if r % 10 else RoundStatus.failed,
                    created_at=started,
                    started_at=started,
                    finished_at=started + timedelta(minutes=20),
                    snapshot=snapshot,
                    snapshot_hash=f"{r:064x}",
                    total_images=len(snapshot),
                    category_distribution={name: len(snapshot) // len(CLASSES) for name in CLASSES},
                    classes=CLASSES,
                    progress=1.0,
                    error=None if r % 10 else "RuntimeError: out of memory",
                )
            )
        session.add_all(rounds)
        session.flush()
        completed = [r for r in rounds if r.status == RoundStatus.completed][-n_versions:]
        for k, round_ in enumerate(completed):
            session.add(
                ModelVersion(
                    version=f"1.{k}.0",
                    major=1,
                    minor=k,
                    patch=0,
                    round_id=round_.id,
                    classes=CLASSES,
                    architecture="mobilenet_v3_small",
                    image_size=64,
                    checkpoint_path=f"checkpoints/model_1.{k}.0.pt",
                    metrics=_metrics(rng, val, test),
                    artifacts=[],
                    created_at=round_.finished_at,
                    gate={"passed": k % 3 != 0, "reasons": ["test accuracy 0.4 points above production"]},
                )
            )
            session.add(PromotionEvent(from_version=f"1.{k - 1}.0" if k else None, to_version=f"1.{k}.0",
                                       action="auto", by="auto", at=round_.finished_at))  # fmt: skip
        session.flush()
        session.add_all(
            AuditEvent(at=now - timedelta(seconds=i), actor=f"curator{i % 7}", actor_role="curator",
                       action="image.validate", target=f"image:{image_id}", before={"status": "pending"},
                       after={"status": "validated"})
            for i, (image_id, _, _) in enumerate(images[::2])
        )  # fmt: skip
        session.add_all(
            AuditEvent(at=r.created_at, actor="operator", actor_role="operator", action="training.start",
                       target=f"job:{r.job_id}")
            for r in rounds
        )  # fmt: skip
    with session_scope() as session:
        # The production model: a real version whose files exist, made by the newest completed round.
        production = add_fake_version(session, "2.0.0", classes=CLASSES)
        last = session.exec(select(TrainingRound).where(TrainingRound.status == RoundStatus.completed).order_by(
            TrainingRound.id.desc())).first()  # fmt: skip
        production.round_id, last.model_version_id = last.id, production.id
        session.add_all([production, last])
        token = create_token(session=session, actor=CLI_ACTOR, role="viewer", label="bench").secret
        return f"Bearer {token}", last.job_id


def first_renders() -> dict[str, tuple[float, float, float]]:
    """Seconds of `AppTest.run()` of each page, signed in as an admin: the
    first in this process (its imports: pandas, plotly, the page's modules;
    the review page's thumbnails made), and a new session's first render
    afterwards, as a user opening the page on a running server sees it,
    with the CPU seconds of that render (AppTest runs the page in this
    process): what it costs whatever else the machine is doing."""
    from streamlit.testing.v1 import AppTest

    from core.db import session_scope
    from tests.factories import add_user, sign_in

    with session_scope() as session:
        admin = add_user(session, f"bench-admin-{time.time_ns()}", "admin")
    times = {}
    for page in PAGES:
        runs = []
        for _ in range(2):
            at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=300)
            sign_in(at, admin)
            started, cpu = time.perf_counter(), time.process_time()
            at.run()
            runs.append(time.perf_counter() - started)
            assert not at.exception, at.exception
        times[page] = (*runs, time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="pictures to import")
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="picture side, px")
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="per client and route")
    parser.add_argument("--again", type=Path, help="measure steps 3 and 4 again on the data folder of an earlier run")
    parser.add_argument("--import-only", action="store_true", help="step 1 alone (the import's rate)")
    args = parser.parse_args()
    if args.again:
        measure_again(args.again, args)
        return
    data_dir = fresh_data_dir("scale")
    print(f"data folder {data_dir}; load average {load_average():.2f}", flush=True)
    figures = import_pictures(args.n, args.chunks, args.size)
    stored, seconds = sum(n for n, _ in figures), sum(s for _, s in figures)
    rates = [n / s for n, s in figures]
    print(
        f"import: {stored} images in {seconds:.0f} s, {stored / seconds:.0f} images/s over all; "
        f"per chunk {min(rates):.0f} to {max(rates):.0f}, last chunk {rates[-1]:.0f}",
        flush=True,
    )
    if args.import_only:
        return
    started = time.perf_counter()
    auth, job_id = write_history(args.versions, args.rounds)
    print(
        f"history: {args.versions} versions, {args.rounds} rounds, audit rows in {time.perf_counter() - started:.0f} s"
    )
    from sqlmodel import func, select

    from core.db import read_session
    from core.models import AuditEvent, TrainingImage

    with read_session() as session:
        counts = [session.exec(select(func.count(t.id))).one() for t in (TrainingImage, AuditEvent)]
    print(f"database: {counts[0]} images, {counts[1]} audit events")
    measure_pages_and_api(data_dir, auth, job_id, args)


def measure_pages_and_api(data_dir: Path, auth: str, job_id: str, args) -> None:
    for page, (cold, warm, cpu) in first_renders().items():
        print(
            f"{page} page: first render of a new session {warm:.2f} s, {cpu:.2f} CPU s "
            f"(the process's very first: {cold:.2f} s); load average {load_average():.2f}",
            flush=True,
        )
    served = Served(ROOT, data_dir=data_dir, seed=False)
    served.auth, served.job_id = auth, job_id
    with served:
        rows = measure(served, args.clients, args.requests)
    show("scale", rows, args.clients, args.requests)


def measure_again(data_dir: Path, args) -> None:
    import os

    from sqlmodel import col, select

    from core.access import CLI_ACTOR
    from core.config import get_settings
    from core.db import clear_engines, session_scope
    from core.models import TrainingRound
    from core.tokens import create_token

    os.environ["DATA_DIR"] = str(data_dir)
    get_settings.cache_clear()
    clear_engines()
    with session_scope() as session:
        auth = "Bearer " + create_token(session=session, actor=CLI_ACTOR, role="viewer", label="bench again").secret
        job_id = session.exec(
            select(TrainingRound.job_id).where(col(TrainingRound.model_version_id).is_not(None))
        ).first()
    measure_pages_and_api(data_dir, auth, job_id, args)


if __name__ == "__main__":
    main()
