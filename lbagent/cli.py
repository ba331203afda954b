"""The `lbagent` command: build and inspect Maglev tables, run the simulator, and (through their
own modules) run the agent daemon and the namespace lab.

    lbagent table --backends a,b,c [--weights 1,1,2] [--to a,b,c,d] [--table-size 65537]
    lbagent simulate [--scenario add|drain|remove|two_changes|mux_failure|mux_added|all] [--flows N]
    lbagent run ...      -> lbagent.daemon:main
    lbagent lab ...      -> lbagent.lab.cli:main
    lbagent validate FILE...             -> lbagent.config_edit:validate_main
    lbagent state add-backend|drain-backend|remove-backend FILE... -> lbagent.config_edit:main
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from lbagent.core.maglev import DEFAULT_TABLE_SIZE, maglev_table, moved_share

# Subcommands owned by other modules, imported only when used (they pull in heavier deps).
DELEGATED = {"run": "lbagent.daemon", "lab": "lbagent.lab.cli",
             "validate": "lbagent.config_edit:validate_main", "state": "lbagent.config_edit"}


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


def _int_csv(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lbagent", description="Load-balancer agent tools.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("table", help="build a Maglev table, show its balance and what a change moves")
    t.add_argument("--backends", type=_csv, required=True, help="ordered backend names, comma-separated")
    t.add_argument("--weights", type=_int_csv, help="weights, comma-separated (default: all 1)")
    t.add_argument("--to", type=_csv, help="a second backend set: report the share of buckets that move")
    t.add_argument("--to-weights", type=_int_csv, help="weights of the --to set")
    t.add_argument("--table-size", type=int, default=DEFAULT_TABLE_SIZE, help="prime number of buckets")
    t.add_argument("--seed", type=int, default=0, help="table seed (the ownership table uses another)")
    t.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("simulate", help="run muxes, router and clients through a backend change")
    s.add_argument("--scenario", default="all",
                   help="add, drain, remove, two_changes, mux_failure, mux_added, or all")
    s.add_argument("--flows", type=int, default=100_000, help="established flows before the change")
    s.add_argument("--muxes", type=int, default=8)
    s.add_argument("--backends", type=int, default=10)
    s.add_argument("--new-flows", type=int, default=2_000, help="new flows per traffic round")
    s.add_argument("--table-size", type=int, default=DEFAULT_TABLE_SIZE)
    s.add_argument("--no-baseline", action="store_true", help="skip the stateless-Maglev baseline")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("run", help="run the agent daemon (see `lbagent run --help`)", add_help=False)
    sub.add_parser("lab", help="network-namespace lab (see `lbagent lab --help`)", add_help=False)
    sub.add_parser("validate", help="check desired-state files as the daemon does", add_help=False)
    sub.add_parser("state", help="add, drain or remove a backend in desired-state files", add_help=False)
    return p


def cmd_table(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    table = maglev_table(args.backends, args.weights, args.table_size, seed=args.seed)
    build_ms = (time.perf_counter() - started) * 1000
    n = len(args.backends)
    counts = np.bincount(table, minlength=n)
    weights = args.weights or [1] * n
    expected = args.table_size * np.array(weights, dtype=float) / sum(weights)
    rows = [{"backend": name, "weight": w, "buckets": int(c), "share": c / args.table_size,
             "deviation": (c - e) / e if e else 0.0}
            for name, w, c, e in zip(args.backends, weights, counts, expected, strict=True)]
    out: dict = {"table_size": args.table_size, "build_ms": round(build_ms, 2), "backends": rows}
    if args.to:
        to_table = maglev_table(args.to, args.to_weights, args.table_size, seed=args.seed)
        out["to"] = args.to
        out["moved_share"] = moved_share(args.backends, table, args.to, to_table)
        removed = set(args.backends) - set(args.to)
        added = set(args.to) - set(args.backends)
        ideal = sum(counts[args.backends.index(r)] for r in removed) / args.table_size
        if added and not removed and not args.weights and not args.to_weights:
            ideal = len(added) / len(args.to)
        out["ideal_moved_share"] = ideal
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"table of {args.table_size} buckets over {n} backends, built in {build_ms:.1f} ms")
    print(f"{'backend':<24} {'weight':>6} {'buckets':>8} {'share':>8} {'vs fair':>8}")
    for r in rows:
        print(f"{r['backend']:<24} {r['weight']:>6} {r['buckets']:>8} {r['share']:>8.4f} "
              f"{r['deviation']:>+8.2%}")
    if args.to:
        print(f"to {','.join(args.to)}: {out['moved_share']:.4%} of buckets move "
              f"(minimum possible about {out['ideal_moved_share']:.4%})")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from lbagent.dataplane.sim import SCENARIOS, SimConfig, run_scenarios

    names = list(SCENARIOS) if args.scenario == "all" else _csv(args.scenario)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"lbagent simulate: unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}, all",
              file=sys.stderr)
        return 2
    if args.flows < 1 or args.muxes < 2 or args.backends < 2:
        print("lbagent simulate: need --flows >= 1, --muxes >= 2, --backends >= 2", file=sys.stderr)
        return 2
    config = SimConfig(flows=args.flows, muxes=args.muxes, backends=args.backends,
                       new_flows_per_round=args.new_flows, table_size=args.table_size)
    results = run_scenarios(names, config, baseline=not args.no_baseline)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    print(f"{args.flows} established flows, {args.muxes} muxes, {args.backends} backends, "
          f"M={args.table_size}")
    head = (f"{'scenario':<12} {'mode':<9} {'flows':>7} {'broken':>7} {'lost*':>6} {'unstable':>8} "
            f"{'st.steady':>9} {'rec.peak':>8} {'pins.peak':>9} {'st.after':>8} {'queries':>8} "
            f"{'timeouts':>8} {'wall s':>7}")
    print(head)
    for r in results:
        print(f"{r.scenario:<12} {'stateful' if r.stateful else 'stateless':<9} {r.flows:>7} {r.broken:>7} "
              f"{r.lost_with_backend:>6} {r.unstable_flows:>8} {r.records_steady:>9} {r.records_peak:>8} "
              f"{r.pins_peak:>9} {r.records_after:>8} {r.peer_queries:>8} {r.peer_timeouts:>8} "
              f"{r.wall_s:>7.1f}")
    print("lost* = flows whose own backend was removed (not counted as broken). unstable = established "
          "flows in buckets that moved.\nst.steady / st.after = flow records + pins on all muxes before "
          "the change / after the last drain deadline;\nrec.peak = flow records (owner and backup "
          "copies) during the transition; pins.peak = per-mux pins.")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module_name, _, function = DELEGATED[command].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"lbagent {command}: {module_name} is not available ({exc})", file=sys.stderr)
        return 2
    main_fn = getattr(module, function or "main", None)
    if main_fn is None:
        print(f"lbagent {command}: {module_name} has no main()", file=sys.stderr)
        return 2
    return int(main_fn(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return _delegate(args_list[0], args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        if args.command == "table":
            return cmd_table(args)
        return cmd_simulate(args)
    except ValueError as exc:
        print(f"lbagent {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
