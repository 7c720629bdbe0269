"""Dashboard and API with 10,000 images in the database.

    .venv/bin/python -m bench.dashboard [--images 10000 --clients 20 --requests 25]

1. The review page (pages/review.py) rendered by Streamlit's AppTest for a
   signed-in curator, showing 48 thumbnails: first render (thumbnails made
   and cached on disk) and later renders (cached thumbnails), and the core
   query and thumbnail path alone.
2. `GET /api/models/latest/` and `/api/models/training-status/{job_id}/`
   under concurrent clients (one keep-alive connection each), against the
   server started as `python -m cli serve`.
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.api_load import load
from bench.common import ROOT, fresh_data_dir, load_average, percentile, stop, wait_until


def seed(n_images: int) -> tuple[str, str]:
    """n_images rows (100 real files, reused), a production version and a
    completed round; returns (token header value, job id)."""
    from sqlmodel import select

    from core.access import CLI_ACTOR
    from core.db import session_scope
    from core.demo import load_demo_dataset
    from core.models import EpochMetric, ImageStatus, RoundStatus, TrainingImage, TrainingRound
    from core.tokens import create_token
    from tests.factories import add_fake_version

    with session_scope() as session:
        load_demo_dataset(session=session, per_category=20, size=96, status=ImageStatus.pending)
    with session_scope() as session:
        real = session.exec(select(TrainingImage)).all()
        rows = [
            {
                **real[i % len(real)].model_dump(exclude={"id"}),
                "sha256": f"{i:064x}",
                "status": ImageStatus.pending if i % 3 else ImageStatus.validated,
            }
            for i in range(n_images - len(real))
        ]
        session.bulk_insert_mappings(TrainingImage, rows)
    with session_scope() as session:
        version = add_fake_version(session, "1.0.0")
        round_ = TrainingRound(
            parameters={"epochs": 20},
            status=RoundStatus.completed,
            total_images=n_images,
            model_version_id=version.id,
            snapshot=[],
            classes=["cat", "dog"],
        )
        session.add(round_)
        session.flush()
        for epoch in range(1, 21):
            session.add(EpochMetric(round_id=round_.id, epoch=epoch, train_loss=1, train_accuracy=50, val_loss=1,
                                    val_accuracy=50, learning_rate=0.001, seconds=1.0))  # fmt: skip
        token = create_token(session=session, actor=CLI_ACTOR, role="viewer", label="bench").secret
        job_id = round_.job_id
    return f"Bearer {token}", job_id


def review_page() -> float:
    from PIL import Image
    from sqlmodel import col, select

    from core import review
    from core.db import read_session
    from core.images import load_rgb
    from core.ingest import image_path
    from core.models import Category, ImageStatus, TrainingImage

    started = time.perf_counter()
    with read_session() as session:
        rows = session.exec(
            select(TrainingImage, Category.name)
            .join(Category)
            .where(TrainingImage.status == ImageStatus.pending)
            .order_by(col(TrainingImage.id).desc())
            .limit(48)
        ).all()
        review.status_counts(session=session)
    for image, _ in rows:
        thumb = load_rgb(image_path(image))
        thumb.thumbnail((128, 128), Image.Resampling.BILINEAR)
        thumb.save(io.BytesIO(), format="JPEG", quality=80)
    assert len(rows) == 48
    return time.perf_counter() - started


def render_review_page(renders: int = 3) -> list[float]:
    """Seconds per AppTest run of pages/review.py, 48 thumbnails a page."""
    from streamlit.testing.v1 import AppTest

    from core.db import session_scope
    from tests.factories import add_user, sign_in

    with session_scope() as session:
        curator = add_user(session, "bench-curator", "curator")
    times = []
    for _ in range(renders):
        at = AppTest.from_file(str(ROOT / "pages" / "review.py"), default_timeout=120)
        sign_in(at, curator)
        started = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - started)
        assert not at.exception, at.exception
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    data_dir = fresh_data_dir("dashboard")
    auth, job_id = seed(args.images)
    review_page()  # first call: imports
    renders = [review_page() for _ in range(5)]
    print(
        f"review page work (query + 48 thumbnails) of {args.images} images: median "
        f"{statistics.median(renders) * 1000:.0f} ms, max {max(renders) * 1000:.0f} ms; load average {load_average():.2f}"
    )
    first, *later = render_review_page(renders=4)
    print(
        f"review page rendered by AppTest, 48 thumbnails of {args.images} images: first {first:.2f} s "
        f"(thumbnails made), then median {statistics.median(later):.2f} s; load average {load_average():.2f}"
    )

    env = {**os.environ, "DATA_DIR": str(data_dir), "PORT": str(args.port)}
    with open(data_dir / "serve.log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(args.port)], cwd=ROOT,
                                  env=env, stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{base}/api/health/", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 120, 0.5)
        for name, path in (
            ("latest", "/api/models/latest/"),
            ("training-status", f"/api/models/training-status/{job_id}/"),
        ):
            load(args.port, path, auth, 2, 3)  # warm-up
            times, _ = load(args.port, path, auth, args.clients, args.requests)
            print(
                f"GET {name}: {args.clients} clients x {args.requests}: p50 {percentile(times, 50) * 1000:.1f} ms, "
                f"p95 {percentile(times, 95) * 1000:.1f} ms; load average {load_average():.2f}"
            )
    finally:
        os.killpg(server.pid, 15)
        stop(server)


if __name__ == "__main__":
    main()
