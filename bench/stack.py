"""The production layout that bench/load.py and bench/soak.py drive, set up and torn down in one place.

`BenchStack` creates a scratch database (PostgreSQL next to the one DATABASE_URL names, or an
SQLite file for the embedded layout), seeds tenants owning VIPs x 2 listeners x 2 backends, and
starts the portal under uvicorn (Redis channel layer, N workers), a Celery worker and agent
processes (`python -m lbagent.portal`, protocol only: no Maglev builds, no health checks), waits
until every agent has applied the seed, and on exit stops all of it (by PID, process groups) and
drops the database. Also here: the /proc readers (CPU seconds, RSS, fds of a process tree) the
benchmarks report.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SYNC_TIMEOUT_S = 120  # agents applying the seed's 400 listeners on a busy 2-core machine


def database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def admin_execute(base_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(database_url(base_url, "postgres"), autocommit=True) as conn:
        conn.execute(sql)


def current_code() -> str:
    git = ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"]
    return subprocess.run(git, capture_output=True, text=True).stdout.strip() or str(REPO_ROOT)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    pids, index = [pid], 0
    while index < len(pids):
        pids += children(pids[index])
        index += 1
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes have used (/proc/<pid>/stat utime + stime)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def rss_and_fds(pids: list[int]) -> tuple[float, int]:
    """Summed resident memory (MiB) and open file descriptors of these processes."""
    rss_kib, fds = 0, 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # it exited between the listing and the read
    return rss_kib / 1024, fds


def seed(
    tenants: int, vips: int, clients: int, agents: int
) -> tuple[list[tuple[str, list[int]]], dict[str, str]]:
    """Returns, per client, (its API key, the listeners it replaces), and the agents' tokens."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from datacenter.inventory.models import Host
    from datacenter.loadbalancing import agent_sync
    from datacenter.loadbalancing.models import Backend, Generation, Listener, Vip, VipPool
    from datacenter.tenancy.models import ApiToken, Membership, Tenant
    from datacenter.testing import new_agent

    call_command("migrate", verbosity=0, interactive=False)
    pool = VipPool.objects.create(name="bench", prefix="198.18.0.0/16")
    per_tenant = vips // tenants
    client_listeners: list[tuple[str, list[int]]] = []
    index = 0
    for t in range(tenants):
        tenant = Tenant.objects.create(name=f"Bench {t}", slug=f"bench-{t}", max_vips=per_tenant + 10)
        pool.tenants.add(tenant)
        vip_rows = Vip.objects.bulk_create(
            Vip(
                tenant=tenant,
                pool=pool,
                name=f"vip-{i}",
                address=f"198.18.{(index + i) // 250}.{(index + i) % 250 + 1}",
                provisioning_status="active",
                operating_status="online",
            )
            for i in range(per_tenant)
        )
        index += per_tenant
        listeners = Listener.objects.bulk_create(
            Listener(vip=vip, protocol="tcp", port=port, generation=1, provisioning_status="active")
            for vip in vip_rows
            for port in (80, 443)
        )
        backends, generations = [], []
        for listener in listeners:
            rows = [
                {
                    "address": f"10.{64 + listener.pk // 250}.{listener.pk % 250}.{b + 1}",
                    "port": 8080,
                    "weight": 1,
                    "admin_state": "active",
                    "host": None,
                }
                for b in range(2)
            ]
            backends += [
                Backend(listener=listener, position=p, address=r["address"], port=8080)
                for p, r in enumerate(rows)
            ]
            generations.append(Generation(listener=listener, number=1, backends=rows, changes={}))
        Backend.objects.bulk_create(backends)
        Generation.objects.bulk_create(generations)
        own = clients // tenants
        ids = [li.pk for li in listeners]
        for c in range(own):
            user = get_user_model().objects.create_user(
                username=f"bench-{t}-{c}", password=secrets.token_hex(16)
            )
            Membership.objects.create(user=user, tenant=tenant, role="member")
            key = ApiToken.objects.create_token(user, name="bench", write_enabled=True)[1]
            client_listeners.append((key, ids[c::own]))
    host = Host.objects.create(name="lb-bench", management_address="10.0.0.1", roles=["lb-node"])
    tokens = {f"mux-{n}": new_agent(f"mux-{n}", host, f"10.0.0.{n + 10}")[1] for n in range(agents)}
    agent_sync.apply_change(None)
    return client_listeners, tokens


def not_active(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM loadbalancing_listener WHERE provisioning_status <> 'active'"
    ).fetchone()[0]


class BenchStack:
    """Scratch database + seed + portal (uvicorn x workers) + Celery worker + agents; a context manager.

    `embedded`: SQLite file, in-memory channel layer, one uvicorn process, no Celery worker.
    Needs DATABASE_URL (PostgreSQL) and REDIS_URL unless embedded. `name` prefixes the scratch
    database (`<name>_<pid>`) and the Celery node name.
    """

    def __init__(
        self,
        name: str,
        *,
        tenants: int,
        vips: int,
        clients: int,
        agents: int,
        workers: int = 2,
        embedded: bool = False,
    ) -> None:
        self.name, self.tenants, self.vips, self.clients = name, tenants, vips, clients
        self.agent_count, self.workers, self.embedded = agents, workers, embedded
        self.base_db = os.environ.get("DATABASE_URL", "")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-"))
        self.db_name: str | None = None
        self.url = ""
        self.portal = None
        self.worker: subprocess.Popen | None = None
        self.agents: list = []
        self.client_seed: list[tuple[str, list[int]]] = []

    def check_environment(self) -> str | None:
        """Why this stack cannot run here, or None."""
        if self.embedded:
            return None
        if not self.base_db.startswith("postgres") or not os.environ.get("REDIS_URL"):
            return "needs DATABASE_URL (PostgreSQL) and REDIS_URL (or --embedded)"
        return None

    def connect(self):
        """A new autocommit connection to the scratch database (read-only for SQLite)."""
        if self.db_name is None:
            return sqlite3.connect(f"file:{self.workdir / 'db.sqlite3'}?mode=ro", uri=True, timeout=30)
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def __enter__(self) -> BenchStack:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        if self.embedded:
            self.url = f"sqlite:///{self.workdir / 'db.sqlite3'}"
            os.environ.pop("REDIS_URL", None)
            self.workers = 1  # the in-memory channel layer lives in one process
        else:
            self.db_name = f"{self.name}_{os.getpid()}"
            admin_execute(self.base_db, f'CREATE DATABASE "{self.db_name}"')
            self.url = database_url(self.base_db, self.db_name)
        os.environ["DATABASE_URL"] = self.url
        os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
        os.environ["DATACENTER_LOG_LEVEL"] = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
        import django

        django.setup()
        from tests.push.stack import AgentProcess, PortalServer

        self.client_seed, tokens = seed(self.tenants, self.vips, self.clients, self.agent_count)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"DATACENTER_EMBEDDED_WORKER": "0", "PYTHONPATH": str(REPO_ROOT)})
        self.portal = PortalServer(env=env, workdir=self.workdir, workers=self.workers)
        self.portal.start()
        if not self.embedded:
            with (self.workdir / "worker.log").open("w") as log:
                self.worker = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "datacenter.celery:app", "worker",
                     "--pool", "threads", "--concurrency", "2", "--loglevel", "WARNING",
                     "-n", f"{self.name}-{os.getpid()}@%h"],
                    cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        self.agents = [
            AgentProcess(
                name,
                token,
                self.portal,
                self.workdir,
                write_applied_file=False,
                extra_args=("--no-tables", "--no-health", "--log-level", "WARNING"),
            )
            for name, token in tokens.items()
        ]
        for agent in self.agents:
            agent.start()
        with self.connect() as conn:
            deadline = time.monotonic() + SYNC_TIMEOUT_S
            while (
                not_active(conn)
                or conn.execute(
                    "SELECT count(*) FROM loadbalancing_agentnode WHERE applied_generation IS NULL"
                ).fetchone()[0]
            ):
                if time.monotonic() > deadline:
                    raise SystemExit(f"agents did not sync: {self.agents[0].log()[-2000:]}")
                time.sleep(0.2)

    def portal_pids(self) -> list[int]:
        """uvicorn's master and its workers (not the multiprocessing resource tracker's helper: it
        idles, so including it changes nothing)."""
        return tree(self.portal.process.pid) if self.portal and self.portal.process else []

    def worker_pids(self) -> list[int]:
        return tree(self.worker.pid) if self.worker is not None else []

    def __exit__(self, *exc_info) -> None:
        for agent in self.agents:
            agent.stop()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(timeout=30)
        if self.portal is not None:
            self.portal.stop()
        if "django" in sys.modules and self.url:
            from django.db import connections

            connections.close_all()
        if self.db_name is not None:
            admin_execute(self.base_db, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
