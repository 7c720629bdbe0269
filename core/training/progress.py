"""What a running round leaves behind as it goes: progress, phases and
history lines on its row (`RoundReporter`), a heartbeat (`Heartbeat`), and
its files on disk (`round_dir`, `save_checkpoint`).
"""

import logging
import shutil
import threading
import time
from pathlib import Path

import torch
from sqlmodel import Session, select, update

from core.config import get_settings
from core.db import read_engine
from core.errors import TrainingCancelled
from core.models import EpochMetric, RoundStatus, TrainingRound, utcnow
from core.storage import commit_temp, temp_path_for

log = logging.getLogger(__name__)


def history_line(text: str) -> str:
    """A line of a round's history, stamped with the time (UTC)."""
    return f"{utcnow():%Y-%m-%d %H:%M:%S}Z {text}"


def finish(round_: TrainingRound, status: RoundStatus, note: str) -> None:
    """End a round with `status` (not `completed`: see `register`), noting why; its files go."""
    round_.status = status
    round_.phases = enter_phase(round_.phases, None)
    round_.finished_at = utcnow()
    round_.history = [*round_.history, history_line(note)]
    shutil.rmtree(round_dir(round_), ignore_errors=True)


def round_dir(round_: TrainingRound) -> Path:
    return get_settings().rounds_dir / round_.job_id


class RoundReporter:
    """Writes progress and epoch rows; notices cancellation between batches."""

    def __init__(self, round_: TrainingRound, session: Session, min_interval: float = 1.0):
        self.round = round_
        self.session = session
        self.min_interval = min_interval
        self._last = 0.0
        # Cancel checks read through their own deferred transactions, so the
        # per-batch check never holds the database's write lock.
        self._reader = read_engine(str(session.get_bind().url))
        self._requests: tuple[bool, bool] | None = None
        self._requests_at = 0.0

    def requests(self, max_age: float = 0.0) -> tuple[bool, bool]:
        """Whether someone asked to cancel, and to stop keeping the best epoch;
        the answer read less than `max_age` seconds ago when there is one
        (a read takes about 1.4 ms: every batch, that was 0.9 % of a round's
        time on this 2-core machine)."""
        now = time.monotonic()
        if self._requests is None or now - self._requests_at >= max_age:
            query = select(TrainingRound.cancel_requested, TrainingRound.stop_requested).where(
                TrainingRound.id == self.round.id
            )
            with Session(self._reader) as reader:
                self._requests = tuple(reader.exec(query).one())
            self._requests_at = now
        return self._requests

    def cancel_requested(self) -> bool:
        return self.requests()[0]

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise TrainingCancelled()

    def batch(self, epoch: int, batch: int, total_batches: int, epochs: int) -> None:
        """Progress (at most every `min_interval` seconds); the loop checks for a cancel."""
        now = time.monotonic()
        if now - self._last >= self.min_interval or batch == total_batches:
            self._last = now
            self.round.current_epoch = epoch
            self.round.current_batch = batch
            self.round.total_batches = total_batches
            self.round.progress = ((epoch - 1) + batch / total_batches) / epochs
            self.session.add(self.round)
            self.session.commit()

    def epoch(self, metric: EpochMetric) -> None:
        self.session.add(metric)
        self.session.add(self.round)
        self.session.commit()

    def phase(self, name: str) -> None:
        """The job enters phase `name` (one of PHASES); the one running ends."""
        self.round.phases = enter_phase(self.round.phases, name)
        self.session.add(self.round)
        self.session.commit()

    def note(self, text: str, warning: bool = False) -> None:
        self.round.history = [*self.round.history, history_line(text)]
        if warning:
            self.round.warnings = [*self.round.warnings, text]
        self.session.add(self.round)
        self.session.commit()


class SilentReporter(RoundReporter):
    """The reporter of ranks other than 0: they never write, and follow rank 0's cancel decision."""

    def __init__(self, round_: TrainingRound):
        self.round = round_

    def requests(self, max_age: float = 0.0) -> tuple[bool, bool]:
        return False, False

    def batch(self, epoch: int, batch: int, total_batches: int, epochs: int) -> None:
        pass

    def epoch(self, metric: EpochMetric) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def note(self, text: str, warning: bool = False) -> None:
        pass


def enter_phase(phases: list, name: str | None) -> list:
    """`phases` with the running one ended now and, given a `name`, that one begun."""
    now = utcnow().isoformat()
    out = [dict(p) for p in phases]
    if out and out[-1]["ended_at"] is None:
        out[-1]["ended_at"] = now
    if name is not None:
        out.append({"name": name, "started_at": now, "ended_at": None})
    return out


class Heartbeat:
    """Stamps `heartbeat_at` every few seconds from a thread while a job runs,
    including long steps without batches (loading images, exporting)."""

    def __init__(self, round_id: int, engine, interval: float):
        self.round_id, self.engine, self.interval = round_id, engine, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{round_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with Session(self.engine) as session:
                    session.exec(
                        update(TrainingRound).where(TrainingRound.id == self.round_id).values(heartbeat_at=utcnow())
                    )
                    session.commit()
            except Exception:  # a missed beat is retried at the next interval
                log.exception("heartbeat for round %s failed", self.round_id)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def save_checkpoint(path: Path, payload: dict) -> None:
    """`payload` saved to `path` atomically (a crash leaves the previous file)."""
    tmp = temp_path_for(path)
    try:
        torch.save(payload, tmp)
        commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
