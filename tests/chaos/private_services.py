"""Private PostgreSQL and Redis servers for the chaos tests, which restart them.

The shared services on 5432/6379 belong to everyone on the machine: a chaos test must never
touch them. Each server here runs from its own directory on its own free port, in its own
session, and is stopped (and restarted) by the PID we started; `close()` removes everything,
also after a failure. PostgreSQL refuses to run as root, so its processes run as the `postgres`
OS user (`Popen(user=...)`, so the PID we hold is the postmaster itself, not a wrapper).

A migrated database is costly on this machine (Django's migrations take tens of seconds), so
the first run keeps a stopped, migrated cluster under /var/cache/datacenter-tests keyed by the
PostgreSQL version and the migrations' contents; later runs copy it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.services import migrations_digest, wait_process_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path("/var/cache/datacenter-tests")
START_TIMEOUT_S = 120.0  # a loaded 2-core machine: generous, start-up speed is not what we test
DATABASE = "dc_chaos"
PREFIX = "dc-chaoscp-"  # every directory made here starts with this (clean-up is by path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, what: str, timeout_s: float, process: subprocess.Popen, log: Path) -> None:
    wait_process_ready(condition, process, timeout_s=timeout_s, what=what, log=lambda: _tail(log))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def _stop_pid(process: subprocess.Popen | None, signum: int, timeout_s: float = 60.0) -> None:
    """Signal the process we started (never a name), wait for it, SIGKILL its group if it hangs."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signum)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class PrivateRedis:
    """redis-server on a free loopback port, no persistence: a restart loses every key, channel
    group and queued message, the harshest Redis restart there is."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.workdir / "redis.log"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.starts += 1
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--logfile", str(self.logfile),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(self.answers, "private redis-server start", START_TIMEOUT_S, self.process, self.logfile)

    def stop(self) -> None:
        _stop_pid(self.process, signal.SIGTERM)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("no PostgreSQL server binary under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


def _migrations_key() -> str:
    digest = migrations_digest()  # P2V's migrations too: the portal's /metrics reads its jobs
    digest.update(str(_postgres_bin()).encode())
    return digest.hexdigest()[:16]


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of our own (trust auth on loopback), run by the `postgres` user."""

    workdir: Path  # owned by postgres: the data directory and the socket live here
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def logfile(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as db:
                return db.execute("SELECT 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def _as_postgres(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv,
            user="postgres",
            group="postgres",
            extra_groups=[],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
            **kwargs,
        )

    def prepare(self) -> None:
        """A migrated database: copied from the cache, or made (and cached) on the first run."""
        key = _migrations_key()
        cached = CACHE_DIR / f"chaos-pgdata-{key}"
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with open(CACHE_DIR / f"chaos-pgdata-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same one
            if not cached.exists():
                self._initdb_and_migrate()
                building = CACHE_DIR / f".chaos-pgdata-{key}.{os.getpid()}"
                shutil.copytree(self.datadir, building, symlinks=True)
                building.rename(cached)
                return
        shutil.copytree(cached, self.datadir, symlinks=True)
        self._chown(self.datadir)
        os.chmod(self.datadir, 0o700)

    def _chown(self, path: Path) -> None:
        user = pwd.getpwnam("postgres")
        for root, dirs, files in os.walk(path):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)

    def _initdb_and_migrate(self) -> None:
        self._as_postgres(
            [
                str(_postgres_bin() / "initdb"),
                "-D",
                str(self.datadir),
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        )
        self.start()
        try:
            import psycopg

            with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
                db.execute(f"CREATE DATABASE {DATABASE}")
            run_django(
                self.url,
                None,
                "from django.core.management import call_command;call_command('migrate', verbosity=0)",
            )
        finally:
            self.stop()

    def start(self) -> None:
        self.starts += 1
        argv = [
            str(_postgres_bin() / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
            "-k", str(self.workdir), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
        ]  # fmt: skip
        with self.logfile.open("a") as log:
            self.process = subprocess.Popen(
                argv, user="postgres", group="postgres", extra_groups=[], cwd=self.workdir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait(self._accepts, "private PostgreSQL start", START_TIMEOUT_S, self.process, self.logfile)

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open transactions are aborted, clients disconnected, the
        way an operator's `pg_ctl restart -m fast` or a package upgrade does it."""
        _stop_pid(self.process, signal.SIGINT)


class PrivateServices:
    """Both servers in one unique directory under /tmp (pytest's tmp dirs are root-only, and the
    postgres user must reach its data directory)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        os.chmod(self.root, 0o755)  # noqa: S103 (the postgres user must traverse it; nothing secret)
        pg_dir = self.root / "pg"
        pg_dir.mkdir()
        user = pwd.getpwnam("postgres")
        os.chown(pg_dir, user.pw_uid, user.pw_gid)
        redis_dir = self.root / "redis"
        redis_dir.mkdir()
        self.postgres = PrivatePostgres(pg_dir)
        self.redis = PrivateRedis(redis_dir)

    def start(self) -> None:
        self.postgres.prepare()
        self.postgres.start()
        self.redis.start()

    def close(self) -> None:
        try:
            self.redis.stop()
        finally:
            try:
                self.postgres.stop()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)


def run_django(database_url: str, redis_url: str | None, code: str, timeout_s: float = 600) -> str:
    """Run `code` in a child process with Django set up against the given services; returns its
    stdout (this process's Django, if any, stays bound to the shared test database)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.lower().endswith("_proxy")}
    env.update(
        {
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": "datacenter.settings",
            "PYTHONPATH": str(REPO_ROOT),
            "DATACENTER_EMBEDDED_WORKER": "0",
            "DJANGO_SECRET_KEY": "chaos-tests-not-a-secret",
        }
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup();" + code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"Django child failed: {done.stderr[-3000:]}")
    return done.stdout
