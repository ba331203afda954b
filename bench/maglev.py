"""Benchmark: Maglev table builds and packet decisions, each next to a straightforward baseline
measured in the same run.

    .venv/bin/python bench/maglev.py [--quick]

* build: `maglev_table` with numba (`maglev_table_numba`: the paper's loop compiled), the previous
  pure Python/numpy builder (`maglev_table_numpy`: plain loop + ranked-free-bucket numpy finish,
  the fallback without numba) and `maglev_table_reference` (the paper's pseudocode: full
  permutation lists, one claim per turn), M = 65537, N = 10, 100, 1000, all in the same run. The
  Maglev paper reports 1.8 ms in C++ for M = 65537.
* numba's one-off costs, measured in fresh processes with an empty private cache directory
  (NUMBA_CACHE_DIR): importing numba, compiling the kernel (first process on a machine), and
  loading the cached kernel (every later process, e.g. each daemon start).
* decisions: steady state, vectorised (`flow_buckets` + `decide_stable_batch`) vs the
  per-packet path a naive driver would take (scalar `flow_bucket` + `decide` for every packet);
  and, during a transition, `decide` per packet for unstable buckets (the slow path's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent.core.decide import decide, decide_stable_batch
from lbagent.core.flowhash import flow_bucket, flow_buckets
from lbagent.core.maglev import (
    maglev_table_numba,
    maglev_table_numpy,
    maglev_table_reference,
    numba_kernel,
)
from lbagent.core.ownership import build_ownership
from lbagent.core.transition import ListenerTables, build_generation

M = 65537
SEED = 24301
VIP = 0xCB00710A


def timed(fn, repeat: int) -> float:
    """Best-of-`repeat` wall time of fn() in seconds (median would hide nothing here)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_build(quick: bool) -> None:
    started = time.perf_counter()
    have_numba = numba_kernel() is not None  # import numba + compile or load the cached kernel
    setup_s = time.perf_counter() - started
    print(f"Maglev build, M={M}" + ("" if have_numba else " (numba NOT importable: numpy builder only)"))
    if have_numba:
        print(f"(this process: import numba + compile/load kernel took {setup_s * 1000:.0f} ms before the "
              "timings below; one-off costs in fresh processes at the end)")
    print(f"{'N':>6} {'numba ms':>9} {'numpy ms':>9} {'reference ms':>13} {'numpy/numba':>12} "
          f"{'ref/numba':>10}  same table")
    repeat = 3 if quick else 7
    for n in (10, 100, 1000):
        names = [f"10.{i // 250}.{i % 250}.1:80" for i in range(n)]
        numba_s = timed(lambda names=names: maglev_table_numba(names), repeat * 3) if have_numba else None
        numpy_s = timed(lambda names=names: maglev_table_numpy(names), repeat)
        started = time.perf_counter()
        reference = maglev_table_reference(names)  # once: it takes seconds at N=1000
        ref_s = time.perf_counter() - started
        same = np.array_equal(maglev_table_numpy(names), reference)
        if have_numba:
            same = same and np.array_equal(maglev_table_numba(names), reference)
            print(f"{n:>6} {numba_s * 1000:>9.2f} {numpy_s * 1000:>9.1f} {ref_s * 1000:>13.1f} "
                  f"{numpy_s / numba_s:>11.0f}x {ref_s / numba_s:>9.0f}x  {same}")
        else:
            print(f"{n:>6} {'-':>9} {numpy_s * 1000:>9.1f} {ref_s * 1000:>13.1f} {'-':>12} {'-':>10}  {same}")
    if have_numba:
        bench_numba_startup()


_STARTUP_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
from lbagent.core.maglev import maglev_table, numba_kernel
t2 = time.perf_counter()
numba_kernel()
t3 = time.perf_counter()
maglev_table([f"10.0.{i}.1:80" for i in range(100)])
t4 = time.perf_counter()
print(json.dumps({"import_numba": t1 - t0, "kernel": t3 - t2, "first_table": t4 - t3}))
"""


def bench_numba_startup() -> None:
    """First-call costs in fresh processes sharing an initially empty numba cache directory."""
    with tempfile.TemporaryDirectory(prefix="maglev-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        runs = []
        for _ in range(2):  # 1st: empty cache (compile and write); 2nd: load the cached code
            proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT], capture_output=True,
                                  text=True, env=env, check=True, timeout=300)
            runs.append(json.loads(proc.stdout))
    cold, warm = runs
    print("\nnumba one-off costs per process (fresh processes, private NUMBA_CACHE_DIR):")
    print(f"  first process on a machine (empty cache): import numba {cold['import_numba'] * 1000:.0f} ms"
          f" + compile kernel {cold['kernel'] * 1000:.0f} ms"
          f" + first table {cold['first_table'] * 1000:.1f} ms")
    print(f"  every later process (cache=True hit):     import numba {warm['import_numba'] * 1000:.0f} ms"
          f" + load kernel {warm['kernel'] * 1000:.0f} ms"
          f" + first table {warm['first_table'] * 1000:.1f} ms")


def bench_decisions(quick: bool) -> None:
    rng = np.random.default_rng(1)
    n_packets = 200_000 if quick else 1_000_000
    src = (0x0A000000 + rng.integers(0, 1 << 24, n_packets)).astype(np.uint32)
    sport = rng.integers(1024, 65536, n_packets).astype(np.uint32)
    backends = [f"10.1.0.{i}:80" for i in range(10)]
    g1 = build_generation(1, backends)
    g2 = build_generation(2, [*backends, "10.1.0.10:80"])
    steady = ListenerTables(g1)
    trans = steady.with_generation(g2, drain_deadline=1e12)
    own = build_ownership([f"mux-{i}" for i in range(8)], owner_seed=7919, table_size=M)

    def vectorised():
        buckets = flow_buckets(src, VIP, 6, sport, 80, seed=SEED, table_size=M)
        _needs, ids = decide_stable_batch(steady, buckets)
        return np.asarray(steady.names, dtype=object)[ids]

    n_scalar = 20_000 if quick else 100_000

    def per_packet():
        out = []
        for s, p in zip(src[:n_scalar].tolist(), sport[:n_scalar].tolist(), strict=True):
            b = flow_bucket(s, VIP, 6, p, 80, seed=SEED, table_size=M)
            out.append(decide(tables=steady, bucket=b, is_syn=False, pin=None, local_record=None,
                              owners=own.owners(b), self_mux="mux-0").backend)
        return out

    vec_s = timed(vectorised, 3)
    scalar_s = timed(per_packet, 1)
    vec_rate = n_packets / vec_s
    scalar_rate = n_scalar / scalar_s
    print(f"\nDecisions, steady state ({n_packets} packets vectorised, {n_scalar} per packet)")
    print(f"  vectorised flow_buckets + decide_stable_batch: {vec_rate / 1e6:8.2f} M decisions/s")
    print(f"  per packet flow_bucket + decide (baseline):    {scalar_rate / 1e6:8.3f} M decisions/s")
    print(f"  ratio: {vec_rate / scalar_rate:.0f}x")

    # During a transition: unstable-bucket packets each go through decide() (the slow path).
    buckets = flow_buckets(src, VIP, 6, sport, 80, seed=SEED, table_size=M)
    unstable_idx = np.flatnonzero(trans.unstable[buckets])[:n_scalar]
    ub = buckets[unstable_idx].tolist()

    def slow_path():
        for b in ub:
            decide(tables=trans, bucket=b, is_syn=False, pin=None, local_record=None,
                   owners=own.owners(b), self_mux="mux-0")

    slow_s = timed(slow_path, 3)
    share = float(np.mean(trans.unstable))
    print(f"\nDuring a transition (10 -> 11 backends, {share:.1%} of buckets unstable):")
    print(f"  decide() per unstable-bucket packet: {len(ub) / slow_s / 1e6:.3f} M decisions/s "
          f"(stable buckets stay on the vectorised path)")


def bench_ownership(quick: bool) -> None:
    muxes = [f"mux-{i}" for i in range(8)]
    t = timed(lambda: build_ownership(muxes, owner_seed=7919, table_size=M), 1 if quick else 3)
    print(f"\nOwnership (primary + backup tables) for 8 muxes, M={M}: {t * 1000:.0f} ms "
          f"(9 Maglev builds; rebuilt only when the live mux set changes)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and packets")
    args = parser.parse_args()
    bench_build(args.quick)
    bench_decisions(args.quick)
    bench_ownership(args.quick)
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = "not installed"
    print(f"\nPython {sys.version.split()[0]}, numpy {np.__version__}, numba {numba_version}, "
          f"load average {statistics.mean(os.getloadavg()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
