"""Demo muxes for `make run`: the real portal client (lbagent.portal.PortalClient, the real
websocket protocol) with the in-process table data plane and a steady synthetic load, so a
newcomer's portal shows VIPs turning ACTIVE, generations rolling out and counters moving.

Nothing here touches a network beyond the portal's websocket on loopback: no backend health
checks, no packets. The load is computed, not sent: every second each demo mux hashes a batch of
made-up client flows per listener with the shared core (lbagent.core.flowhash, the kernel's jhash)
and looks their buckets up in the Maglev table it applied, counting new flows per backend; during
a transition (the portal sent a previous generation) flows of buckets whose owner changed count
as slow-path decisions and flow records, as a real mux would record them. Every report carries
`simulated = 1`, which the dashboard shows.

    python -m lbagent.demo --portal ws://127.0.0.1:8000/ws/agents/ --token-file F --node demo-mux-1
    DemoAgents(url, {"demo-mux-1": token_path, ...}).start() / .stop()   # what asgi.py does
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger("lbagent.demo")

COUNTER_NAME_MAX = 64  # lbagent.protocol's limit on counter names
BACKEND_COUNTERS_MAX = 200  # leaves room for the headline counters under the protocol's 256
PACKETS_PER_FLOW = 12  # a short request/response: handshake, a few data segments, FIN
CLIENT_NET = 0xC6120000  # 198.18.0.0/15, the benchmarking range: clearly not real clients
PROTO_NUMBERS = {"tcp": 6, "udp": 17}


def backend_counter_name(listener_id: int, address: str, port: int) -> str:
    """The counter a demo mux reports new flows of one backend under (the VIP page reads it)."""
    return f"bflows.{listener_id}.{address.replace('.', '_').replace(':', '_')}_{port}"


def _ipv4(text: str) -> int | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    return int.from_bytes(bytes(int(p) for p in parts), "big")


class SimulatedLoadDriver:
    """A TableDriver (real Maglev tables from lbagent.core) plus a synthetic load generator."""

    def __init__(self, flows_per_s: int = 200, seed: int | None = None) -> None:
        from lbagent.portal import TableDriver

        self.tables = TableDriver()
        self.flows_per_s = flows_per_s
        self.rng = np.random.default_rng(seed)
        self._state = None
        self._lock = threading.Lock()
        self._load = {"packets": 0, "new_flows": 0, "slowpath_decisions": 0, "flow_records": 0}
        self._per_backend: dict[str, int] = {}
        self._old_tables: dict[tuple, np.ndarray] = {}

    def apply(self, state) -> None:
        self.tables.apply(state)
        self._state = state

    def counters(self) -> Mapping[str, int]:
        with self._lock:
            return {**self.tables.counters(), **self._load, **self._per_backend, "simulated": 1}

    def tick(self, seconds: float) -> None:
        """Send `seconds` worth of synthetic new flows through every applied listener's table."""
        state = self._state
        if state is None:
            return
        from lbagent.core.flowhash import flow_buckets
        from lbagent.core.maglev import maglev_table

        count = max(1, int(self.flows_per_s * seconds))
        for vip, listener in state.listeners():
            table = self.tables.tables.get(listener.id)
            dst = _ipv4(vip.address)
            if table is None or dst is None:
                continue
            serving = [b for b in listener.backends if b.state == "active" and b.weight > 0]
            src = CLIENT_NET + self.rng.integers(0, 1 << 17, count)
            sport = self.rng.integers(1024, 65536, count)
            buckets = flow_buckets(
                src,
                dst,
                PROTO_NUMBERS.get(listener.protocol, 6),
                sport,
                listener.port,
                seed=state.cluster.hash_seed,
                table_size=state.cluster.table_size,
            )
            chosen = np.bincount(np.asarray(table)[buckets], minlength=len(serving))
            unstable = 0
            previous = listener.previous
            if previous is not None and previous.drain_deadline > time.time():
                old = [b for b in previous.backends if b.state == "active" and b.weight > 0]
                if old:
                    key = (state.cluster.table_size, tuple((b.address, b.port, b.weight) for b in old))
                    if key not in self._old_tables:
                        self._old_tables = {
                            key: maglev_table(  # one transition at a time is the usual case
                                [f"{b.address}:{b.port}" for b in old],
                                [b.weight for b in old],
                                table_size=state.cluster.table_size,
                            )
                        }
                    old_table = self._old_tables[key]
                    old_names = np.asarray([f"{b.address}:{b.port}" for b in old], dtype=object)
                    new_names = np.asarray([f"{b.address}:{b.port}" for b in serving], dtype=object)
                    unstable = int(
                        np.count_nonzero(
                            old_names[old_table[buckets]] != new_names[np.asarray(table)[buckets]]
                        )
                    )
            with self._lock:
                self._load["new_flows"] += count
                self._load["packets"] += count * PACKETS_PER_FLOW
                self._load["slowpath_decisions"] += unstable
                self._load["flow_records"] += unstable
                for index, backend in enumerate(serving):
                    name = backend_counter_name(listener.id, backend.address, backend.port)
                    if len(name) > COUNTER_NAME_MAX:
                        continue
                    if name not in self._per_backend and len(self._per_backend) >= BACKEND_COUNTERS_MAX:
                        continue
                    self._per_backend[name] = self._per_backend.get(name, 0) + int(chosen[index])


async def run_demo_agent(
    url: str, token: str, node: str, *, flows_per_s: int, stats_interval_s: float
) -> None:
    from lbagent.portal import PortalClient

    driver = SimulatedLoadDriver(flows_per_s=flows_per_s)
    client = PortalClient(
        url,
        token,
        driver,
        node=node,
        role="mux",
        stats_interval_s=stats_interval_s,
        health_checks=False,  # the demo backends do not exist: probing them would only mark them down
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, client.stop)

    async def load() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            driver.tick(now - last)
            last = now

    generator = asyncio.create_task(load())
    try:
        await client.run()
    finally:
        generator.cancel()


def _die_with_parent() -> None:
    """Child side of Popen: get SIGTERM when the portal process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class DemoAgents:
    """Runs one `python -m lbagent.demo` process per demo mux; stopped by PID with the portal."""

    def __init__(self, url: str, token_files: Mapping[str, Path], *, log_dir: Path | None = None) -> None:
        self.url = url
        self.token_files = dict(token_files)
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for node, token_file in sorted(self.token_files.items()):
            log = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"{node}.log", "ab")  # noqa: SIM115 - the child owns it
            self.processes[node] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lbagent.demo",
                    "--portal",
                    self.url,
                    "--token-file",
                    str(token_file),
                    "--node",
                    node,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            logger.info("demo mux %s started (pid %s)", node, self.processes[node].pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for node, process in self.processes.items():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("demo mux %s (pid %s) did not stop; killing it", node, process.pid)
                process.kill()
                process.wait()
        self.processes.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbagent.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--portal", required=True, help="ws:// URL of the portal's /ws/agents/")
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument(
        "--flows-per-s", type=int, default=200, help="synthetic new flows per listener per second"
    )
    parser.add_argument("--stats-interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.flows_per_s < 1:
        parser.error(f"--flows-per-s: {args.flows_per_s} is not a positive number of flows")
    logging.basicConfig(
        level=os.environ.get("LBAGENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    from lbagent.portal import read_token_file

    asyncio.run(
        run_demo_agent(
            args.portal,
            read_token_file(args.token_file),
            args.node,
            flows_per_s=args.flows_per_s,
            stats_interval_s=args.stats_interval,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
