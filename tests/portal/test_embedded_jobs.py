"""The embedded mode runs Celery tasks asynchronously in-process (memory:// broker, worker threads).

The scenario runs in a fresh interpreter (embedded_jobs_probe.py), as the embedded mode does in
production: one worker per process, started by the ASGI lifespan.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tasks_run_on_worker_threads_not_in_the_caller():
    probe = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("embedded_jobs_probe.py"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["slow_done_when_queued"] is False, "queueing a job must not wait for it"
    labels = [job["label"] for job in result["finished"]]
    assert labels == ["fast", "slow"], (
        f"the fast job must finish while the slow one still holds a worker thread; got {labels}\n"
        + probe.stderr[-2000:]
    )
    assert not any(job["on_caller_thread"] for job in result["finished"])
