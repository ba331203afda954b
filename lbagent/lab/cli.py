"""`lbagent lab up|down|status`: build, remove and list labs (see lbagent.lab.topology)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lbagent.lab import topology


def write_desired_states(lab: topology.Lab) -> dict[str, Path]:
    """One ready desired-state document per mux (`<run_dir>/<mux>.state.json`): VIP 203.0.113.10,
    listener 1 (TCP 80) on the first three backends, 30 s drain; `lbagent run --config` takes it
    as it is, `lbagent state add-backend|drain-backend|remove-backend` edits it."""
    from lbagent.lab.harness import backend_doc, listener_doc, state_doc, vip_doc

    vip = vip_doc(lab.vips[0] if lab.vips else "203.0.113.10",
                  [listener_doc(1, [backend_doc(b) for b in lab.backends[:3]], generation=1,
                                drain_timeout_s=30)])
    files: dict[str, Path] = {}
    for mux in lab.muxes:
        path = Path(lab.run_dir) / f"{mux.name}.state.json"
        path.write_text(json.dumps(state_doc(lab, mux.name, [vip]), indent=1) + "\n")
        files[mux.name] = path
    return files


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
        files = write_desired_states(lab)
        print(json.dumps({"prefix": lab.prefix, "run_dir": lab.run_dir, "namespaces": lab.namespaces,
                          "vips": lab.vips, "pids": lab.pids,
                          "desired_state_files": {name: str(path) for name, path in files.items()},
                          "desired_state": json.loads(next(iter(files.values())).read_text())}, indent=1))
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
