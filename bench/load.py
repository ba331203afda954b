"""Load benchmark of the control plane in the production layout (issue 15).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/x REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/load.py [--clients 40] [--seconds 120] [--vips 200]

Creates a scratch PostgreSQL database next to the one DATABASE_URL names (dropped at the end),
seeds TENANTS tenants owning VIPS VIPs x 2 listeners x 2 backends, and starts the production
layout: the portal under uvicorn with 2 workers and the Redis channel layer, a Celery worker,
and AGENTS agent processes (`python -m lbagent.portal`, protocol only: no Maglev builds, no
health checks, so the figure is the control plane's). Then CLIENTS tenant clients (threads, one
kept-alive HTTP connection and one API token each) call the API back to back, no think time, for
SECONDS: 60 % VIP list, 20 % backend reads and 20 % backend replaces, each client on listeners
of its own (so no 409 is expected). Printed: requests/s, p50/p95/p99 per kind, errors, the
database connections the portal held (pool usage), listeners pending during the load, and the
time from the end of the load until every listener is ACTIVE.

The baseline is the same script run against another checkout (`cd <checkout> && python
bench/load.py`): docs/bench-load.md has both runs. Run it alone: two cores shared with other
work make every figure (the baseline's too) slower.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

KINDS = ("vip_list", "backend_read", "backend_replace")


def database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def admin_execute(base_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(database_url(base_url, "postgres"), autocommit=True) as conn:
        conn.execute(sql)


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


class Client(threading.Thread):
    """One tenant client: back-to-back calls on one kept-alive connection until `stop`."""

    def __init__(
        self, base_url: str, key: str, listeners: list[int], stop: threading.Event, seed: int
    ) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.headers = {"Authorization": f"Token {key}", "Content-Type": "application/json"}
        self.listeners, self.stop = listeners, stop
        self.rng = random.Random(seed)
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.replaces = 0

    def call(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None
    ) -> tuple[int, bytes]:
        conn.request(method, path, body, self.headers)
        response = conn.getresponse()
        return response.status, response.read()

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        step = 0
        while not self.stop.is_set():
            step += 1
            draw = self.rng.random()
            listener = self.rng.choice(self.listeners)
            if draw < 0.6:
                kind, method, path, body = "vip_list", "GET", "/api/vips/", None
            elif draw < 0.8:
                kind, method, path, body = "backend_read", "GET", f"/api/listeners/{listener}/backends/", None
            else:
                backends = [
                    {"address": f"10.200.{step % 250}.{b + 1}", "port": 8080} for b in range(1 + step % 3)
                ]
                kind, method, path = "backend_replace", "PUT", f"/api/listeners/{listener}/backends/"
                body = json.dumps({"backends": backends}).encode()
            started = time.perf_counter()
            try:
                status, payload = self.call(conn, method, path, body)
            except (OSError, http.client.HTTPException) as exc:
                self.errors[kind].append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                continue
            elapsed = time.perf_counter() - started
            if status != 200:
                self.errors[kind].append(f"HTTP {status}: {payload[:200]!r}")
                continue
            self.samples[kind].append(elapsed)
            self.replaces += kind == "backend_replace"
        conn.close()


def current_code() -> str:
    git = ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"]
    return subprocess.run(git, capture_output=True, text=True).stdout.strip() or str(REPO_ROOT)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class Sampler(threading.Thread):
    """Once a second: the portal's database connections and the listeners not ACTIVE."""

    def __init__(self, connect, db_name: str | None) -> None:
        super().__init__(daemon=True)
        self.connect, self.db_name = connect, db_name
        self.connections: list[int] = []
        self.pending: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.connect() as conn:
            while not self.stop.wait(1.0):
                if self.db_name is not None:  # PostgreSQL; SQLite has no server connections
                    self.connections.append(
                        conn.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()",
                            [self.db_name],
                        ).fetchone()[0]
                    )
                self.pending.append(not_active(conn))


def not_active(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM loadbalancing_listener WHERE provisioning_status <> 'active'"
    ).fetchone()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--vips", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--settle-timeout", type=float, default=60)
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="the embedded layout instead: SQLite file, in-memory channel layer, one process, no worker",
    )
    args = parser.parse_args()
    code = current_code()  # now: the checkout may move on while the bench runs
    base_db, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not args.embedded and (not base_db.startswith("postgres") or not redis_url):
        print("bench/load.py needs DATABASE_URL (PostgreSQL) and REDIS_URL (or --embedded)", file=sys.stderr)
        return 2
    if args.clients % args.tenants or args.vips % args.tenants:
        print("--clients and --vips must be multiples of --tenants", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    if args.embedded:
        import sqlite3

        db_name = None
        sqlite_path = workdir / "db.sqlite3"
        url = f"sqlite:///{sqlite_path}"
        os.environ.pop("REDIS_URL", None)
        args.workers = 1  # the in-memory channel layer lives in one process

        def connect():
            return sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True, timeout=30)
    else:
        import psycopg

        db_name = f"bench_load_{os.getpid()}"
        admin_execute(base_db, f'CREATE DATABASE "{db_name}"')
        url = database_url(base_db, db_name)

        def connect():
            return psycopg.connect(url, autocommit=True)

    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))
    os.environ["DATACENTER_LOG_LEVEL"] = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from tests.push.stack import AgentProcess, PortalServer

    portal, agents, worker = None, [], None
    try:
        clients_seed, tokens = seed(args.tenants, args.vips, args.clients, args.agents)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"DATACENTER_EMBEDDED_WORKER": "0", "PYTHONPATH": str(REPO_ROOT)})
        portal = PortalServer(env=env, workdir=workdir, workers=args.workers)
        portal.start()
        with (workdir / "worker.log").open("w") as log:
            worker = (
                None
                if args.embedded
                else subprocess.Popen(
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
                        "--loglevel",
                        "WARNING",
                        "-n",
                        f"bench-{os.getpid()}@%h",
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        agents = [
            AgentProcess(
                name,
                token,
                portal,
                workdir,
                write_applied_file=False,
                extra_args=("--no-tables", "--no-health", "--log-level", "WARNING"),
            )
            for name, token in tokens.items()
        ]
        for agent in agents:
            agent.start()
        with connect() as conn:
            deadline = time.monotonic() + 120
            while (
                not_active(conn)
                or conn.execute(
                    "SELECT count(*) FROM loadbalancing_agentnode WHERE applied_generation IS NULL"
                ).fetchone()[0]
            ):
                if time.monotonic() > deadline:
                    raise SystemExit(f"agents did not sync: {agents[0].log()[-2000:]}")
                time.sleep(0.2)
        stop = threading.Event()
        clients = [Client(portal.http_url, key, ids, stop, n) for n, (key, ids) in enumerate(clients_seed)]
        sampler = Sampler(connect, db_name)
        sampler.start()
        started = time.perf_counter()
        for client in clients:
            client.start()
        time.sleep(args.seconds)  # the load runs for a fixed time: this is the measurement window
        stop.set()
        for client in clients:
            client.join(timeout=120)
        load_s = time.perf_counter() - started
        stopped = time.monotonic()
        with connect() as conn:
            while (left := not_active(conn)) and time.monotonic() - stopped < args.settle_timeout:
                time.sleep(0.05)
            settle_s = time.monotonic() - stopped
        sampler.stop.set()
        sampler.join(timeout=10)

        samples: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, list[str]] = defaultdict(list)
        for client in clients:
            for kind in KINDS:
                samples[kind] += client.samples[kind]
                errors[kind] += client.errors[kind]
        total = sum(len(v) for v in samples.values())
        total_errors = sum(len(v) for v in errors.values())
        load = os.getloadavg()
        print(f"code: {code}")
        layout = (
            "embedded: uvicorn x1, SQLite, in-memory channel layer"
            if args.embedded
            else f"uvicorn x{args.workers} + Celery worker + PostgreSQL + Redis"
        )
        print(
            f"layout: {layout}, "
            f"{args.agents} agents "
            f"(protocol only), {args.vips} VIPs x 2 listeners in {args.tenants} tenants, "
            f"{args.clients} clients, "
            f"{load_s:.0f} s; machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f} at the end (other work inflates every figure)"
        )
        print(f"requests/s: {total / load_s:.1f} ({total} requests), errors: {total_errors}")
        for kind in KINDS:
            values = samples[kind]
            print(
                f"  {kind:16s} n={len(values):6d}  p50 {percentile(values, 0.5) * 1000:7.1f} ms  "
                f"p95 {percentile(values, 0.95) * 1000:7.1f} ms  "
                f"p99 {percentile(values, 0.99) * 1000:7.1f} ms  "
                f"errors {len(errors[kind])}"
            )
            for message in errors[kind][:3]:
                print(f"      e.g. {message}")
        if sampler.connections:
            print(
                "database connections held (pool usage; each uvicorn worker's pool holds at most 20): "
                f"max {max(sampler.connections)}, "
                f"mean {sum(sampler.connections) / len(sampler.connections):.1f}"
            )
            print(
                f"listeners not ACTIVE during the load (of {args.vips * 2}): "
                f"mean {sum(sampler.pending) / len(sampler.pending):.1f}, max {max(sampler.pending)}"
            )
        verdict = f"{settle_s:.2f} s" if not left else f"NOT within {args.settle_timeout:g} s: {left} stuck"
        print(f"after the load stopped, every listener ACTIVE in: {verdict}")
        log = portal.log()
        print(
            "portal log: "
            f"{log.count('over capacity')} channel overflow(s), {log.count('missed the notification')} "
            f"missed notification(s) repaired, {log.count('has not acknowledged')} lag re-send(s), "
            f"{log.count('Traceback')} traceback(s)"
        )
    finally:
        for agent in agents:
            agent.stop()
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
        if portal is not None:
            portal.stop()
        from django.db import connections

        connections.close_all()
        if db_name is not None:
            admin_execute(base_db, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
