"""A crew of real Celery worker processes on one hypervisor's queue, a real Celery beat running the
P2V lease watchdog, and the fault-injection hold files (p2v/conversion/faults.py), for the chaos
tests that kill workers mid-stage. Import the fixtures into a test module:

    from tests.chaos.p2v_workers import p2v_crew, chaos_standin, libvirt_conn, p2v_pool, p2v_prefix  # noqa

Every process is started in a session of its own and stopped by PID; the queues carry a random
tag, so workers of other test sessions on the same Redis never take these jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.environment import need
from tests.p2v_conversion.conftest import libvirt_conn, p2v_pool, p2v_prefix  # noqa: F401  (fixtures)
from tests.services import (
    REPO_ROOT,
    WORKER_READY_TIMEOUT_S,
    database_url_for_test_db,
    redis_answers,
    wait_process_ready,
)
from tests.standin.machine import standin_fixture

chaos_standin = standin_fixture("bios")

# Short on purpose, so a lost worker is noticed in seconds; production defaults are 45 s, 5 s, 10 s.
LEASE_S = 8
HEARTBEAT_S = 1
WATCHDOG_INTERVAL_S = 2
MAX_RESUMES = 5  # one job is killed in each of its four stages


@dataclasses.dataclass
class Process:
    name: str
    process: subprocess.Popen
    logfile: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def kill9(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a crashed host would: no clean-up runs."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclasses.dataclass
class Crew:
    """Workers consuming the hypervisor's queue (`hv_queue`) and a queue of this crew's own for
    everything else (`default_queue`: assessments, the watchdog)."""

    tag: str
    hypervisor_name: str
    hv_queue: str
    default_queue: str
    hold_dir: Path
    workdir: Path
    env: dict
    workers: list[Process] = dataclasses.field(default_factory=list)
    beat: Process | None = None

    def _spawn(self, name: str, argv: list[str], logfile: Path) -> Process:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return Process(name, process, logfile)

    def start_worker(self, wait: bool = True) -> Process:
        """Start one more worker; `wait`: until it is ready (otherwise call wait_ready later)."""
        name = f"p2vchaos-{self.tag}-{len(self.workers) + 1}@{socket.gethostname()}"
        logfile = self.workdir / f"worker-{len(self.workers) + 1}.log"
        worker = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "datacenter.celery:app",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "2",
                "-Q",
                f"{self.hv_queue},{self.default_queue}",
                "-n",
                name,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "INFO",
                "--logfile",
                str(logfile),
            ],
            logfile,
        )
        self.workers.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Process) -> None:
        try:
            wait_process_ready(lambda: " ready." in worker.log(), worker.process,
                               timeout_s=WORKER_READY_TIMEOUT_S, log=worker.log,
                               what=f"celery worker {worker.name} to be ready")
        except BaseException:
            worker.stop()
            raise

    def start_beat(self) -> Process:
        """Celery beat with only the P2V watchdog's entry of the real schedule (tests/chaos/p2v_beat.py)."""
        logfile = self.workdir / "beat.log"
        self.beat = self._spawn(
            "beat",
            [sys.executable, "-m", "tests.chaos.p2v_beat", str(self.workdir / "beat-schedule"), str(logfile)],
            logfile,
        )
        beat = self.beat
        try:
            wait_process_ready(lambda: "beat: Starting" in beat.log(), beat.process,
                               timeout_s=WORKER_READY_TIMEOUT_S, what="celery beat to start", log=beat.log)
        except BaseException:
            beat.stop()
            raise
        return beat

    def stop_beat(self) -> None:
        if self.beat is not None:
            self.beat.stop()
            self.beat = None

    def live_workers(self) -> list[Process]:
        return [w for w in self.workers if w.alive()]

    def worker_by_pid(self, pid: int | None) -> Process | None:
        return next((w for w in self.workers if w.pid == pid), None)

    def hold(self, point: str) -> Path:
        flag = self.hold_dir / f"hold-{point}"
        flag.touch()
        return flag

    def release(self, point: str) -> None:
        (self.hold_dir / f"hold-{point}").unlink(missing_ok=True)

    def stop(self) -> None:
        for point in ("copy", "build", "adjust", "verify"):
            self.release(point)
        self.stop_beat()
        for worker in self.workers:
            worker.stop()
        self.forget_messages()

    def forget_messages(self) -> None:
        """Drop what the killed workers left unacknowledged in Redis for this crew's queues (kombu
        would restore it an hour later, into queues nobody consumes any more), and the queues."""
        import redis
        from django.conf import settings

        broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        ours = {self.hv_queue, self.default_queue}
        for tag, raw in broker.hgetall("unacked").items():
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, IndexError):
                continue
            if routing_key in ours:
                broker.hdel("unacked", tag)
                broker.zrem("unacked_index", tag)
        broker.delete(*ours)


@pytest.fixture(scope="module")
def p2v_crew(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Crew]:
    """Two workers on a fresh hypervisor queue (more are started to replace killed ones)."""
    from django.conf import settings
    from django.db import connection

    from datacenter.celery import app
    from p2v.conversion.workers import hypervisor_queue

    need(redis_answers(getattr(settings, "REDIS_URL", None)), "needs Redis (REDIS_URL; `make services`)")
    need(connection.vendor == "postgresql", "needs PostgreSQL (DATABASE_URL) shared with the workers")
    tag = secrets.token_hex(3)
    workdir = tmp_path_factory.mktemp("p2v-chaos")
    hold_dir = workdir / "holds"
    hold_dir.mkdir()
    hypervisor_name = f"chaos-{tag}"
    default_queue = f"p2vchaos-{os.getpid()}-{tag}"
    with django_db_blocker.unblock():
        database_url = database_url_for_test_db()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,  # the machine's credential, encrypted here, decrypts there
        "DJANGO_SETTINGS_MODULE": "datacenter.settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "P2V_HYPERVISOR_QUEUES": "1",
        "P2V_JOB_LEASE_S": str(LEASE_S),
        "P2V_JOB_HEARTBEAT_S": str(HEARTBEAT_S),
        "P2V_WATCHDOG_INTERVAL_S": str(WATCHDOG_INTERVAL_S),
        "P2V_WATCHDOG_QUEUE": default_queue,
        "P2V_JOB_MAX_RESUMES": str(MAX_RESUMES),
        "P2V_FAULT_HOLD_DIR": str(hold_dir),
        # A source that is gone for good gives up in seconds (as in tests/p2v_conversion).
        "P2V_COPY_RETRY_INITIAL_S": "0.5",
        "P2V_COPY_RETRY_MAX_S": "5",
        "P2V_COPY_RETRY_WINDOW_S": "12",
    }
    crew = Crew(
        tag=tag,
        hypervisor_name=hypervisor_name,
        hv_queue=hypervisor_queue(hypervisor_name),
        default_queue=default_queue,
        hold_dir=hold_dir,
        workdir=workdir,
        env=env,
    )
    previous_queue = app.conf.task_default_queue
    try:
        for worker in [crew.start_worker(wait=False), crew.start_worker(wait=False)]:
            crew.wait_ready(worker)
        app.conf.task_default_queue = default_queue  # this process's assessments go to the crew
        yield crew
    finally:
        crew.stop()
        app.conf.task_default_queue = previous_queue
