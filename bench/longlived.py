"""Long-lived connections at the default lifetimes, in a fresh lab (needs root): the proof that
goes with tests/lab/test_longlived.py, which shortens every lifetime by configuration.

200 TCP connections exchange a line every second through both muxes. A backend is added (the
listener's default drain, the default flow idle timeout: nothing shortened); the connections
keep going for `--after` seconds (default 3x the longest lifetime this run can afford to wait
out: the drain and the 60 s the pins used to live), then mux-1's daemon and its ExaBGP are
killed with SIGKILL and they keep going `--after-kill` seconds through mux-2 alone. Same-run
baseline: the same add with the daemons run with `--no-transitions` (stateless Maglev).

Usage (as root): .venv/bin/python bench/longlived.py [--connections 200] [--after 180]
       [--after-kill 60] [--baseline-s 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent.lab import topology
from lbagent.lab.harness import LabCluster, LongConnections, backend_doc, listener_doc, vip_doc, wait_route
from lbagent.state import DEFAULT_FLOW_IDLE_TIMEOUT_S

VIP = "203.0.113.13"
LISTENER = 1
DRAIN_S = 30  # the listener default of the desired-state document


def _wait_rounds_after(conns: LongConnections, moment: float, bound_s: float) -> None:
    limit = time.monotonic() + bound_s
    while not (conns.round_started and conns.round_started[-1] >= moment):
        if time.monotonic() > limit:
            raise TimeoutError(f"no exchange round started after {moment}")
        time.sleep(0.2)
    conns.settle(1)


def _run(cluster: LabCluster, lab: topology.Lab, count: int, after_s: float,
         after_kill_s: float | None) -> dict:
    web1, web2, web3, web4 = lab.backends[:4]
    gen1 = [backend_doc(web1), backend_doc(web2), backend_doc(web3)]
    cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, gen1, generation=1, drain_timeout_s=DRAIN_S)]))
    wait_route(lab, VIP, [m.address for m in lab.muxes])
    conns = LongConnections(lab.clients[0].netns, VIP, count, interval_s=1.0)
    out: dict = {"connections": count}
    try:
        conns.start_background()
        previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + DRAIN_S}
        changed = time.time()
        cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, [*gen1, backend_doc(web4)], generation=2,
                                                   drain_timeout_s=DRAIN_S, previous=previous)]))
        _wait_rounds_after(conns, changed + after_s, after_s + 120)
        out["after_add_s"] = round(time.time() - changed, 1)
        out["broken_after_add"] = len(conns.broken)
        out["records"] = cluster.total("lbagent_flow_records")
        out["lingering_muxes"] = cluster.total("lbagent_listeners_lingering")
        if after_kill_s is not None:
            victim, survivor = cluster.muxes
            victim.kill9_with_bgp()
            wait_route(lab, VIP, [survivor.mux.address], timeout_s=60)
            killed = time.time()
            _wait_rounds_after(conns, killed + after_kill_s, after_kill_s + 120)
            out["after_kill_s"] = round(time.time() - killed, 1)
            out["broken_after_kill"] = len(conns.broken) - out["broken_after_add"]
            out["answered_from_records"] = survivor.metric("lbagent_slowpath_decisions_total",
                                                           reason="local_record")
    finally:
        conns.close()
        cluster.remove_vip(VIP)
    out["broken"] = len(conns.broken)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--after", type=float, default=3 * max(DRAIN_S, 60),
                        help="seconds the connections run after the add (default 3x max(drain, 60 s))")
    parser.add_argument("--after-kill", type=float, default=60)
    parser.add_argument("--baseline-s", type=float, default=15, help="seconds of the stateless baseline")
    args = parser.parse_args()
    lab = topology.build()
    cluster = LabCluster(lab, learn=False)
    results: dict = {"drain_timeout_s": DRAIN_S, "flow_idle_timeout_s": DEFAULT_FLOW_IDLE_TIMEOUT_S["tcp"]}
    try:
        cluster.start()
        results["with_transitions"] = _run(cluster, lab, args.connections, args.after, args.after_kill)
        for mux in cluster.muxes:
            cluster.restart(mux, transitions=False)
        results["baseline_stateless"] = _run(cluster, lab, args.connections, args.baseline_s, None)
    finally:
        try:
            cluster.stop_all()
        finally:
            topology.teardown(lab)
    w, b = results["with_transitions"], results["baseline_stateless"]
    print(json.dumps(results, indent=1))
    print(f"defaults (drain {DRAIN_S} s, idle {results['flow_idle_timeout_s']} s): {w['broken']} of "
          f"{w['connections']} broken over {w['after_add_s']} s after an add and {w.get('after_kill_s')} s "
          f"after kill -9 of a mux; same-run stateless baseline: {b['broken']} of {b['connections']} broken "
          f"{b['after_add_s']} s after the same add")
    return 0 if w["broken"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
