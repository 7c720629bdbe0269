"""Running a consumer with this product's settings (`python -m cli worker`)."""

import logging
import threading
import time

from core import registry
from core.config import get_settings
from core.db import session_scope
from core.ingest import remove_orphan_images
from core.training.register import finish_interrupted_exports
from core.training.rounds import active_rounds
from jobs.queue import enqueue_missing_rounds, huey, requeue_stale_rounds

log = logging.getLogger(__name__)


def run_worker(workers: int = 1) -> None:
    """Consume training jobs until interrupted. One job at a time per worker."""
    settings = get_settings()
    _recover()
    with session_scope() as session:
        # Files of a job that is exporting right now look like orphans too.
        busy = active_rounds(session=session) > 0
        removed = [] if busy else registry.cleanup_orphan_files(session=session)
    for path in removed:
        log.warning("removed %s: no model version refers to it (left by an interrupted job)", path)
    poll = settings.queue_poll_interval
    # A fixed, short poll interval (no back-off) so an idle consumer picks a
    # new job up within `poll` seconds.
    consumer = huey.create_consumer(workers=workers, initial_delay=poll, backoff=1.0, max_delay=poll, periodic=True)
    threading.Thread(target=_watch_for_lost_jobs, name="recovery", daemon=True).start()
    log.info(
        "worker consuming %s (poll %.2fs, data in %s)",
        settings.queue_url or settings.queue_path,
        poll,
        settings.data_dir,
    )
    consumer.run()


def _recover() -> None:
    """Re-enqueue jobs whose worker died and queued jobs the queue does not
    hold; add the phone files a job that died after committing its version
    had not added yet; remove image files an interrupted upload left without
    a row."""
    requeue_stale_rounds()
    enqueue_missing_rounds()
    with session_scope() as session:
        finish_interrupted_exports(session=session)
    with session_scope() as session:
        removed = remove_orphan_images(session=session)
    for path in removed:
        log.warning("removed %s: no image refers to it (left by an interrupted upload)", path)


def _watch_for_lost_jobs() -> None:
    """Periodically recover lost jobs (on this machine or another)."""
    interval = max(1.0, get_settings().heartbeat_timeout / 2)
    while True:
        time.sleep(interval)
        try:
            _recover()
        except Exception:  # the database or queue may be briefly unreachable; try again later
            log.exception("checking for lost jobs failed")
