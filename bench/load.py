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

It ends with the issue's goals, each marked met or NOT met, and the portal's CPU seconds per
request (uvicorn master + workers, from /proc/<pid>/stat): far less sensitive to other work on
the machine than latency or requests/s.

`--compare-with REF` (e.g. main) measures the baseline in the same session: it unpacks REF with
`git archive` into a scratch directory, copies this bench/load.py and bench/stack.py in, and runs
this code and REF's alternately (`--pairs` pairs, this code first), each run in its own process
and stack, then prints every pair and the ratios this/REF. Alternating lets both codes see the
same machine load; the ratios, above all CPU per request, are the figures to compare.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from stack import BenchStack, cpu_seconds, current_code, not_active, percentile  # noqa: E402

KINDS = ("vip_list", "backend_read", "backend_replace")
# Issue 15, acceptance 2 (40 clients on the 2-core machine, production layout).
GOAL_REQUESTS_S = 160.0  # 2x the 80 requests/s measured before the work
GOAL_VIP_LIST_P95_S = 0.300
GOAL_SETTLE_S = 2.0
RESULT_PREFIX = "RESULT "  # the last line: this run's figures as JSON, for --compare-with


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


def goal_lines(result: dict) -> list[str]:
    """The acceptance goals, each with its figure and met / NOT met."""
    vip_p95 = result["p95_ms"]["vip_list"] / 1000
    settle = result["settle_s"]
    goals = [
        ("zero errors", result["errors"] == 0, f"{result['errors']} errors"),
        ("zero stuck listeners", result["stuck"] == 0, f"{result['stuck']} stuck"),
        (
            f"every listener ACTIVE within {GOAL_SETTLE_S:g} s of the load's end",
            result["stuck"] == 0 and settle <= GOAL_SETTLE_S,
            f"{settle:.2f} s",
        ),
        (
            f"VIP list p95 under {GOAL_VIP_LIST_P95_S * 1000:.0f} ms",
            vip_p95 < GOAL_VIP_LIST_P95_S,
            f"{vip_p95 * 1000:.0f} ms",
        ),
        (
            f"at least {GOAL_REQUESTS_S:g} requests/s (2x 80)",
            result["requests_s"] >= GOAL_REQUESTS_S,
            f"{result['requests_s']:.1f}",
        ),
    ]
    lines = [f"  {'met    ' if ok else 'NOT met'}  {name}: {figure}" for name, ok, figure in goals]
    if result["load_avg"] > 2.5:
        lines.append(
            f"  (load average {result['load_avg']:.1f} on {os.cpu_count()} CPUs: other work shared the "
            "machine, so the latency and requests/s goals were not measured on an idle machine)"
        )
    return lines


def run_once(args: argparse.Namespace) -> int:
    # now: the checkout may move on while the bench runs; --compare-with names its unpacked copies
    code = os.environ.get("BENCH_CODE_LABEL") or current_code()
    stack = BenchStack(
        "bench_load",
        tenants=args.tenants,
        vips=args.vips,
        clients=args.clients,
        agents=args.agents,
        workers=args.workers,
        embedded=args.embedded,
    )
    if (problem := stack.check_environment()) is not None:
        print(f"bench/load.py {problem}", file=sys.stderr)
        return 2
    with stack:
        stop = threading.Event()
        clients = [
            Client(stack.portal.http_url, key, ids, stop, n) for n, (key, ids) in enumerate(stack.client_seed)
        ]
        sampler = Sampler(stack.connect, stack.db_name)
        sampler.start()
        portal_pids = stack.portal_pids()
        cpu_before = cpu_seconds(portal_pids)
        worker_cpu_before = cpu_seconds(stack.worker_pids())
        started = time.perf_counter()
        for client in clients:
            client.start()
        time.sleep(args.seconds)  # the load runs for a fixed time: this is the measurement window
        stop.set()
        for client in clients:
            client.join(timeout=120)
        load_s = time.perf_counter() - started
        portal_cpu = cpu_seconds(portal_pids) - cpu_before
        worker_cpu = cpu_seconds(stack.worker_pids()) - worker_cpu_before
        load = os.getloadavg()  # at the load's end, before the settle wait lets it fall
        stopped = time.monotonic()
        with stack.connect() as conn:
            while (left := not_active(conn)) and time.monotonic() - stopped < args.settle_timeout:
                time.sleep(0.05)
            settle_s = time.monotonic() - stopped
        sampler.stop.set()
        sampler.join(timeout=10)
        portal_log = stack.portal.log()

    samples: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    for client in clients:
        for kind in KINDS:
            samples[kind] += client.samples[kind]
            errors[kind] += client.errors[kind]
    total = sum(len(v) for v in samples.values())
    total_errors = sum(len(v) for v in errors.values())
    print(f"code: {code}")
    layout = (
        "embedded: uvicorn x1, SQLite, in-memory channel layer"
        if args.embedded
        else f"uvicorn x{stack.workers} + Celery worker + PostgreSQL + Redis"
    )
    print(
        f"layout: {layout}, {args.agents} agents (protocol only), {args.vips} VIPs x 2 listeners in "
        f"{args.tenants} tenants, {args.clients} clients, {load_s:.0f} s; machine: {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the load's end "
        "(other work inflates every figure but the CPU per request)"
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
    cpu_ms = portal_cpu / total * 1000 if total else float("nan")
    print(
        f"portal CPU: {portal_cpu:.1f} s in {load_s:.0f} s ({portal_cpu / load_s:.2f} cores), "
        f"{cpu_ms:.2f} ms per request; Celery worker: {worker_cpu:.1f} s"
    )
    if sampler.connections:
        print(
            "database connections held (pool usage; each uvicorn worker's pool holds at most 20): "
            f"max {max(sampler.connections)}, "
            f"mean {sum(sampler.connections) / len(sampler.connections):.1f}"
        )
    if sampler.pending:
        print(
            f"listeners not ACTIVE during the load (of {args.vips * 2}): "
            f"mean {sum(sampler.pending) / len(sampler.pending):.1f}, max {max(sampler.pending)}"
        )
    verdict = f"{settle_s:.2f} s" if not left else f"NOT within {args.settle_timeout:g} s: {left} stuck"
    print(f"after the load stopped, every listener ACTIVE in: {verdict}")
    print(
        "portal log: "
        f"{portal_log.count('over capacity')} channel overflow(s), "
        f"{portal_log.count('missed the notification')} missed notification(s) repaired, "
        f"{portal_log.count('has not acknowledged')} lag re-send(s), "
        f"{portal_log.count('Traceback')} traceback(s)"
    )
    result = {
        "code": code,
        "requests_s": total / load_s,
        "requests": total,
        "errors": total_errors,
        "stuck": left,
        "settle_s": settle_s,
        "p50_ms": {kind: percentile(samples[kind], 0.5) * 1000 for kind in KINDS},
        "p95_ms": {kind: percentile(samples[kind], 0.95) * 1000 for kind in KINDS},
        "portal_cpu_ms_per_request": cpu_ms,
        "worker_cpu_s": worker_cpu,
        "load_avg": load[0],
    }
    print("goals (issue 15, acceptance 2):")
    for line in goal_lines(result):
        print(line)
    print(RESULT_PREFIX + json.dumps(result))
    return 0


def describe(ref: str) -> str:
    git = ["git", "-C", str(BENCH_DIR.parent), "log", "-1", "--format=%h %s", ref]
    return subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()


def cpu_only(args: argparse.Namespace) -> int:
    """CPU time per request of each kind through the code's ASGI application in this process: no server,
    no concurrency, the kinds interleaved. Process CPU time hardly depends on other work on the
    machine, so this compares two codes' work per request on a busy machine."""
    import asyncio

    from stack import admin_execute, database_url, seed

    base_db = os.environ.get("DATABASE_URL", "")
    if not base_db.startswith("postgres") or not os.environ.get("REDIS_URL"):
        print("bench/load.py --cpu-only needs DATABASE_URL (PostgreSQL) and REDIS_URL", file=sys.stderr)
        return 2
    code = os.environ.get("BENCH_CODE_LABEL") or current_code()
    db_name = f"bench_load_cpu_{os.getpid()}"
    admin_execute(base_db, f'CREATE DATABASE "{db_name}"')
    os.environ["DATABASE_URL"] = database_url(base_db, db_name)
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + "x" * 50)
    os.environ["DATACENTER_LOG_LEVEL"] = "WARNING"
    try:
        import django

        django.setup()
        from asgiref.testing import ApplicationCommunicator

        client_seed, _ = seed(args.tenants, args.vips, args.clients, 0)
        key, listeners = client_seed[0]
        # What uvicorn serves (the code's own HTTP handler and its wrappers), without uvicorn.
        from datacenter.asgi import application as app
        headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Token {key}".encode()),
                   (b"content-type", b"application/json")]  # fmt: skip

        async def call(method: str, path: str, body: bytes) -> None:
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                     "root_path": "", "headers": [*headers, (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 1),
                     "server": ("127.0.0.1", 80)}  # fmt: skip
            exchange = ApplicationCommunicator(app, scope)
            await exchange.send_input({"type": "http.request", "body": body, "more_body": False})
            start = await exchange.receive_output(60)
            chunk = await exchange.receive_output(60)
            if start["status"] != 200:
                raise SystemExit(f"{method} {path}: HTTP {start['status']}: {chunk.get('body', b'')[:300]!r}")
            while chunk.get("more_body"):
                chunk = await exchange.receive_output(60)
            await exchange.wait(60)

        def request(kind: str, step: int) -> tuple[str, str, bytes]:
            listener = listeners[step % len(listeners)]
            if kind == "vip_list":
                return "GET", "/api/vips/", b""
            if kind == "backend_read":
                return "GET", f"/api/listeners/{listener}/backends/", b""
            count = 1 + step % 3
            backends = [{"address": f"10.200.{step % 250}.{b + 1}", "port": 8080} for b in range(count)]
            return "PUT", f"/api/listeners/{listener}/backends/", json.dumps({"backends": backends}).encode()

        async def measure() -> dict[str, float]:
            for step in range(10):  # warm-up: imports, first queries, the token's last_used write
                for kind in KINDS:
                    await call(*request(kind, step))
            cpu = dict.fromkeys(KINDS, 0.0)
            for step in range(args.cpu_only):
                for kind in KINDS:
                    started = time.process_time()
                    await call(*request(kind, 100 + step))
                    cpu[kind] += time.process_time() - started
            return {kind: total / args.cpu_only * 1000 for kind, total in cpu.items()}

        if args.profile:
            asyncio.run(profile(call, request, args.cpu_only, args.profile))
            return 0
        per_kind = asyncio.run(measure())
    finally:
        from django.db import connections

        connections.close_all()
        admin_execute(base_db, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    mix = 0.6 * per_kind["vip_list"] + 0.2 * per_kind["backend_read"] + 0.2 * per_kind["backend_replace"]
    print(f"code: {code}")
    load = os.getloadavg()[0]
    print(f"CPU per request, in-process ASGI, {args.cpu_only} of each kind, load average {load:.1f}:")
    for kind in KINDS:
        print(f"  {kind:16s} {per_kind[kind]:6.2f} ms")
    print(f"  the bench's mix (60/20/20) {mix:6.2f} ms")
    result = {"code": code, "cpu_ms": per_kind, "cpu_ms_mix": mix, "load_avg": os.getloadavg()[0]}
    print(RESULT_PREFIX + json.dumps(result))
    return 0


async def profile(call, request, count: int, prefix: str) -> None:
    """--profile: yappi (CPU clock, every thread: the view runs on sync_to_async's) over `count`
    requests of each kind; writes PREFIX.<kind>.prof (pstats) and prints the top functions."""
    import pstats

    import yappi

    for step in range(10):  # warm-up, as measure() does
        for kind in KINDS:
            await call(*request(kind, step))
    yappi.set_clock_type("cpu")
    for kind in KINDS:
        yappi.clear_stats()
        yappi.start()
        for step in range(count):
            await call(*request(kind, 100 + step))
        yappi.stop()
        path = f"{prefix}.{kind}.prof"
        yappi.get_func_stats().save(path, type="pstat")
        print(f"=== {kind}: {count} requests, {path}")
        stats = pstats.Stats(path)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)


def unpack(ref: str) -> Path:
    """`git archive REF` into a scratch directory, with this bench/load.py and bench/stack.py."""
    target = Path(tempfile.mkdtemp(prefix="bench-load-ref-"))
    archive = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "archive", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    for name in ("load.py", "stack.py"):
        shutil.copy2(BENCH_DIR / name, target / "bench" / name)
    return target


def run_child(checkout: Path, label: str, argv: list[str]) -> dict:
    """One run of `checkout`'s bench/load.py (its own process and stack); its RESULT line."""
    env = dict(os.environ, PYTHONPATH=str(checkout), BENCH_CODE_LABEL=label)
    completed = subprocess.run(
        [sys.executable, str(checkout / "bench" / "load.py"), *argv],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    print(completed.stdout, end="")
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the run of {checkout} failed (exit {completed.returncode})")
    line = next(li for li in reversed(completed.stdout.splitlines()) if li.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    # Both sides from git (this side: HEAD), so editing the checkout cannot change a run.
    label = {ref: describe(ref) for ref in ("HEAD", args.compare_with)}
    ours_dir, reference = unpack("HEAD"), unpack(args.compare_with)
    pairs: list[tuple[dict, dict]] = []
    try:
        for n in range(args.pairs):
            print(f"=== pair {n + 1}: this code, {label['HEAD']} ===", flush=True)
            ours = run_child(ours_dir, label["HEAD"], argv)
            print(f"=== pair {n + 1}: {args.compare_with}, {label[args.compare_with]} ===", flush=True)
            theirs = run_child(reference, label[args.compare_with], argv)
            pairs.append((ours, theirs))
    finally:
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(reference, ignore_errors=True)
    print(f"\nthis code ({pairs[0][0]['code']}) against {args.compare_with}, per pair:")
    if args.cpu_only:
        print("pair | CPU ms per request this/ref = ratio: " + ", ".join(KINDS) + ", the mix")
        for n, (ours, theirs) in enumerate(pairs, 1):
            cells = [(ours["cpu_ms"][k], theirs["cpu_ms"][k]) for k in KINDS]
            cells.append((ours["cpu_ms_mix"], theirs["cpu_ms_mix"]))
            print(f"{n} | " + " | ".join(f"{a:.2f}/{b:.2f} = {a / b:.2f}" for a, b in cells)
                  + f" (load {ours['load_avg']:.1f} / {theirs['load_avg']:.1f})")  # fmt: skip
        return 0
    print("pair | req/s this/ref = ratio | VIP list p95 ms this/ref | portal CPU ms/request this/ref = ratio")
    for n, (ours, theirs) in enumerate(pairs, 1):
        print(
            f"{n} | {ours['requests_s']:.1f} / {theirs['requests_s']:.1f} = "
            f"{ours['requests_s'] / theirs['requests_s']:.2f} | "
            f"{ours['p95_ms']['vip_list']:.0f} / {theirs['p95_ms']['vip_list']:.0f} | "
            f"{ours['portal_cpu_ms_per_request']:.2f} / {theirs['portal_cpu_ms_per_request']:.2f} = "
            f"{ours['portal_cpu_ms_per_request'] / theirs['portal_cpu_ms_per_request']:.2f}"
            f" (load {ours['load_avg']:.1f} / {theirs['load_avg']:.1f})"
        )
    return 0


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
    parser.add_argument("--compare-with", metavar="REF", help="alternate runs with this git ref's code")
    parser.add_argument("--pairs", type=int, default=2, help="with --compare-with: how many pairs")
    parser.add_argument(
        "--cpu-only",
        type=int,
        metavar="N",
        help="no server: CPU time per request of each kind, N of each, through the ASGI handler in-process",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="with --cpu-only: profile each kind with yappi (writes PREFIX.<kind>.prof, prints the top)",
    )
    args = parser.parse_args()
    if args.clients % args.tenants or args.vips % args.tenants:
        print("--clients and --vips must be multiples of --tenants", file=sys.stderr)
        return 2
    if args.compare_with:
        names = ("clients", "seconds", "vips", "tenants", "agents", "workers", "settle_timeout")
        argv = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]
        argv += ["--embedded"] if args.embedded else []
        argv += [f"--cpu-only={args.cpu_only}"] if args.cpu_only else []
        return compare(args, argv)
    if args.cpu_only:
        return cpu_only(args)
    return run_once(args)


if __name__ == "__main__":
    sys.exit(main())
