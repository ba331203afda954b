"""Soak benchmark of the control plane (issue 15): steady REST changes for a long time.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/x REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/soak.py --minutes 30 [--rate 2] [--agents 4] [--png docs/soak.png]

The production layout of bench/load.py (scratch PostgreSQL database, uvicorn with 2 workers,
Redis channel layer, a Celery worker) with AGENTS agents (protocol only). One tenant client
replaces a random listener's backends RATE times a second and waits for the listener's ACTIVE
status each time (propagation: from the call until every agent acknowledged). Every 10 s it
samples RSS and open fds of the portal (uvicorn's master and workers), the worker and each
agent, and the database connections. Printed: per window (--window-minutes, 5 by default) the
p50/p95 propagation and the resources, errors, and growth from the first window to the last.
Not part of `make test`; docs/bench-load.md records a run. `--png` draws the series with a tiny
PNG writer (no plotting library needed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from stack import BenchStack, current_code, percentile, rss_and_fds, tree  # noqa: E402

SAMPLE_EVERY_S = 10.0
# A kept-alive connection idle longer than this is replaced before the next change: uvicorn closes
# it after 5 s (--timeout-keep-alive), and a slow propagation wait can last longer than that.
KEEP_ALIVE_REUSE_S = 4.0


def write_png(path: Path, series: dict[str, list[float]], width: int = 900, panel_h: int = 110) -> None:
    """One panel per series (top to bottom in the given order), each scaled from 0 to its own
    maximum, drawn as a line on a white background with a grey zero line. No text: the caption
    in docs/ names the panels and their maxima."""
    names = list(series)
    height = panel_h * len(names)
    pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            offset = (y * width + x) * 3
            pixels[offset : offset + 3] = bytes(color)

    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for index, name in enumerate(names):
        values = series[name]
        top, bottom = index * panel_h + 8, (index + 1) * panel_h - 8
        for x in range(width):
            dot(x, bottom, (200, 200, 200))
            dot(x, (index + 1) * panel_h - 1, (120, 120, 120))
        if not values:
            continue
        peak = max(values) or 1.0
        previous = None
        for i, value in enumerate(values):
            x = round(i * (width - 1) / max(1, len(values) - 1))
            y = round(bottom - (bottom - top) * value / peak)
            if previous is not None:  # a straight segment from the previous point
                (px, py), steps = previous, max(abs(x - previous[0]), abs(y - previous[1]), 1)
                for step in range(steps + 1):
                    dot(
                        px + (x - px) * step // steps,
                        py + (y - py) * step // steps,
                        colors[index % len(colors)],
                    )
            previous = (x, y)
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def report(
    args: argparse.Namespace,
    change: int,
    errors: list[str],
    propagation: list[tuple[float, float]],
    samples: list[dict],
    agent_names: list[str],
) -> None:
    """Print the windows, the growth and (optionally) write the CSV and the PNG."""
    window_s = args.window_minutes * 60
    windows = max(1, round(args.minutes * 60 / window_s))
    print(f"code: {args.code}")
    load = os.getloadavg()
    print(
        f"soak: {args.minutes:g} min, {args.rate:g} changes/s, {args.agents} agents (protocol only), "
        f"{args.vips} VIPs x 2 listeners; {change} changes, {len(errors)} errors; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end"
    )
    for message in errors[:5]:
        print(f"  error: {message}")
    first_p95 = last_p95 = None
    for w in range(windows):
        lo, hi = w * window_s, (w + 1) * window_s
        values = [s for t, s in propagation if lo <= t < hi]
        rows = [r for r in samples if lo <= r["t"] < hi] or samples[-1:]
        p50, p95 = percentile(values, 0.5) * 1000, percentile(values, 0.95) * 1000
        first_p95 = p95 if first_p95 is None else first_p95
        last_p95 = p95
        agents_rss = sum(rows[-1][f"{name}_rss_mib"] for name in agent_names) / len(agent_names)
        print(
            f"  window {w + 1} ({lo / 60:.1f}-{hi / 60:.1f} min): n={len(values)} "
            f"propagation p50 {p50:.1f} ms "
            f"p95 {p95:.1f} ms; portal RSS {rows[-1]['portal_rss_mib']:.0f} MiB "
            f"fds {rows[-1]['portal_fds']}; "
            f"worker RSS {rows[-1]['worker_rss_mib']:.0f} MiB fds {rows[-1]['worker_fds']}; "
            f"agent RSS (mean) {agents_rss:.0f} MiB; db connections {rows[-1]['db_connections']}; "
            f"machine load average {min(r['load1'] for r in rows):.1f}-{max(r['load1'] for r in rows):.1f}"
        )
    if samples:
        first, last = samples[0], samples[-1]
        growth = ", ".join(
            f"{name} {first[name]:.0f} -> {last[name]:.0f}"
            for name in first
            if name != "t" and (name.endswith("rss_mib") or name.endswith("fds") or name == "db_connections")
        )
        print(f"first -> last sample: {growth}")
    if first_p95 and last_p95:
        print(f"last window's p95 / first window's p95: {last_p95 / first_p95:.2f}")
    if args.csv and samples:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
    if args.png and samples:
        series = {
            "portal RSS": [r["portal_rss_mib"] for r in samples],
            "portal fds": [float(r["portal_fds"]) for r in samples],
            "worker RSS": [r["worker_rss_mib"] for r in samples],
            f"{agent_names[0]} RSS": [r[f"{agent_names[0]}_rss_mib"] for r in samples],
            "db connections": [float(r["db_connections"]) for r in samples],
            "propagation": [s * 1000 for _, s in propagation],
        }
        write_png(args.png, series)
        print(
            f"plot: {args.png} (panels top to bottom, each from 0 to its maximum: "
            + "; ".join(f"{name} max {max(v) if v else 0:.0f}" for name, v in series.items())
            + ")"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--window-minutes", type=float, default=5)
    parser.add_argument("--rate", type=float, default=2.0, help="changes per second")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--vips", type=int, default=200)
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument("--csv", type=Path, help="write the samples here")
    args = parser.parse_args()
    args.code = current_code()  # now: the checkout may move on while the soak runs
    base_db, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not base_db.startswith("postgres") or not redis_url:
        print("bench/soak.py needs DATABASE_URL (PostgreSQL) and REDIS_URL", file=sys.stderr)
        return 2
    if args.minutes <= 0 or args.rate <= 0 or args.window_minutes <= 0:
        print("--minutes, --rate and --window-minutes must be positive", file=sys.stderr)
        return 2
    stack = BenchStack("bench_soak", tenants=1, vips=args.vips, clients=1, agents=args.agents, workers=2)
    print(f"code: {args.code}", flush=True)
    with stack:
        import psycopg

        portal, worker, agents, url, db_name = (
            stack.portal, stack.worker, stack.agents, stack.url, stack.db_name
        )
        key, listener_ids = stack.client_seed[0]
        db = psycopg.connect(url, autocommit=True)

        def status(listener_id: int) -> str:
            return db.execute(
                "SELECT provisioning_status FROM loadbalancing_listener WHERE id = %s", [listener_id]
            ).fetchone()[0]

        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
        last_used = time.monotonic()
        headers = {"Authorization": f"Token {key}", "Content-Type": "application/json"}
        propagation: list[tuple[float, float]] = []  # (elapsed since start, seconds)
        errors: list[str] = []
        samples: list[dict] = []
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            with psycopg.connect(url, autocommit=True) as own:
                while not stop.is_set():
                    portal_pids = tree(portal.process.pid)
                    row = {"t": round(time.monotonic() - started, 1), "load1": os.getloadavg()[0]}
                    row["portal_rss_mib"], row["portal_fds"] = rss_and_fds(portal_pids)
                    row["worker_rss_mib"], row["worker_fds"] = rss_and_fds(
                        tree(worker.pid)
                    )
                    for agent in agents:
                        row[f"{agent.name}_rss_mib"], row[f"{agent.name}_fds"] = rss_and_fds(
                            [agent.process.pid]
                        )
                    row["db_connections"] = own.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        [db_name],
                    ).fetchone()[0]
                    samples.append(row)
                    stop.wait(SAMPLE_EVERY_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rng = random.Random(11)
        change = 0
        end = started + args.minutes * 60
        while time.monotonic() < end:
            due = started + change / args.rate
            time.sleep(max(0.0, due - time.monotonic()))  # the steady rate: next change's start time
            change += 1
            listener_id = rng.choice(listener_ids)
            backends = [
                {"address": f"10.201.{change % 250}.{b + 1}", "port": 8080} for b in range(1 + change % 3)
            ]
            t0 = time.monotonic()
            if t0 - last_used > KEEP_ALIVE_REUSE_S:  # uvicorn closes idle connections after 5 s
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
            try:
                connection.request(
                    "PUT",
                    f"/api/listeners/{listener_id}/backends/",
                    json.dumps({"backends": backends}),
                    headers,
                )
                response = connection.getresponse()
                body = response.read()
                last_used = time.monotonic()
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=60)
                continue
            if response.status != 200:
                errors.append(f"HTTP {response.status}: {body[:200]!r}")
                continue
            while status(listener_id) != "active":
                if time.monotonic() - t0 > 60:
                    errors.append(f"listener {listener_id} not ACTIVE 60 s after change {change}")
                    break
                time.sleep(0.005)
            else:
                propagation.append((t0 - started, time.monotonic() - t0))
        stop.set()
        sampler.join(timeout=30)

        report(args, change, errors, propagation, samples, [a.name for a in agents])
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
