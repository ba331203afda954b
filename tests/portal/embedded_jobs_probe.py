"""Run by test_embedded_jobs.py in a fresh interpreter: the embedded mode starts one worker per
process (the ASGI lifespan's), so the probe gets a process of its own rather than one that a
whole test session's threads and Celery state have passed through.

Prints one JSON line: the order in which the jobs finished and whether they ran on the caller's
thread, and whether the slow job was still running when queueing returned (queueing must not wait).
"""

from __future__ import annotations

import json
import queue
import sys
import tempfile
import threading
from pathlib import Path

from celery import Celery

from datacenter.embedded import EmbeddedJobs


def main() -> int:
    app = Celery("embedded-probe", broker="memory://", backend="cache+memory://")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        beat_schedule_filename=str(Path(tempfile.mkdtemp()) / "beat-schedule"),
    )
    release = threading.Event()
    done: queue.Queue = queue.Queue()

    slow_finished = threading.Event()

    @app.task(name="embedded_probe.report_thread", ignore_result=True)
    def report_thread(label: str, wait_s: float = 0.0) -> None:
        if wait_s:
            release.wait(wait_s)
        if label == "slow":
            slow_finished.set()
        done.put((label, threading.get_ident()))

    jobs = EmbeddedJobs(app, concurrency=2)
    jobs.start(timeout_s=20)
    caller = threading.get_ident()
    finished = []
    slow_done_when_queued = None
    try:
        # The slow job holds a worker thread until released (the 300 s is only a safety net):
        # if queueing ran it inline, it would have finished before delay() returned.
        report_thread.delay("slow", 300.0)
        report_thread.delay("fast")
        slow_done_when_queued = slow_finished.is_set()
        label, thread = done.get(timeout=120)
        finished.append({"label": label, "on_caller_thread": thread == caller})
        release.set()
        label, thread = done.get(timeout=120)
        finished.append({"label": label, "on_caller_thread": thread == caller})
    except queue.Empty:
        pass
    finally:
        release.set()
        jobs.stop(timeout_s=10)
    print(json.dumps({"slow_done_when_queued": slow_done_when_queued, "finished": finished}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
