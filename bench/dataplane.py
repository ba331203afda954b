"""Kernel data-plane benchmark in a fresh lab (needs root): every figure next to its baseline
measured in the same run.

1. TCP throughput client -> VIP through a mux (nftables DSR) vs client -> backend directly
   (iperf3, same router, same backend): ratio, goal >= 0.9.
2. Small-packet UDP (64-byte payloads) through a mux vs directly: packets/s received.
   1 and 2 also over IPv6 in the same run (an IPv6 VIP, the backend's IPv6 address for the
   direct path), the IPv4 and IPv6 runs alternated.
3. New flows during a transition (SYNs of distinct flows, all in unstable buckets, pre-built
   frames sent at one mux by several sender processes): the rate at which the kernel pins and
   forwards them (decision rule 3's SYN case compiled into nft), and the rate at which they end
   up recorded at their owner mux (nfnetlink_log -> daemon -> peer protocol), next to the
   offered load and next to the same SYNs sent to a listener not in transition (rule 2, the
   steady path). Goal >= 50,000 flows/s. Then the same flood with both daemons paused (the
   kernel and the senders alone on the cores), and the records drained once they resume.
4. The remaining userspace path: non-SYN packets of unknown flows in unstable buckets (NFQUEUE,
   decide, ask the owner, re-inject), packets/s.
5. Beside ours (after 2): IPVS in direct-routing mode with its Maglev scheduler in the same mux
   namespace, to the same backend (bench/ipvs.py): TCP, 64 B UDP, new connections/s; on a kernel
   without IPVS it prints why and measures nothing.

Usage: sudo .venv/bin/python bench/dataplane.py [--seconds 3] [--repeats 10] [--streams 1]
       [--flows 200000] [--senders 2] [--throughput-only]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ipvs  # bench/ipvs.py, beside this script

from lbagent.core.flowhash import flow_buckets, ipv4_to_int
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.dataplane.nft import read_counters
from lbagent.lab import netns, topology
from lbagent.lab.flood import TCP_ACK, send_frames, tcp_frames, unstable_flows
from lbagent.lab.harness import (
    HASH_SEED,
    TABLE_SIZE,
    LabCluster,
    backend_doc,
    listener_doc,
    vip_doc,
    wait_route,
)

IPERF_PORT = 5201
VIP_IPERF = "203.0.113.13"
VIP_SLOW = "203.0.113.14"
VIP_IPVS = "203.0.113.19"  # served by IPVS in mux-1's namespace (bench/ipvs.py), never by our daemon
VIP6_IPERF = "2001:db8:113::13"


def iperf(lab: topology.Lab, target: str, seconds: int, udp: bool = False, streams: int = 1) -> dict:
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-P", str(streams)]
    if udp:
        argv += ["-u", "-b", "0", "-l", "64"]
    else:
        argv += ["-O", "1"]  # leave slow start out of the figure (both paths alike)
    out = netns.run(argv, netns=lab.clients[0].netns, timeout_s=seconds + 30, check=False).stdout
    result = json.loads(out)
    if "error" in result:
        raise RuntimeError(f"iperf3 to {target} ({'udp' if udp else 'tcp'}): {result['error']}")
    return result


def tcp_gbps(result: dict) -> float:
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_pps(result: dict, seconds: int) -> float:
    s = result["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def syn_frames(dst_mac: str, src_mac: str, flows: list[tuple[int, int]], vip: str) -> list[bytes]:
    return tcp_frames(dst_mac, src_mac, flows, vip)


def settle(read: Callable[[], float], start: float, idle_s: float = 1.0) -> tuple[float, float]:
    """Poll a counter until it has not moved for `idle_s`; (final value, monotonic time of its
    last change)."""
    last, last_change = read(), time.monotonic()
    if last == start:
        last_change = time.monotonic()
    while time.monotonic() - last_change < idle_s:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, last_change = now, time.monotonic()
    return last, last_change


def settle_together(reads: dict[str, Callable[[], float]],
                    idle_s: dict[str, float]) -> dict[str, tuple[float, float]]:
    """`settle` for several counters polled side by side: {name: (final value, monotonic time
    of its last change)} once each has not moved for its `idle_s`. Settling them one after the
    other would date a counter that finished during the first one's idle wait at the moment its
    own polling began, not when it really stopped moving."""
    now = time.monotonic()
    state = {name: (read(), now) for name, read in reads.items()}
    while any(time.monotonic() - changed < idle_s[name] for name, (_, changed) in state.items()):
        time.sleep(0.05)
        for name, read in reads.items():
            value = read()
            if value != state[name][0]:
                state[name] = (value, time.monotonic())
    return state


def python_cost_per_packet(tables: ListenerTables, count: int = 20_000) -> tuple[float, float]:
    """(us per slow-path packet in Python alone: parse, decide, record, build the frame; us per
    iteration of an empty Python loop on this machine, to compare machines)."""
    from lbagent.core.ownership import build_ownership
    from lbagent.core.records import RecordStore
    from lbagent.dataplane.slowpath import CoreDecider, SlowListener, SlowPath

    names = list(tables.names)
    decider = CoreDecider("mux-1", RecordStore(max_records=count * 2),
                          build_ownership(["mux-1"], owner_seed=7919, table_size=TABLE_SIZE))
    path = SlowPath("lo", "02:00:00:00:00:01", 0, decider=decider)
    path.update([SlowListener(3, VIP_SLOW, "tcp", 80, tables, {n: "02:00:00:00:00:02" for n in names},
                              time.time() + 600)])

    class NoSend:
        def send(self, frame: bytes) -> None:
            pass

    class FakePacket:  # only the NetfilterQueue calls the slow path makes; no kernel involved
        __slots__ = ("data", "mark")

        def __init__(self, data: bytes, mark: int) -> None:
            self.data, self.mark = data, mark

        def get_payload(self) -> bytes:
            return self.data

        def get_mark(self) -> int:
            return self.mark

        def drop(self) -> None:
            pass

    path._out = NoSend()
    flows = unstable_flows(count, tables, VIP_SLOW, seed=HASH_SEED, table_size=TABLE_SIZE)
    frames = syn_frames("02:00:00:00:00:02", "02:00:00:00:00:01", flows, VIP_SLOW)
    vip = ipv4_to_int(VIP_SLOW)
    marks = flow_buckets(np.array([f[0] for f in flows]), vip, 6, np.array([f[1] for f in flows]), 80,
                         seed=HASH_SEED, table_size=TABLE_SIZE)
    packets = [FakePacket(fr[14:], int(m)) for fr, m in zip(frames, marks, strict=True)]
    t0 = time.perf_counter()
    for p in packets:
        path._on_packet(p)
    per_packet = (time.perf_counter() - t0) / count * 1e6
    t0 = time.perf_counter()
    for _ in range(1_000_000):
        pass
    return per_packet, (time.perf_counter() - t0)


def ipvs_beside_ours(lab: topology.Lab, cluster: LabCluster, args: argparse.Namespace,
                     results: dict[str, float]) -> None:
    """The same TCP, 64 B UDP and new-connection figures through IPVS (DR, Maglev scheduler) in
    mux-1's namespace, to the same backend (bench/ipvs.py); or why IPVS cannot run here."""
    reason = ipvs.unavailable(cluster.muxes[0].mux.netns)
    if reason is not None:
        print(f"IPVS (DR, -s mh) beside ours: not measured: {reason}")
        return
    mux, web1 = cluster.muxes[0].mux, lab.backends[0]
    lab.spawn(f"iperf-{VIP_IPVS}", web1.netns, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", VIP_IPVS])
    tcp = ipvs.setup_dr_service(mux.netns, VIP_IPVS, IPERF_PORT, [web1.address])
    ipvs.IpvsService(mux.netns, VIP_IPVS, IPERF_PORT, "udp").add()
    ipvs.IpvsService(mux.netns, VIP_IPVS, IPERF_PORT, "udp").add_real(web1.address)
    # Our daemon never announces this VIP: a static route sends it to mux-1 alone.
    netns.run(["ip", "route", "replace", f"{VIP_IPVS}/32", "via", mux.address], netns=lab.router.netns)
    try:
        ours, theirs = [], []
        for i in range(args.repeats):
            order = [(ours, VIP_IPERF), (theirs, VIP_IPVS)]
            for out, target in order if i % 2 == 0 else order[::-1]:
                out.append(tcp_gbps(iperf(lab, target, args.seconds, streams=args.streams)))
        o, t = statistics.median(ours), statistics.median(theirs)
        u_t = udp_pps(iperf(lab, VIP_IPVS, args.seconds, udp=True), args.seconds)
        results.update(ipvs_tcp_gbps=t, ipvs_udp_pps=u_t)
        print(f"IPVS (DR, -s mh) in the same mux namespace: TCP {t:.2f} Gbit/s (ours {o:.2f} in the same "
              f"ABBA runs, ratio ours/IPVS {o / t:.2f}); UDP 64 B {u_t:,.0f} packets/s "
              f"(ours above: {results['udp_via_mux_pps']:,.0f}/s)")
        flows = [(ipv4_to_int(f"10.{100 + k // 60000}.{(k // 250) % 240}.{k % 250 + 1}"), 1024 + k % 60000)
                 for k in range(args.flows)]
        frames = tcp_frames(mux.mac, lab.router.mac, flows, VIP_IPVS, port=IPERF_PORT)
        before = _ipvs_connections(mux.netns, tcp)
        t0 = time.monotonic()
        sent_s = send_frames(lab.router.netns, "br0", frames, processes=args.senders)
        done, last = settle(lambda: _ipvs_connections(mux.netns, tcp), before)
        rate = (done - before) / max(sent_s, last - t0)
        results.update(ipvs_new_connections_per_s=rate)
        print(f"IPVS new connections (SYNs of distinct flows): {done - before:,.0f} of {len(frames):,} "
              f"at {rate:,.0f}/s; offered {len(frames) / sent_s:,.0f}/s")
    finally:
        netns.run(["ip", "route", "del", f"{VIP_IPVS}/32"], netns=lab.router.netns, check=False)
        ipvs.clear(mux.netns)


def _ipvs_connections(ns: str, svc: ipvs.IpvsService) -> float:
    """Connections IPVS scheduled for a service so far (`ipvsadm -Ln --stats --exact`)."""
    out = netns.run(["ipvsadm", "-Ln", "--stats", "--exact", *svc.spec], netns=ns).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] in ("TCP", "UDP"):
            return float(fields[2])
    raise RuntimeError(f"no service line in ipvsadm output: {out[:300]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=200_000, help="new flows (SYNs) for the kernel path")
    parser.add_argument("--acks", type=int, default=30_000, help="unknown non-SYN flows for NFQUEUE")
    parser.add_argument("--senders", type=int, default=2, help="sender processes")
    parser.add_argument("--repeats", type=int, default=10, help="alternating TCP runs per path")
    parser.add_argument("--throughput-only", action="store_true",
                        help="TCP and 64 B UDP over IPv4 and IPv6 only (skip IPVS, new flows, NFQUEUE)")
    parser.add_argument("--streams", type=int, default=1,
                        help="parallel TCP streams per run (2+ saturates both CPUs of this VM, where the "
                             "mux shares the cores with sender and receiver)")
    args = parser.parse_args()

    lab = topology.build()
    # Room for every flow's record at its owner and its copy at the backup.
    cluster = LabCluster(lab, learn=False, max_records=4 * (2 * args.flows + args.acks))
    results: dict[str, float] = {}
    try:
        web1, web2, web3 = lab.backends[:3]
        # Bound servers: a UDP server on the wildcard address would answer from the host's own
        # address instead of the VIP (DSR needs the reply to come from the VIP).
        for bind in (VIP_IPERF, web1.address, VIP6_IPERF, web1.address6):
            lab.spawn(f"iperf-{bind}", web1.netns, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", bind])
        cluster.start()
        # One backend behind the mux for iperf (no bypass: the point is to measure the mux).
        cluster.vips[VIP_IPERF] = vip_doc(VIP_IPERF, [
            listener_doc(1, [backend_doc(web1, port=IPERF_PORT)], port=IPERF_PORT),
            listener_doc(2, [backend_doc(web1, port=IPERF_PORT)], port=IPERF_PORT, protocol="udp")])
        # The same over IPv6: an IPv6 VIP, the backend by its IPv6 address (MAC from neighbour discovery).
        cluster.vips[VIP6_IPERF] = vip_doc(VIP6_IPERF, [
            listener_doc(4, [backend_doc(web1, port=IPERF_PORT, ipv6=True, with_mac=False)], port=IPERF_PORT),
            listener_doc(5, [backend_doc(web1, port=IPERF_PORT, ipv6=True, with_mac=False)], port=IPERF_PORT,
                         protocol="udp")])
        # A listener in transition (two backends -> three) for the slow path.
        gen1 = [backend_doc(web1), backend_doc(web2)]
        gen2 = [*gen1, backend_doc(web3)]
        previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + 600}
        cluster.vips[VIP_SLOW] = vip_doc(VIP_SLOW, [
            listener_doc(3, gen2, generation=2, drain_timeout_s=600, previous=previous)])
        cluster.publish()
        wait_route(lab, VIP_IPERF, [m.address for m in lab.muxes], timeout_s=20)
        wait_route(lab, VIP6_IPERF, [m.address6 for m in lab.muxes], timeout_s=20)
        time.sleep(0.5)

        # Alternate the paths in ABBA order (the machine is shared: load drifts during a run,
        # and whichever path runs first after a pause tends to gain); medians of many short runs.
        # IPv4 and IPv6 runs alternate the same way, so the two families see the same load.
        vias, directs, vias6, directs6 = [], [], [], []
        for i in range(args.repeats):
            order = [(vias, VIP_IPERF), (directs, web1.address), (vias6, VIP6_IPERF),
                     (directs6, web1.address6)]
            for out, target in order if i % 2 == 0 else order[::-1]:
                out.append(tcp_gbps(iperf(lab, target, args.seconds, streams=args.streams)))
        via, direct = statistics.median(vias), statistics.median(directs)
        # Also the median of the back-to-back pairs' ratios: each pair ran within seconds, so slow
        # drifts of the machine's load cancel out of it.
        paired = statistics.median(v / d for v, d in zip(vias, directs, strict=True))
        results.update(tcp_via_mux_gbps=via, tcp_direct_gbps=direct, tcp_ratio=via / direct,
                       tcp_paired_ratio_median=paired)
        print(f"TCP through a mux: {via:.2f} Gbit/s; direct to the backend: {direct:.2f} Gbit/s; "
              f"ratio of medians {via / direct:.2f}, median of paired ratios {paired:.2f} (goal >= 0.9; "
              f"{args.repeats} ABBA-alternating {args.seconds} s runs per path, {args.streams} stream(s): "
              f"{[round(v, 2) for v in vias]} vs {[round(d, 2) for d in directs]})")

        via6, direct6 = statistics.median(vias6), statistics.median(directs6)
        paired6 = statistics.median(v / d for v, d in zip(vias6, directs6, strict=True))
        results.update(tcp6_via_mux_gbps=via6, tcp6_direct_gbps=direct6, tcp6_ratio=via6 / direct6,
                       tcp6_paired_ratio_median=paired6)
        print(f"IPv6 TCP through a mux: {via6:.2f} Gbit/s; direct to the backend: {direct6:.2f} Gbit/s; "
              f"ratio of medians {via6 / direct6:.2f}, median of paired ratios {paired6:.2f} (same ABBA "
              f"runs: {[round(v, 2) for v in vias6]} vs {[round(d, 2) for d in directs6]})")

        # UDP: both families, via and direct alternated, medians of 3 runs each
        udp: dict[str, list[float]] = {"via": [], "direct": [], "via6": [], "direct6": []}
        for i in range(3):
            order = [("via", VIP_IPERF), ("direct", web1.address), ("via6", VIP6_IPERF),
                     ("direct6", web1.address6)]
            for key, target in order if i % 2 == 0 else order[::-1]:
                udp[key].append(udp_pps(iperf(lab, target, args.seconds, udp=True), args.seconds))
        u_via, u_direct = statistics.median(udp["via"]), statistics.median(udp["direct"])
        u_via6, u_direct6 = statistics.median(udp["via6"]), statistics.median(udp["direct6"])
        results.update(udp_via_mux_pps=u_via, udp_direct_pps=u_direct, udp_ratio=u_via / u_direct,
                       udp6_via_mux_pps=u_via6, udp6_direct_pps=u_direct6, udp6_ratio=u_via6 / u_direct6)
        print(f"UDP 64-byte packets received through a mux: {u_via:,.0f}/s; direct: {u_direct:,.0f}/s; "
              f"ratio {u_via / u_direct:.2f}")
        print(f"IPv6 UDP 64-byte packets received through a mux: {u_via6:,.0f}/s; direct: "
              f"{u_direct6:,.0f}/s; ratio {u_via6 / u_direct6:.2f} (medians of 3 alternated runs per path "
              "and family)")
        if args.throughput_only:
            print(json.dumps({k: round(v, 3) for k, v in results.items()}))
            return 0

        ipvs_beside_ours(lab, cluster, args, results)

        # New flows: SYNs of distinct flows in unstable buckets, straight at mux-1's MAC.
        size = TABLE_SIZE
        t_old = build_generation(1, [f"{b['address']}:80" for b in gen1], None, size)
        t_new = build_generation(2, [f"{b['address']}:80" for b in gen2], None, size)
        tables = ListenerTables(current=t_new, old=(OldTable(t_old, time.time() + 600),))
        flows = unstable_flows(args.flows, tables, VIP_SLOW, seed=HASH_SEED, table_size=TABLE_SIZE)
        mux = cluster.muxes[0]
        frames = syn_frames(mux.mux.mac, lab.router.mac, flows, VIP_SLOW)

        def kernel_new() -> float:
            return mux.metric("lbagent_kernel_new_flows_total", listener="3")

        def owner_records() -> float:  # records created at their owner, on either mux
            return cluster.total("lbagent_records_stored_total")

        # Baseline from the same run: as many SYNs of distinct flows, same senders, to a listener
        # NOT in transition (rule 2: hash, table, forward; no pin, no report). The senders and the
        # kernel share the 2 cores (a frame is processed by the kernel in its sender's syscall),
        # so this is what the rig can push through the plainest kernel path.
        steady_frames = tcp_frames(mux.mux.mac, lab.router.mac, flows, VIP_IPERF, port=IPERF_PORT)

        def steady_packets() -> float:
            return mux.metric("lbagent_listener_packets_total", listener="1")

        s0 = steady_packets()
        t0 = time.monotonic()
        steady_sent_s = send_frames(lab.router.netns, "br0", steady_frames, processes=args.senders)
        s1, s_done = settle(steady_packets, s0, idle_s=0.5)
        steady_rate = (s1 - s0) / (s_done - t0)
        results.update(steady_syns_forwarded=s1 - s0, steady_syns_per_s=steady_rate,
                       steady_offered_per_s=len(steady_frames) / steady_sent_s)
        del steady_frames
        time.sleep(1.0)  # let the backends' SYN-ACK retransmissions and the counters calm down

        k0, r0, q0 = kernel_new(), owner_records(), mux.metric("lbagent_slowpath_packets_total")
        lost0 = mux.metric("lbagent_new_flow_reports_lost_total")
        t0 = time.monotonic()
        sent_s = send_frames(lab.router.netns, "br0", frames, processes=args.senders)
        settled = settle_together({"kernel": kernel_new, "records": owner_records},
                                  {"kernel": 0.5, "records": 1.0})
        (k1, k_done), (r1, r_done) = settled["kernel"], settled["records"]
        lost = mux.metric("lbagent_new_flow_reports_lost_total") - lost0
        queued = mux.metric("lbagent_slowpath_packets_total") - q0
        link = json.loads(netns.run(["ip", "-j", "-s", "link", "show", "eth0"],
                                    netns=mux.mux.netns).stdout)[0]
        kernel_rate = (k1 - k0) / (k_done - t0)
        record_rate = (r1 - r0) / (r_done - t0)
        offered = len(frames) / sent_s
        results.update(new_flows_sent=len(frames), new_flows_offered_per_s=offered,
                       kernel_new_flows=k1 - k0, kernel_new_flows_per_s=kernel_rate,
                       owner_records=r1 - r0, owner_records_per_s=record_rate,
                       new_flow_reports_lost=lost, new_flow_syns_queued=queued,
                       mux_rx_dropped=link["stats64"]["rx"]["dropped"])
        print(f"New flows during a transition, pinned and forwarded by the kernel: {k1 - k0:,.0f} of "
              f"{len(frames):,} in {k_done - t0:.2f} s = {kernel_rate:,.0f} flows/s (goal >= 50,000); "
              f"offered load {offered:,.0f} SYN/s from {args.senders} sender processes; SYNs sent to "
              f"NFQUEUE: {queued:,.0f}")
        print(f"    baseline, same run, same senders: {s1 - s0:,.0f} SYNs to a listener not in transition "
              f"(rule 2, stateless) forwarded at {steady_rate:,.0f}/s; ratio {kernel_rate / steady_rate:.2f}")
        print(f"... and recorded at their owner mux: {r1 - r0:,.0f} records in {r_done - t0:.2f} s = "
              f"{record_rate:,.0f} records/s; reports lost (seq gaps): {lost:,.0f}")

        # Where the gap to the steady path goes: the same flood again with both daemons paused
        # (SIGSTOP to our own daemon processes), so the senders and the kernel have the cores to
        # themselves; the reports wait in the socket buffer. Then the daemons resume and the
        # records drain with Python alone on the machine.
        paused_flows = unstable_flows(args.flows, tables, VIP_SLOW, seed=HASH_SEED, table_size=TABLE_SIZE,
                                      rng_seed=13, exclude=set(flows))
        paused_frames = syn_frames(mux.mux.mac, lab.router.mac, paused_flows, VIP_SLOW)

        def kernel_counter() -> float:
            # Straight from the kernel over netlink in the mux's namespace (the daemon is paused;
            # `nft list counter` would first load every pin, seconds with 400,000 of them).
            read = netns._executor(mux.mux.netns).submit(read_counters, "lbagent")
            return float(read.result(timeout=10)["newflows3"][0])

        r_pre = owner_records()
        for m in cluster.muxes:
            m.proc.send_signal(signal.SIGSTOP)
        try:
            c0 = kernel_counter()
            t0 = time.monotonic()
            paused_sent_s = send_frames(lab.router.netns, "br0", paused_frames, processes=args.senders)
            c1, c_done = settle(kernel_counter, c0, idle_s=0.5)
        finally:
            t_resume = time.monotonic()
            for m in cluster.muxes:
                m.proc.send_signal(signal.SIGCONT)
        alone_rate = (c1 - c0) / (c_done - t0)
        r2, r2_done = settle(owner_records, r_pre, idle_s=1.0)
        drain_rate = (r2 - r_pre) / (r2_done - t_resume)
        lost2 = mux.metric("lbagent_new_flow_reports_lost_total") - lost0 - lost
        results.update(kernel_alone_new_flows=c1 - c0, kernel_alone_new_flows_per_s=alone_rate,
                       kernel_alone_offered_per_s=len(paused_frames) / paused_sent_s,
                       records_drain=r2 - r_pre, records_drain_per_s=drain_rate, reports_lost_paused=lost2)
        offered_alone = len(paused_frames) / paused_sent_s
        print(f"    the same flood with both daemons paused (kernel and senders alone): {c1 - c0:,.0f} of "
              f"{len(paused_frames):,} at {alone_rate:,.0f} flows/s (offered {offered_alone:,.0f}/s); "
              f"ratio to the steady path {alone_rate / steady_rate:.2f}")
        print(f"    then, resumed, the daemons recorded them at their owners at {drain_rate:,.0f} records/s "
              f"({r2 - r_pre:,.0f} records, reports lost {lost2:,.0f})")
        del paused_frames

        # The remaining userspace path: non-SYN packets of unknown flows (NFQUEUE).
        ack_flows = unstable_flows(args.acks, tables, VIP_SLOW, seed=HASH_SEED, table_size=TABLE_SIZE,
                                   rng_seed=11, exclude=set(flows) | set(paused_flows))
        acks = tcp_frames(mux.mux.mac, lab.router.mac, ack_flows, VIP_SLOW, flags=TCP_ACK)

        def queued_packets() -> float:
            return mux.metric("lbagent_slowpath_packets_total")

        q0 = queued_packets()
        t0 = time.monotonic()
        ack_sent_s = send_frames(lab.router.netns, "br0", acks, processes=args.senders)
        q1, q_done = settle(queued_packets, q0, idle_s=1.0)
        ns = mux.mux.netns
        queue_line = netns.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], netns=ns).stdout.split()
        queue_dropped, user_dropped = (int(queue_line[5]), int(queue_line[6])) if len(queue_line) > 6 \
            else (-1, -1)
        nfq_rate = (q1 - q0) / (q_done - t0)
        results.update(nfqueue_sent=len(acks), nfqueue_decided=q1 - q0, nfqueue_per_s=nfq_rate,
                       nfqueue_offered_per_s=len(acks) / ack_sent_s, queue_dropped=queue_dropped,
                       queue_user_dropped=user_dropped)
        print(f"Userspace path (NFQUEUE), non-SYN packets of unknown flows: {q1 - q0:,.0f} of {len(acks):,} "
              f"decided (owner asked when it is the other mux) and re-injected in {q_done - t0:.2f} s = "
              f"{nfq_rate:,.0f} packets/s; offered {len(acks) / ack_sent_s:,.0f}/s; queue full "
              f"{queue_dropped:,}, netlink socket full {user_dropped:,}")
        py_us, loop_us = python_cost_per_packet(tables)
        results.update(slowpath_python_us_per_packet=py_us, empty_loop_us=loop_us)
        print(f"Slow path in Python alone (no kernel, no syscalls): {py_us:.1f} us per packet = at most "
              f"{1e6 / py_us:,.0f} flows/s on this machine; an empty Python loop iteration takes "
              f"{loop_us * 1000:.0f} ns here (about 15-30 ns on a current idle x86 core)")
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    finally:
        try:
            cluster.stop_all()
        finally:
            topology.teardown(lab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
