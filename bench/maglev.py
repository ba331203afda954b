"""Benchmark: Maglev table builds and packet decisions, each next to a straightforward baseline
measured in the same run.

    .venv/bin/python bench/maglev.py [--quick]

* build: `maglev_table` (plain loop + ranked-free-bucket numpy finish) vs
  `maglev_table_reference` (the paper's pseudocode: full permutation lists, one claim per turn),
  M = 65537, N = 10, 100, 1000. The Maglev paper reports 1.8 ms in C++ for M = 65537.
* decisions: steady state, vectorised (`flow_buckets` + `decide_stable_batch`) vs the
  per-packet path a naive driver would take (scalar `flow_bucket` + `decide` for every packet);
  and, during a transition, `decide` per packet for unstable buckets (the slow path's cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent.core.decide import decide, decide_stable_batch
from lbagent.core.flowhash import flow_bucket, flow_buckets
from lbagent.core.maglev import maglev_table, maglev_table_reference
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
    print(f"Maglev build, M={M}")
    print(f"{'N':>6} {'fast ms':>9} {'reference ms':>13} {'ratio':>7}  same table")
    for n in (10, 100, 1000):
        names = [f"10.{i // 250}.{i % 250}.1:80" for i in range(n)]
        fast_s = timed(lambda names=names: maglev_table(names), 3 if quick else 7)
        started = time.perf_counter()
        reference = maglev_table_reference(names)  # once: it takes seconds at N=1000
        ref_s = time.perf_counter() - started
        same = bool(np.array_equal(maglev_table(names), reference))
        print(f"{n:>6} {fast_s * 1000:>9.1f} {ref_s * 1000:>13.1f} {ref_s / fast_s:>6.0f}x  {same}")


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
    print(f"\nPython {sys.version.split()[0]}, numpy {np.__version__}, "
          f"load average {statistics.mean(__import__('os').getloadavg()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
