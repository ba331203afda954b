"""Real services for integration tests: a Celery worker subprocess on Redis against the test database.

Use the session fixture `celery_worker` in tests marked `@pytest.mark.django_db(transaction=True)`
(the worker is another process: it only sees committed rows). Tasks sent from the test process go
to a queue unique to this session, so workers of other test sessions sharing the Redis never take
them. The worker is stopped by PID (TERM, then KILL) before the test database is dropped.

    def test_x(celery_worker):
        celery_worker.queue          # the queue name the test process now sends to
        wait_until(lambda: ..., timeout_s=30, what="assessment finished")
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.environment import need

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_READY_TIMEOUT_S = 180  # a worker importing Django on a loaded 2-core machine: a bound, not a goal


def wait_until(
    condition: Callable[[], Any],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test naming `what` on timeout
    (and what `detail()` says then: what was still missing, a log tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail else ""
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{more}")
        time.sleep(interval_s)


def wait_process_ready(
    ready: Callable[[], Any],
    process: subprocess.Popen,
    *,
    timeout_s: float,
    what: str,
    log: Callable[[], str],
) -> None:
    """Poll `ready()` until it holds; fail at once if the process exits first, and in either case
    say what its log ends with."""
    def check() -> Any:
        if ready():
            return True
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{log()[-3000:]}")
        return False

    wait_until(check, timeout_s=timeout_s, what=what, interval_s=0.05, detail=lambda: log()[-3000:])


def migrations_digest() -> hashlib._Hash:
    """A digest of every migration a migrated database depends on: the project's migration files
    (the portal's apps and P2V's) and Django's version (its contrib apps' migrations; no other
    installed app has any). Keys caches of migrated databases: a changed migration makes a new one."""
    import django

    digest = hashlib.sha256(f"django=={django.__version__}".encode())
    for path in sorted(REPO_ROOT.glob("datacenter/**/migrations/*.py")) + sorted(
        REPO_ROOT.glob("p2v/**/migrations/*.py")
    ):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest


def redis_answers(url: str | None) -> bool:
    if not url:
        return False
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclasses.dataclass
class CeleryWorker:
    pid: int
    queue: str
    nodename: str
    logfile: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15) -> None:
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)  # warm shutdown: finish the running task
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def database_url_for_test_db() -> str:
    """DATABASE_URL pointing at the database pytest-django created (call after django_db_setup)."""
    from django.db import connection

    settings_dict = connection.settings_dict
    url = os.environ.get("DATABASE_URL", "")
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + settings_dict["NAME"], parts.query, parts.fragment))


def start_celery_worker(
    workdir: Path, *, concurrency: int = 2, extra_env: dict | None = None
) -> CeleryWorker:
    """Start `celery worker` (threads pool) on its own queue with the test database; wait until ready."""
    from django.conf import settings

    from datacenter.celery import app

    tag = secrets.token_hex(4)
    queue = f"dctest-{os.getpid()}-{tag}"
    nodename = f"dctest-{tag}@{socket.gethostname()}"
    logfile = workdir / f"celery-{tag}.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_test_db(),
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,  # credentials encrypted by the tests decrypt in the worker
        "DJANGO_SETTINGS_MODULE": "datacenter.settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "datacenter.celery:app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        nodename,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "INFO",
        "--logfile",
        str(logfile),
    ]
    process = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = CeleryWorker(pid=process.pid, queue=queue, nodename=nodename, logfile=logfile, process=process)
    try:
        wait_process_ready(lambda: " ready." in worker.log(), process, timeout_s=WORKER_READY_TIMEOUT_S,
                           what="the celery worker to be ready", log=worker.log)
    except BaseException:
        worker.stop()
        raise
    app.conf.task_default_queue = queue  # this process now sends every task to that worker only
    return worker


# One worker per test session, however many conftests import the fixture (each import is its own
# fixture definition to pytest): the first to start it owns it and stops it at the end.
_session_worker: CeleryWorker | None = None


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[CeleryWorker]:
    """A real Celery worker on Redis using the test database, for the whole session."""
    global _session_worker
    from django.conf import settings
    from django.db import connection

    need(
        redis_answers(getattr(settings, "REDIS_URL", None)),
        "needs Redis (REDIS_URL set and answering; `make services` starts it)",
    )
    need(
        connection.vendor == "postgresql",
        "needs PostgreSQL (DATABASE_URL) so a worker process can share the DB",
    )
    if _session_worker is not None and _session_worker.alive():
        yield _session_worker
        return
    from datacenter.celery import app

    previous_queue = app.conf.task_default_queue
    with django_db_blocker.unblock():
        worker = start_celery_worker(tmp_path_factory.mktemp("celery"))
    _session_worker = worker
    try:
        yield worker
    finally:
        _session_worker = None
        worker.stop()
        app.conf.task_default_queue = previous_queue
