"""In-process Celery worker and beat for the embedded mode (no Redis): jobs stay asynchronous.

The broker is kombu's `memory://` transport, which is shared by every thread of this process.
The ASGI lifespan (see asgi.py) starts a worker (thread pool) and an embedded beat on startup and
stops them on shutdown. Tasks queued by requests run on the worker's threads, not in the request.
"""

from __future__ import annotations

import logging
import threading

from celery.beat import EmbeddedService
from celery.result import _set_task_join_will_block

logger = logging.getLogger(__name__)


class EmbeddedJobs:
    """A Celery worker and beat running in daemon threads of the current process."""

    def __init__(self, app, *, concurrency: int = 2):
        self.app = app
        self.concurrency = concurrency
        self.worker = None
        self.beat = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        ready = threading.Event()
        app = self.app

        from celery.worker import WorkController

        class _Worker(WorkController):
            def on_consumer_ready(self, consumer):
                ready.set()

        self.worker = _Worker(
            app=app,
            pool="threads",
            concurrency=self.concurrency,
            hostname=f"embedded@{threading.get_native_id()}",
            loglevel="INFO",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._thread = threading.Thread(target=self.worker.start, name="celery-embedded", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"embedded Celery worker did not start within {timeout_s} s")
        # Starting a worker marks the whole process as "inside a worker", which forbids
        # AsyncResult.get(); request threads here are not tasks (Celery's own in-process test
        # worker resets the flag the same way).
        _set_task_join_will_block(False)
        self.beat = EmbeddedService(app, thread=True)
        self.beat.start()
        logger.info("embedded jobs: Celery worker (%d threads) and beat running in-process", self.concurrency)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.beat is not None:
            self.beat.stop()
        if self.worker is not None:
            self.worker.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(timeout_s)
