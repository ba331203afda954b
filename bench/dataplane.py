"""Kernel data-plane benchmark in a fresh lab (needs root): every figure next to its baseline
measured in the same run.

1. TCP throughput client -> VIP through a mux (nftables DSR) vs client -> backend directly
   (iperf3, same router, same backend): ratio, goal >= 0.9.
2. Small-packet UDP (64-byte payloads) through a mux vs directly: packets/s received.
3. Slow path: new flows per second decided in userspace during a transition (SYNs of distinct
   flows, all in unstable buckets, sent at the mux as fast as one Python sender can), next to
   the sender's own rate (the offered load). Goal >= 50,000 flows/s.

Usage: sudo .venv/bin/python bench/dataplane.py [--seconds 5] [--flows 200000]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbagent.core.flowhash import flow_buckets, ipv4_to_int
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.lab import netns, topology
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
FLOOD_SOURCES = "198.18.0.0/15"  # benchmark range: backends' answers to it go nowhere


def iperf(lab: topology.Lab, target: str, seconds: int, udp: bool = False) -> dict:
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if udp:
        argv += ["-u", "-b", "0", "-l", "64"]
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


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def syn_frames(dst_mac: str, src_mac: str, flows: list[tuple[int, int]], vip: str) -> list[bytes]:
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    daddr = socket.inet_aton(vip)
    frames = []
    for saddr, sport in flows:
        src = saddr.to_bytes(4, "big")
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, daddr)
        head = head[:10] + struct.pack("!H", _ip_checksum(head)) + head[12:]
        tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        frames.append(eth + head + tcp)
    return frames


def unstable_flows(count: int, tables: ListenerTables) -> list[tuple[int, int]]:
    """`count` distinct (source address, source port) whose bucket is unstable."""
    base = ipv4_to_int(FLOOD_SOURCES.split("/")[0])
    rng = np.random.default_rng(7)
    out: list[tuple[int, int]] = []
    vip = ipv4_to_int(VIP_SLOW)
    while len(out) < count:
        src = base + rng.integers(0, 1 << 17, size=count * 4, dtype=np.int64)
        sport = rng.integers(1024, 65536, size=count * 4, dtype=np.int64)
        buckets = flow_buckets(src, vip, 6, sport, 80, seed=HASH_SEED, table_size=TABLE_SIZE)
        keep = tables.unstable[buckets]
        pairs = set(zip(src[keep].tolist(), sport[keep].tolist(), strict=True))
        out.extend(pairs - set(out))
    return out[:count]


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
    flows = unstable_flows(count, tables)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--flows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lab = topology.build()
    cluster = LabCluster(lab, learn=False)
    results: dict[str, float] = {}
    try:
        web1, web2, web3 = lab.backends[:3]
        # Bound servers: a UDP server on the wildcard address would answer from the host's own
        # address instead of the VIP (DSR needs the reply to come from the VIP).
        for bind in (VIP_IPERF, web1.address):
            lab.spawn(f"iperf-{bind}", web1.netns, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", bind])
        cluster.start()
        # One backend behind the mux for iperf (no bypass: the point is to measure the mux).
        cluster.vips[VIP_IPERF] = vip_doc(VIP_IPERF, [
            listener_doc(1, [backend_doc(web1, port=IPERF_PORT)], port=IPERF_PORT),
            listener_doc(2, [backend_doc(web1, port=IPERF_PORT)], port=IPERF_PORT, protocol="udp")])
        # A listener in transition (two backends -> three) for the slow path.
        gen1 = [backend_doc(web1), backend_doc(web2)]
        gen2 = [*gen1, backend_doc(web3)]
        previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + 600}
        cluster.vips[VIP_SLOW] = vip_doc(VIP_SLOW, [
            listener_doc(3, gen2, generation=2, drain_timeout_s=600, previous=previous)])
        cluster.publish()
        wait_route(lab, VIP_IPERF, [m.address for m in lab.muxes], timeout_s=20)
        time.sleep(0.5)

        # Alternate the two paths (the machine is shared: load moves during a run); medians.
        vias, directs = [], []
        for _ in range(args.repeats):
            vias.append(tcp_gbps(iperf(lab, VIP_IPERF, args.seconds)))
            directs.append(tcp_gbps(iperf(lab, web1.address, args.seconds)))
        via, direct = statistics.median(vias), statistics.median(directs)
        results.update(tcp_via_mux_gbps=via, tcp_direct_gbps=direct, tcp_ratio=via / direct)
        print(f"TCP through a mux: {via:.2f} Gbit/s; direct to the backend: {direct:.2f} Gbit/s; "
              f"ratio {via / direct:.2f} (goal >= 0.9; medians of {args.repeats} alternating runs: "
              f"{[round(v, 2) for v in vias]} vs {[round(d, 2) for d in directs]})")

        u_via = udp_pps(iperf(lab, VIP_IPERF, args.seconds, udp=True), args.seconds)
        u_direct = udp_pps(iperf(lab, web1.address, args.seconds, udp=True), args.seconds)
        results.update(udp_via_mux_pps=u_via, udp_direct_pps=u_direct, udp_ratio=u_via / u_direct)
        print(f"UDP 64-byte packets received through a mux: {u_via:,.0f}/s; direct: {u_direct:,.0f}/s; "
              f"ratio {u_via / u_direct:.2f}")

        # Slow path: SYNs of distinct flows in unstable buckets, straight at mux-1's MAC.
        size = TABLE_SIZE
        t_old = build_generation(1, [f"{b['address']}:80" for b in gen1], None, size)
        t_new = build_generation(2, [f"{b['address']}:80" for b in gen2], None, size)
        tables = ListenerTables(current=t_new, old=(OldTable(t_old, time.time() + 600),))
        flows = unstable_flows(args.flows, tables)
        mux = cluster.muxes[0]
        frames = syn_frames(mux.mux.mac, lab.router.mac, flows, VIP_SLOW)
        sender = netns.socket_in(lab.router.netns, socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind(("br0", 0))
        before = mux.metric("lbagent_slowpath_packets_total")
        pins_before = mux.metric("lbagent_kernel_reinjected_packets_total")
        t0 = time.monotonic()
        for frame in frames:
            sender.send(frame)
        sent_s = time.monotonic() - t0
        last, last_change = before, time.monotonic()
        while time.monotonic() - last_change < 1.0:  # until the slow path has been idle for 1 s
            now_count = mux.metric("lbagent_slowpath_packets_total")
            if now_count != last:
                last, last_change = now_count, time.monotonic()
            time.sleep(0.05)
        # Where the rest went: the queue (kernel side) or the mux's receive path.
        ns = mux.mux.netns
        queue_line = netns.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], netns=ns).stdout.split()
        queue_dropped, user_dropped = (int(queue_line[5]), int(queue_line[6])) if len(queue_line) > 6 \
            else (-1, -1)
        link = json.loads(netns.run(["ip", "-j", "-s", "link", "show", "eth0"], netns=ns).stdout)[0]
        rx_dropped = link["stats64"]["rx"]["dropped"]
        results.update(queue_dropped=queue_dropped, queue_user_dropped=user_dropped,
                       mux_rx_dropped=rx_dropped)
        decided = last - before
        took_s = last_change - t0
        pins = mux.metric("lbagent_kernel_reinjected_packets_total") - pins_before
        rate = decided / took_s
        results.update(slowpath_flows_per_s=rate, slowpath_offered_per_s=len(frames) / sent_s,
                       slowpath_decided=decided, slowpath_sent=len(frames), slowpath_pins=pins)
        print(f"Slow path: {decided:,.0f} of {len(frames):,} new flows decided, pinned ({pins:,.0f}) and "
              f"re-sent in {took_s:.2f} s = {rate:,.0f} flows/s (goal >= 50,000); offered load "
              f"{len(frames) / sent_s:,.0f} SYN/s from one Python sender; not decided: queue full "
              f"{queue_dropped:,}, netlink socket full {user_dropped:,}, mux receive drops {rx_dropped:,}")
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
