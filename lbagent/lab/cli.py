"""`lbagent lab up|down|status`: build, remove and list labs (see lbagent.lab.topology)."""

from __future__ import annotations

import argparse
import json
import sys

from lbagent.lab import topology


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbagent lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab and print its description (JSON)")
    up.add_argument("--prefix", help="namespace prefix (default: dcl + 4 random hex digits)")
    up.add_argument("--muxes", type=int, default=2)
    up.add_argument("--backends", type=int, default=4)
    up.add_argument("--clients", type=int, default=1)
    down = sub.add_parser("down", help="remove labs made by this tool (all, or the named ones)")
    down.add_argument("prefixes", nargs="*")
    sub.add_parser("status", help="list the labs this tool made")
    args = parser.parse_args(argv)

    if args.command == "up":
        lab = topology.build(prefix=args.prefix, mux_count=args.muxes, backend_count=args.backends,
                             client_count=args.clients)
        print(json.dumps({"prefix": lab.prefix, "run_dir": lab.run_dir, "namespaces": lab.namespaces,
                          "vips": lab.vips, "pids": lab.pids}, indent=1))
        return 0
    if args.command == "down":
        for prefix in args.prefixes or topology.known_labs():
            topology.teardown(topology.Lab.load(prefix))
            print(f"removed {prefix}")
        return 0
    for prefix in topology.known_labs():
        lab = topology.Lab.load(prefix)
        alive = {k: topology._alive(p) for k, p in lab.pids.items()}
        print(json.dumps({"prefix": prefix, "namespaces": lab.namespaces, "processes_alive": alive}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
