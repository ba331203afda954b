"""The embedded mode runs Celery tasks asynchronously in-process (memory:// broker, worker threads).

The tasks report through a thread-safe queue rather than a result backend, so the test does not
depend on which backend the surrounding settings configure (make test sets REDIS_URL).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import pytest
from celery import Celery

from datacenter.embedded import EmbeddedJobs


@pytest.fixture
def embedded(tmp_path):
    app = Celery("embedded-test", broker="memory://", backend="cache+memory://")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        beat_schedule_filename=str(tmp_path / "beat-schedule"),
        # kombu's memory:// broker is shared by the whole process: a queue of our own keeps any
        # other in-process worker of this test session from taking these jobs.
        task_default_queue=f"embedded-test-{uuid.uuid4().hex}",
    )
    release = threading.Event()
    done: queue.Queue = queue.Queue()

    @app.task(name="embedded_test.report_thread", ignore_result=True)
    def report_thread(label: str, wait_s: float = 0.0) -> None:
        if wait_s:
            release.wait(wait_s)
        done.put((label, threading.get_ident()))

    jobs = EmbeddedJobs(app, concurrency=2)
    jobs.start(timeout_s=20)
    try:
        yield report_thread, release, done
    finally:
        release.set()
        jobs.stop(timeout_s=10)


def test_tasks_run_on_worker_threads_not_in_the_caller(embedded):
    report_thread, release, done = embedded
    started = time.monotonic()
    report_thread.delay("slow", 10.0)  # holds one worker thread until released
    report_thread.delay("fast")
    assert time.monotonic() - started < 1.0, "queueing a job must not wait for it"
    label, thread = done.get(timeout=10)
    assert label == "fast", "the fast job finished while the slow one was still running"
    assert thread != threading.get_ident()
    release.set()
    label, thread = done.get(timeout=10)
    assert label == "slow"
    assert thread != threading.get_ident()
