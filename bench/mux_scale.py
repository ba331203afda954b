"""One mux's kernel data plane at scale: N VIPs x 4 TCP listeners x 8 backends loaded into real
nftables (a throwaway network namespace), through the driver the daemon uses (NftDataplane:
libnftables for rules, netlink messages for elements, counters and deletions).

The table format: shared sets keyed by each listener's slot (lbagent/dataplane/nft.py). For each
listener count (10, 100 and N x 4) on an empty table: the time of the whole-document
load, the kernel memory per listener, and the time of one change of each kind, five each on
different listeners: `add` (a ninth backend: a transition with its unstable set, the new
backend's counter and buckets) and `drain` (the eighth backend out of the current table, still
draining), each applied as the daemon applies it (the changed plan named: the driver does not
look at the others). Then the process's peak RSS (the driver, its plans and libnftables: what the daemon
holds for the data plane) and its RSS after the load.

Baseline in the same run: an earlier driver's nft.py, taken from git (`--baseline-commit`;
default 588fb88, the format before per-listener sets: one chain per backend reached through a
`cur_` verdict map; 8908326 is the per-listener-set format the shared sets replaced), on the same
tables, at 10 and 100 listeners (and N x 4 with --baseline-top); each driver in its own process
so its RSS is its own.

Kernel memory: /proc/meminfo's MemTotal - MemFree - Buffers - Cached - AnonPages (memory neither
page cache nor user pages: slab, vmalloc, large kmallocs) before the load and after, settled
(nf_tables frees sets after an RCU grace period). Machine-wide: other processes add noise, which
divided by 10 listeners is large; the figure at the largest N is the one to read.

Run as root:  .venv/bin/python bench/mux_scale.py [--vips 1000] [--cap 64] [--baseline-top]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lbagent.core.maglev import maglev_table  # noqa: E402
from lbagent.state import table_size_for_cap  # noqa: E402

BASELINE_COMMIT = "588fb88"
PORTS = (80, 443, 8080, 8443)
BACKENDS = 8


def kernel_used_bytes() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemFree"] - info["Buffers"] - info["Cached"] - info["AnonPages"]


def settled_kernel_used() -> int:
    """Kernel memory once nf_tables' deferred frees are done: read until two reads 0.5 s apart
    agree within 2 MiB (at most 20 s)."""
    last = kernel_used_bytes()
    for _ in range(40):
        time.sleep(0.5)
        now = kernel_used_bytes()
        if abs(now - last) < 2 << 20:
            return now
        last = now
    return last


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def plans_for(module, listeners: int, table: np.ndarray) -> list:
    plans = []
    for i in range(listeners):
        vip, port = divmod(i, len(PORTS))
        backends = tuple((f"10.{(vip >> 8) & 255}.{vip & 255}.{j + 1}", f"02:00:{(vip >> 8) & 255:02x}:"
                          f"{vip & 255:02x}:00:{j + 1:02x}") for j in range(BACKENDS))
        plans.append(module.ListenerPlan(i + 1, f"198.18.{(vip >> 8) & 255}.{vip & 255}", "tcp", PORTS[port],
                                         backends, table, pin_timeout_s=7440,
                                         pin_macs=tuple(m for _, m in backends)))
    return plans


def one_change(module, plans: list, index: int, table: np.ndarray, kind: str, tables: dict) -> list:
    """The plans with listener `index` changed: `add` gives it a ninth backend (a transition
    from `table`: its buckets, unstable set and counter); `drain` takes its eighth backend out
    of the current table (a transition: the backend stays while its connections drain)."""
    p = plans[index]
    if kind == "add":
        backends = (*p.backends, (p.backends[0][0].rsplit(".", 1)[0] + ".99", "02:00:00:00:00:99"))
        new = tables["add"]
    else:
        backends = p.backends
        new = tables["drain"]
    changed = module.ListenerPlan(p.listener_id, p.vip, p.protocol, p.port, backends, new, table,
                                  np.flatnonzero(new != table), pin_timeout_s=p.pin_timeout_s,
                                  pin_macs=tuple(m for _, m in backends))
    return [*plans[:index], changed, *plans[index + 1:]]


def measure(module, listeners: int, size: int, legacy: bool) -> dict:
    """Empty table -> load `listeners` -> five single changes of each kind -> delete the table."""
    names = [f"b{j}" for j in range(BACKENDS)]
    table = maglev_table(names, None, size)
    tables = {"add": maglev_table([*names, "b99"], None, size),
              "drain": maglev_table(names[:-1], None, size)}
    nft = module.Nft()
    with __import__("contextlib").suppress(module.NftError):
        nft.run(f"delete table netdev {module.TABLE}\n")
    before = settled_kernel_used()
    plans = plans_for(module, listeners, table)
    dp = module.NftDataplane("eth0", "02:aa:00:00:00:01", seed=0x5EED, nft=nft, nflog_group=7,
                             elements=module.NetlinkElements())
    t0 = time.perf_counter()
    dp.apply(plans)
    load_s = time.perf_counter() - t0
    rss_after_load = rss_bytes()
    loaded = settled_kernel_used()
    lookup_ms = {} if legacy else set_lookup_probe(module, dp, plans)
    changes: dict[str, list[float]] = {"add": [], "drain": []}
    for k in range(10):
        kind = "add" if k % 2 == 0 else "drain"
        index = (k * 7919) % listeners
        plans = one_change(module, plans, index, table, kind, tables)
        # The daemon names the plans it made anew (the baseline drivers take no such hint).
        hints = {} if legacy else {"changed": [plans[index]], "removed": ()}
        t0 = time.perf_counter()
        dp.apply(plans, **hints)
        changes[kind].append(time.perf_counter() - t0)
    nft.run(f"delete table netdev {module.TABLE}\n")
    row = {"listeners": listeners, "table_size": size, "load_s": round(load_s, 3),
           "kernel_mib_per_listener": round((loaded - before) / listeners / 2**20, 3),
           "kernel_mib_total": round((loaded - before) / 2**20, 1),
           "transactions": getattr(dp, "transactions", None),
           "netlink_transactions": getattr(dp, "netlink_transactions", None),
           "rss_after_load_mib": round(rss_after_load / 2**20, 1),
           "lookup_first_ms": lookup_ms.get("first"), "lookup_last_ms": lookup_ms.get("last")}
    for kind, times in changes.items():
        row[f"{kind}_ms_median"] = round(statistics.median(times) * 1000, 1)
        row[f"{kind}_ms_max"] = round(max(times) * 1000, 1)
    return row


def set_lookup_probe(module, dp, plans: list, messages: int = 100) -> dict[str, float]:
    """What one element message costs the kernel for the first listener loaded and the last:
    `messages` one-element batches (one transaction each, on a kept socket) to the shared
    `unstable` set under each one's slot, each element added and deleted again. nf_tables finds
    a set by walking the table's list of sets by name (in creation order); with per-listener
    sets (main before the shared sets: 4 per listener) the last listener's set cost a walk over
    all the others, what made a full load superlinear and a change slower at 4,000 listeners.
    The shared sets are the table's first: both ends should cost the same."""
    from lbagent.dataplane.nftlink import NetlinkElements, Op

    name = module.shared_name("unstable", dp.generation)
    writer = NetlinkElements()
    out = {}
    try:
        for which, plan in (("first", plans[0]), ("last", plans[-1])):
            base = module.slot_base(dp.slot_of(plan.listener_id))
            started = time.perf_counter()
            for k in range(messages):
                writer.run(module.TABLE, [Op("add", name, np.array([base + k]))])
                writer.run(module.TABLE, [Op("delete", name, np.array([base + k]))])
            out[which] = round((time.perf_counter() - started) * 1000 / (2 * messages), 3)
    finally:
        writer.close()
    return out


def load_module(legacy: bool, commit: str = BASELINE_COMMIT):
    if not legacy:
        from lbagent.dataplane import nft
        return nft
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:lbagent/dataplane/nft.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="muxscale")) / "nft_legacy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("nft_legacy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nft_legacy"] = module
    spec.loader.exec_module(module)
    return module


def inside(args: argparse.Namespace) -> None:
    """Runs in the namespace: one driver (new or legacy), each listener count in turn."""
    module = load_module(args.legacy, args.baseline_commit)
    # The probe needs the shared sets (the per-listener format has its own names); the legacy
    # driver's rows have none.
    probe = not args.legacy
    rows = [measure(module, n, size, not probe) for n, size in json.loads(args.runs)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"driver": "baseline " + args.baseline_commit if args.legacy else "shared sets",
                      "rows": rows, "peak_rss_mib": round(peak / 2**20, 1),
                      "rss_end_mib": round(rss_bytes() / 2**20, 1)}))


def run_in(netns: str, runs: list[tuple[int, int]], legacy: bool, commit: str = BASELINE_COMMIT) -> dict:
    argv = ["ip", "netns", "exec", netns, sys.executable, __file__, "--inside", "--runs", json.dumps(runs),
            "--baseline-commit", commit]
    if legacy:
        argv.append("--legacy")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed in {netns}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vips", type=int, default=1000, help="VIPs of 4 TCP listeners each (default 1000)")
    parser.add_argument("--cap", type=int, default=64, help="backend cap: table size = prime > 100 x cap")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-top", action="store_true",
                        help="also run the baseline at VIPs x 4 listeners (about 6 minutes at 1,000 VIPs)")
    parser.add_argument("--also", type=int, nargs="*", default=[], help="more listener counts to measure")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT,
                        help=f"the commit whose nft.py is the baseline (default {BASELINE_COMMIT}; "
                        "8908326: the per-listener sets)")
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root (it makes a network namespace)")
    size = table_size_for_cap(args.cap)
    top = args.vips * len(PORTS)
    netns = f"dcscale{os.getpid()}{uuid.uuid4().hex[:4]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                       check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
        counts = sorted({10, 100, top, *args.also})
        results = [run_in(netns, [(n, size) for n in counts], legacy=False)]
        if not args.no_baseline:
            base = sorted({10, 100, *args.also, *([top] if args.baseline_top else [])})
            results.append(run_in(netns, [(n, size) for n in base], legacy=True, commit=args.baseline_commit))
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(f"mux_scale: {args.vips} VIPs x {len(PORTS)} TCP listeners x {BACKENDS} backends, backend cap "
          f"{args.cap} -> table size {size}; noisy shared 2-core machine")
    print(f"{'driver':<16} {'listeners':>9} {'table':>6} {'load s':>8} {'kernel MiB/lst':>14} "
          f"{'add ms p50':>10} {'max':>7} {'drain ms p50':>12} {'max':>7} {'RSS after load MiB':>18}")
    for result in results:
        for row in result["rows"]:
            print(f"{result['driver']:<16} {row['listeners']:>9} {row['table_size']:>6} {row['load_s']:>8} "
                  f"{row['kernel_mib_per_listener']:>14} {row['add_ms_median']:>10} {row['add_ms_max']:>7} "
                  f"{row['drain_ms_median']:>12} {row['drain_ms_max']:>7} {row['rss_after_load_mib']:>18}")
        print(f"{result['driver']:<16} peak RSS {result['peak_rss_mib']} MiB, "
              f"at the end {result['rss_end_mib']} MiB")
        for row in result["rows"]:
            if row.get("lookup_first_ms") is not None:
                print(f"{result['driver']:<16} {row['listeners']:>5} listeners: one one-element transaction "
                      "to the shared unstable set under the first listener's slot "
                      f"{row['lookup_first_ms']} ms, "
                      f"under the last one's {row['lookup_last_ms']} ms (the kernel finds a set by name "
                      "in a list: the shared sets head it)")
    if len(results) == 2:  # the ratio at each listener count both drivers ran
        base_rows = {row["listeners"]: row for row in results[1]["rows"]}
        for row in results[0]["rows"]:
            b = base_rows.get(row["listeners"])
            if b is None:
                continue
            measures = (("load", "load_s"), ("add p50", "add_ms_median"), ("drain p50", "drain_ms_median"))
            ratios = ", ".join(f"{label} {row[key] / b[key]:.2f}" for label, key in measures if b[key])
            print(f"shared sets / {results[1]['driver']} at {row['listeners']} listeners: {ratios}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
