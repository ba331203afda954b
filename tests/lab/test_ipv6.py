"""IPv6 VIPs end to end, as the IPv4 lab tests do it: real TCP over IPv6 from the client through
the router (bird2, the /128 routes learnt over MP-BGP from each mux's ExaBGP, ECMP) and the muxes'
netdev tables (ip6 hash, pins6_*, dispatch6) to the backends (VIP on lo, direct server return).
Backend MACs come from neighbour discovery (no `mac` in the documents). The peer network between
the muxes stays IPv4 (the cluster's addresses); IPv6 flows travel in it as 128-bit keys.

Runs on the session's lab (tests/lab/conftest.py) with its own VIPs (2001:db8:113::10-15) and
listener ids (60-65)."""

from __future__ import annotations

import collections
import ipaddress
import json
import socket
import struct
import time

import pytest

from lbagent.core.decide import RecordAndForward, decide
from lbagent.core.flowhash import flow_bucket, ipv6_fingerprint
from lbagent.core.maglev import maglev_table
from lbagent.core.ownership import build_ownership
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.lab import netns
from lbagent.lab.harness import (
    HASH_SEED,
    OWNER_SEED,
    TABLE_SIZE,
    LongConnections,
    UdpFlows,
    backend_doc,
    connect_and_ask,
    listener_doc,
    pins,
    vip_doc,
    wait_route,
)
from lbagent.lab.topology import SERVICE_UDP_PORT
from lbagent.state import table_size_for_cap
from tests.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

VIP_WEIGHTS = "2001:db8:113::10"
VIP_CHANGES = "2001:db8:113::11"
VIP_BYPASS = "2001:db8:113::12"
VIP_NEW_FLOWS = "2001:db8:113::13"
WEIGHTS = (1, 2, 3)
BACKEND_CAP = 8
TABLE = table_size_for_cap(BACKEND_CAP)  # 809: the listener's own table size
DRAIN_S = 120
CONNECTIONS = 120


def _rx_packets(ns: str) -> int:
    return int(netns.run(["cat", "/sys/class/net/eth0/statistics/rx_packets"], netns=ns).stdout)


def _mux_hops(lab) -> list[str]:
    return [m.address6 for m in lab.muxes]


def _b6(node, **kw) -> dict:
    # No MAC in the document: the mux resolves it by neighbour discovery.
    return backend_doc(node, ipv6=True, with_mac=False, **kw)


@pytest.fixture(scope="module")
def weighted_vip6(cluster):
    backends = cluster.lab.backends[:3]
    docs = [_b6(b, weight=w) for b, w in zip(backends, WEIGHTS, strict=True)]
    cluster.set_vip(vip_doc(VIP_WEIGHTS, [listener_doc(60, docs, backend_cap=BACKEND_CAP)]))
    wait_route(cluster.lab, VIP_WEIGHTS, _mux_hops(cluster.lab), timeout_s=60)
    table = maglev_table([f"{b.address6}:80" for b in backends], list(WEIGHTS), TABLE)
    yield backends, table
    cluster.remove_vip(VIP_WEIGHTS)


def test_ipv6_connections_follow_weights_and_the_table(cluster, weighted_vip6):
    backends, table = weighted_vip6
    client = cluster.lab.clients[0]
    answers = [connect_and_ask(client.netns, VIP_WEIGHTS) for _ in range(1000)]
    wrong = []
    for saddr, sport, name in answers:
        bucket = flow_bucket(saddr, VIP_WEIGHTS, 6, sport, 80, seed=HASH_SEED, table_size=TABLE)
        expected = backends[int(table[bucket])].name
        if name != expected:
            wrong.append((saddr, sport, name, expected))
    assert wrong == [], f"{len(wrong)} answers came from another backend than the table's: {wrong[:5]}"
    counts = collections.Counter(name for _, _, name in answers)
    for backend, weight in zip(backends, WEIGHTS, strict=True):
        share, expected = counts[backend.name] / len(answers), weight / sum(WEIGHTS)
        tolerance = 4 * (expected * (1 - expected) / len(answers)) ** 0.5  # 4 sigma of 1,000 flows
        assert abs(share - expected) < tolerance, f"{backend.name}: {share:.3f}, weight share {expected:.3f}"
    per_mux = [m.metric("lbagent_listener_packets_total", listener="60") for m in cluster.muxes]
    assert all(p > 0 for p in per_mux), f"listener packets per mux (ECMP over both): {per_mux}"
    # The MACs were learnt by neighbour discovery: each mux's IPv6 neighbour table has them.
    for mux in cluster.lab.muxes:
        neigh = netns.run(["ip", "-6", "neigh", "show", "dev", "eth0"], netns=mux.netns).stdout
        for b in backends:
            assert f"{b.address6} lladdr {b.mac}" in neigh, f"{mux.name}: {b.address6} not resolved: {neigh}"


def test_ipv6_steady_state_is_stateless(cluster, weighted_vip6):
    client = cluster.lab.clients[0]
    names = ("lbagent_slowpath_packets_total", "lbagent_kernel_reinjected_packets_total")
    per_listener = ("lbagent_slowpath_accepted_packets_total", "lbagent_pinned_packets_total")

    def counters(mux) -> dict[str, float]:
        out = {n: mux.metric(n) for n in names}
        out.update({n: mux.metric(n, listener="60") for n in per_listener})
        return out

    before = [counters(m) for m in cluster.muxes]
    packets_before = cluster.total("lbagent_listener_packets_total", listener="60")
    count = 300
    for _ in range(count):
        connect_and_ask(client.netns, VIP_WEIGHTS)
    assert cluster.total("lbagent_listener_packets_total", listener="60") - packets_before >= 5 * count
    for mux, old in zip(cluster.muxes, before, strict=True):
        new = counters(mux)
        grew = {k: new[k] - old[k] for k in new if new[k] != old[k]}
        assert grew == {}, f"{mux.mux.name} kept state in steady state: {grew}"
        assert mux.metric("lbagent_flow_records") == 0
        assert pins(mux.mux, ipv6=True) == {}, f"{mux.mux.name} pinned IPv6 flows in steady state"


def _classid(value) -> int:
    """A `classid` as nft's JSON shows it ("major:minor" in hex) as its 32-bit value."""
    if isinstance(value, int):
        return value
    if value == "none":
        return 0
    major, _, minor = str(value).partition(":")
    return (int(major or "0", 16) << 16) | int(minor or "0", 16)


def _learned6(mux, listener_id: int) -> dict[tuple[int, int, int], int]:
    """The kernel's bucket per IPv6 flow (daemon --learn): keyed by the second half of the
    address pair's fingerprint and the ports (nft 1.0.6 cannot learn a longer key)."""
    out = netns.run(["nft", "-j", "list", "map", "netdev", "lbagent", f"learn{listener_id}"],
                    netns=mux.netns, timeout_s=60).stdout
    result = {}
    for item in json.loads(out)["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            fp, sport, dport = key["concat"]
            result[(_classid(fp), int(sport), int(dport))] = int(value)
    return result


def test_ipv6_kernel_and_python_agree_on_buckets(cluster, weighted_vip6):
    """>1,000 real IPv6 connections: the bucket each mux's kernel computed (jhash over the IPv6
    5-tuple, mod the listener's table) equals lbagent.core.flowhash.flow_bucket's; and the
    address fingerprint the pins are keyed by equals ipv6_fingerprint's."""
    client = cluster.lab.clients[0]
    flows = [connect_and_ask(client.netns, VIP_WEIGHTS)[:2] for _ in range(1100)]
    learned: dict = {}
    for mux in cluster.lab.muxes:
        learned.update(_learned6(mux, 60))
    compared, mismatches = 0, []
    for saddr, sport in flows:
        _, fp = ipv6_fingerprint(saddr, VIP_WEIGHTS, seed=HASH_SEED)
        kernel = learned.get((fp, sport, 80))
        if kernel is None:
            mismatches.append((saddr, sport, "no kernel bucket under Python's fingerprint"))
            continue
        compared += 1
        python = flow_bucket(saddr, VIP_WEIGHTS, 6, sport, 80, seed=HASH_SEED, table_size=TABLE)
        if python != kernel:
            mismatches.append((saddr, sport, kernel, python))
    assert mismatches == [], f"{len(mismatches)} of {len(flows)} IPv6 flows disagree: {mismatches[:5]}"
    assert compared >= 1000


def _changes(gen: int, backends: list[dict], previous: tuple[int, list[dict]] | None) -> dict:
    prev = None
    if previous is not None:
        prev = {"generation": previous[0], "backends": previous[1], "drain_deadline": time.time() + DRAIN_S}
    return vip_doc(VIP_CHANGES, [listener_doc(61, backends, generation=gen, drain_timeout_s=DRAIN_S,
                                              previous=prev)])


def test_ipv6_connections_survive_add_drain_remove_and_mux_failures(cluster):
    lab = cluster.lab
    for mux in cluster.muxes:
        if not mux.alive():
            cluster.restart(mux)
    web1, web2, web3, web4 = lab.backends[:4]
    gen1 = [_b6(web1), _b6(web2), _b6(web3)]
    cluster.set_vip(_changes(1, gen1, None))
    wait_route(lab, VIP_CHANGES, _mux_hops(lab), timeout_s=60)
    conns = LongConnections(lab.clients[0].netns, VIP_CHANGES, CONNECTIONS)
    assert not conns.broken, f"connections broken before any change: {conns.broken}"
    slow_before = cluster.total("lbagent_slowpath_packets_total")
    conns.start_background()
    steps: list[tuple[str, int]] = []
    try:
        gen2 = [*gen1, _b6(web4)]
        steps.append(("add", conns.rounds))
        cluster.set_vip(_changes(2, gen2, (1, gen1)))
        conns.settle()
        gen3 = [_b6(web1, state="draining"), *gen2[1:]]
        steps.append(("drain", conns.rounds))
        cluster.set_vip(_changes(3, gen3, (2, gen2)))
        conns.settle()
        gen4 = [gen3[0], _b6(web3), _b6(web4)]  # web-2 removed
        steps.append(("remove", conns.rounds))
        cluster.set_vip(_changes(4, gen4, (3, gen3)))
        conns.settle()
        slow_during = cluster.total("lbagent_slowpath_packets_total") - slow_before
        victim = cluster.muxes[0]
        steps.append(("kill -9", conns.rounds))
        victim.kill9()  # its kernel tables and ExaBGP stay
        conns.settle()
        steps.append(("restart", conns.rounds))
        cluster.restart(victim)
        conns.settle()
        steps.append(("withdraw", conns.rounds))
        victim.stop()  # withdraws its routes: every flow now reaches the other mux
        wait_route(lab, VIP_CHANGES, [cluster.muxes[1].mux.address6], timeout_s=60)
        conns.settle(3)
    finally:
        conns.close()
        cluster.remove_vip(VIP_CHANGES)
        for mux in cluster.muxes:
            if not mux.alive():
                cluster.restart(mux)
    elsewhere = conns.broken_elsewhere({web2.name})
    print(f"\nIPv6 with transitions: {len(elsewhere)} broken of {CONNECTIONS} "
          f"(+{len(conns.broken_on({web2.name}))} on the removed {web2.name}); steps {steps}")
    assert elsewhere == {}, f"{len(elsewhere)} IPv6 connections broke: {list(elsewhere.items())[:5]}"
    assert len(set(conns.backend)) >= 3
    # The moved flows' packets went through NFQUEUE (IPv6 parsed, decided, re-injected).
    assert slow_during > 0, "the slow path never saw an IPv6 packet"


def test_ipv6_flows_opened_during_a_transition_survive_losing_their_mux(cluster):
    """New IPv6 flows of unstable buckets: pinned by the kernel (pins6_tcp), reported over NFLOG
    (IPv6 parsed), recorded at their owner over the (IPv4) peer network; once their mux is
    withdrawn the other one asks the owner."""
    lab = cluster.lab
    for mux in cluster.muxes:
        if not mux.alive():
            cluster.restart(mux)
    web1, web2, web3 = lab.backends[:3]
    gen1 = [_b6(web1), _b6(web2)]
    gen2 = [*gen1, _b6(web3)]
    previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + DRAIN_S}
    stored_before = cluster.total("lbagent_records_stored_total")
    cluster.set_vip(vip_doc(VIP_NEW_FLOWS, [listener_doc(63, gen2, generation=2, drain_timeout_s=DRAIN_S,
                                                         previous=previous)]))
    wait_route(lab, VIP_NEW_FLOWS, _mux_hops(lab), timeout_s=60)
    conns = LongConnections(lab.clients[0].netns, VIP_NEW_FLOWS, CONNECTIONS)
    try:
        conns.start_background()
        conns.settle()
        assert sum(len(pins(m.mux, ipv6=True)) for m in cluster.muxes) > 0, "no IPv6 flow was pinned"
        assert cluster.total("lbagent_records_stored_total") > stored_before, "no IPv6 flow was recorded"
        cluster.muxes[0].stop()
        wait_route(lab, VIP_NEW_FLOWS, [cluster.muxes[1].mux.address6], timeout_s=60)
        conns.settle(3)
    finally:
        conns.close()
        cluster.remove_vip(VIP_NEW_FLOWS)
        for mux in cluster.muxes:
            if not mux.alive():
                cluster.restart(mux)
    on_web3 = sum(1 for b in conns.backend if b == web3.name)
    assert on_web3 > 0
    assert conns.broken == {}, f"{len(conns.broken)} broke: {list(conns.broken.items())[:5]}"


def test_ipv6_bypass_moves_the_route_and_scale_up_keeps_connections(cluster):
    lab = cluster.lab
    web1, web2 = lab.backends[:2]
    client = lab.clients[0].netns
    two = [_b6(web1), _b6(web2)]
    cluster.set_vip(vip_doc(VIP_BYPASS, [listener_doc(62, two, generation=1)]))
    wait_route(lab, VIP_BYPASS, _mux_hops(lab), timeout_s=60)
    try:
        one = [_b6(web1)]
        # The next hop the router gets is the backend host's IPv6 address (MP-BGP over IPv4).
        cluster.vips[VIP_BYPASS] = vip_doc(VIP_BYPASS, [listener_doc(
            62, one, generation=2, drain_timeout_s=0,
            previous={"generation": 1, "backends": two, "drain_deadline": time.time()})],
            bypass=True, bypass_next_hop=web1.address6)
        cluster.publish()
        wait_route(lab, VIP_BYPASS, [web1.address6], timeout_s=60)
        rx_before = [_rx_packets(m.netns) for m in lab.muxes]
        answers = collections.Counter(connect_and_ask(client, VIP_BYPASS)[2] for _ in range(100))
        during = LongConnections(client, VIP_BYPASS, 30)
        rx = [_rx_packets(m.netns) - b for m, b in zip(lab.muxes, rx_before, strict=True)]
        assert answers == {web1.name: 100}
        assert set(during.backend) == {web1.name}
        # 130 connections are at least 500 packets towards the VIP; a mux meanwhile gets only BGP
        # keepalives and neighbour discovery.
        assert all(n < 30 for n in rx), f"muxes received {rx} packets during bypass"
        during.start_background()
        cluster.vips[VIP_BYPASS] = vip_doc(VIP_BYPASS, [listener_doc(62, two, generation=3, previous={
            "generation": 2, "backends": one, "drain_deadline": time.time() + 60})])
        cluster.publish()
        wait_route(lab, VIP_BYPASS, _mux_hops(lab), timeout_s=60)
        during.settle(3)
        assert during.broken == {}, f"IPv6 connections from the bypass broke: {during.broken}"
        after = collections.Counter(connect_and_ask(client, VIP_BYPASS)[2] for _ in range(100))
        assert set(after) == {web1.name, web2.name}, f"new connections after scale-up: {after}"
        during.close()
    finally:
        cluster.remove_vip(VIP_BYPASS)


def test_ipv6_records_outlive_the_idle_timeout_while_pinned_flows_are_active(cluster):
    """The keep-alive finds active IPv6 pins by their address fingerprint among the mux's records
    and renews the records at both owners: connections opened during a transition (those on the
    new backend exist only in records, no old table names it) exchange a line a second for more
    than 3x the records' 4 s idle timeout, then their mux is killed (daemon and ExaBGP) and the
    other mux sends them on from the records. Without renewal the records would have expired and,
    the old table still draining, the moved flows would go to its backend (checked: with the IPv6
    keep-alive disabled this test breaks the connections on the new backend)."""
    lab = cluster.lab
    for mux in cluster.muxes:
        if not mux.alive():
            cluster.restart(mux)
    vip, lid, idle_s, drain_s = "2001:db8:113::14", 64, 4, 120  # the old table stays draining
    web1, web2, web3 = lab.backends[:3]
    gen1 = [_b6(web1), _b6(web2)]

    def doc(gen: int, backends: list[dict], previous: dict | None) -> dict:
        return vip_doc(vip, [listener_doc(lid, backends, generation=gen, drain_timeout_s=drain_s,
                                          previous=previous, flow_idle_timeout_s=idle_s)])

    cluster.set_vip(doc(1, gen1, None))
    wait_route(lab, vip, _mux_hops(lab), timeout_s=60)
    renewed_before = cluster.total("lbagent_keepalive_flows_total")
    previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + drain_s}
    cluster.set_vip(doc(2, [*gen1, _b6(web3)], previous))
    conns = LongConnections(lab.clients[0].netns, vip, 80, interval_s=1.0)
    try:
        conns.start_background()
        started = time.time()
        deadline = time.monotonic() + 300
        while time.time() < started + 3 * idle_s + 2:  # let the records' idle timeout pass 3 times
            assert time.monotonic() < deadline, "exchange rounds stalled"
            conns.settle(1)
        assert conns.broken == {}, f"broken before the kill: {list(conns.broken.items())[:5]}"
        renewed = cluster.total("lbagent_keepalive_flows_total") - renewed_before
        assert renewed > 0, "no active IPv6 pin renewed its records"
        victim, survivor = cluster.muxes
        victim.kill9_with_bgp()
        wait_route(lab, vip, [survivor.mux.address6], timeout_s=90)
        conns.settle(3)
    finally:
        conns.close()
        cluster.remove_vip(vip)
        for mux in cluster.muxes:
            if not mux.alive():
                cluster.restart(mux)
    on_new = sum(1 for b in conns.backend if b == web3.name)
    print(f"\nIPv6 keep-alive: {renewed:.0f} flow renewals, {on_new} of 80 on the new backend, "
          f"{len(conns.broken)} broken after the kill")
    assert on_new > 0
    assert conns.broken == {}, f"{len(conns.broken)} broke after the kill: {list(conns.broken.items())[:5]}"


def _syn6_frame(dst_mac: str, src_mac: str, saddr: int, vip: str, sport: int) -> bytes:
    """An Ethernet frame holding an IPv6 TCP SYN to vip:80 (no TCP checksum: the mux never checks
    it, the backend drops the segment; this test reads what the mux did)."""
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x86\xdd"
    ip6 = struct.pack("!IHBB16s16s", 0x60000000, 20, 6, 64, saddr.to_bytes(16, "big"),
                      ipaddress.IPv6Address(vip).packed)
    return eth + ip6 + struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)


def _pins6(mux) -> dict[tuple[int, int, int, int], str]:
    """The mux's IPv6 TCP pins: (F1, F2, sport, dport) -> backend MAC."""
    out = netns.run(["nft", "-j", "list", "map", "netdev", "lbagent", "pins6_tcp"], netns=mux.netns,
                    timeout_s=60).stdout
    result = {}
    for item in json.loads(out)["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            f1, f2, sport, dport = key["concat"]
            result[(int(f1), _classid(f2), int(sport), int(dport))] = value
    return result


def test_ipv6_syns_of_unstable_buckets_are_pinned_as_decide_says_and_recorded_at_their_owners(cluster):
    """The IPv6 SYN rule (which forwards the SYN itself: the fingerprint overwrites the bucket in
    the mark): for 600 new IPv6 flows of unstable buckets sent at one mux, the kernel's pin, found
    under the fingerprint Python computes, is the backend `decide(...)` names, no SYN reached
    NFQUEUE, each was counted as a new flow, and each flow's owner holds a record with that
    backend (its backup a copy), read back with 128-bit addresses."""
    lab = cluster.lab
    for mux in cluster.muxes:
        if not mux.alive():
            cluster.restart(mux)
    vip, lid, count = "2001:db8:113::15", 65, 600
    web1, web2, web3 = lab.backends[:3]
    gen1, gen2 = [_b6(web1), _b6(web2)], [_b6(web1), _b6(web2), _b6(web3)]
    deadline = time.time() + 600
    cluster.set_vip(vip_doc(vip, [listener_doc(lid, gen2, generation=2, drain_timeout_s=600, previous={
        "generation": 1, "backends": gen1, "drain_deadline": deadline})]))
    try:
        old = build_generation(1, [f"{b['address']}:80" for b in gen1], None, TABLE_SIZE)
        new = build_generation(2, [f"{b['address']}:80" for b in gen2], None, TABLE_SIZE)
        tables = ListenerTables(current=new, old=(OldTable(old, deadline),))
        ownership = build_ownership([m.name for m in lab.muxes], owner_seed=OWNER_SEED,
                                    table_size=TABLE_SIZE)
        base = int(ipaddress.IPv6Address("fd00:99::"))
        want: dict[tuple[int, int], tuple[str, int, str, str | None]] = {}
        for i in range(1, 100 * count):
            saddr, sport = base + i * 7919, 1024 + (i * 31) % 60000
            bucket = flow_bucket(ipaddress.IPv6Address(saddr), vip, 6, sport, 80, seed=HASH_SEED,
                                 table_size=TABLE_SIZE)
            if not tables.unstable[bucket]:
                continue
            action = decide(tables=tables, bucket=bucket, is_syn=True, pin=None, local_record=None,
                            owners=ownership.owners(bucket), self_mux=lab.muxes[0].name)
            assert isinstance(action, RecordAndForward), action
            want[(saddr, sport)] = (action.backend, bucket, action.owner, action.backup)
            if len(want) == count:
                break
        assert len(want) == count
        mux = cluster.muxes[0]
        assert all(m.metric("lbagent_new_flow_reader_up") == 1 for m in cluster.muxes)
        queued_before = mux.metric("lbagent_slowpath_packets_total")
        new_before = mux.metric("lbagent_kernel_new_flows_total", listener=str(lid))
        rx_before = {b.name: _rx_packets(b.netns) for b in (web1, web2, web3)}
        sender = netns.socket_in(lab.router.netns, socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind(("br0", 0))
        def counted() -> int:
            return mux.metric("lbagent_kernel_new_flows_total", listener=str(lid)) - new_before

        try:
            # Correctness, not rate: batches of 50, each sent once the kernel has counted the last,
            # so no frame is dropped for a full queue.
            flows = list(want)
            for start in range(0, len(flows), 50):
                for saddr, sport in flows[start:start + 50]:
                    sender.send(_syn6_frame(mux.mux.mac, lab.router.mac, saddr, vip, sport))
                sent = min(start + 50, len(flows))
                wait_until(lambda sent=sent: counted() >= sent, timeout_s=120,
                           what=f"the kernel to count {sent} new IPv6 flows",
                           detail=lambda: f"counted {counted()}")
        finally:
            sender.close()
        assert mux.metric("lbagent_slowpath_packets_total") == queued_before, \
            "IPv6 SYNs of unstable buckets reached NFQUEUE: the kernel should have handled them"

        # Forwarded, not only pinned: each backend received at least the SYNs decided for it
        # (other packets, neighbour discovery, only add to its count).
        per_backend = collections.Counter(w[0] for w in want.values())

        def short() -> dict[str, tuple[int, int]]:
            received = {b.name: _rx_packets(b.netns) - rx_before[b.name] for b in (web1, web2, web3)}
            return {b.name: (received[b.name], per_backend[f"{b.address6}:80"]) for b in (web1, web2, web3)
                    if received[b.name] < per_backend[f"{b.address6}:80"]}

        wait_until(lambda: not short(), timeout_s=60, what="every backend to receive its SYNs",
                   detail=lambda: f"backends got fewer frames than SYNs sent to them: {short()}")
        macs = {f"{b.address6}:80": b.mac for b in lab.backends}
        kernel = _pins6(mux.mux)
        wrong = []
        for (saddr, sport), (backend, _, _, _) in want.items():
            f1, f2 = ipv6_fingerprint(ipaddress.IPv6Address(saddr), vip, seed=HASH_SEED)
            pinned = kernel.get((f1, f2, sport, 80))
            if (pinned or "").lower() != macs[backend].lower():
                wrong.append((saddr, sport, pinned, macs[backend]))
        assert wrong == [], f"{len(wrong)} of {count} IPv6 pins differ from decide(): {wrong[:5]}"

        vip_int = int(ipaddress.IPv6Address(vip))

        def held() -> dict[str, dict]:
            return {m.mux.name: {(r[1][0], r[1][3]): r for r in m.records()
                                 if r[0] == lid and r[1][1] == vip_int} for m in cluster.muxes}

        def missing(h: dict) -> list:
            return [f for f, w in want.items()
                    if f not in h[w[2]] or h[w[2]][f][4] or (w[3] is not None and f not in h[w[3]])]

        wait_until(lambda: not missing(held()), timeout_s=120, interval_s=0.2,
                   what="every IPv6 flow's record at its owner and backup",
                   detail=lambda: f"{len(missing(held()))} IPv6 flows lack their owner's record or copy")
        h = held()
        bad = [(f, h[w[2]][f][3], w[0]) for f, w in want.items() if h[w[2]][f][3] != w[0]]
        assert bad == [], f"{len(bad)} owner records differ from decide(): {bad[:5]}"
        assert {w[2] for w in want.values()} == {m.name for m in lab.muxes}, "both muxes should own some"
        assert mux.metric("lbagent_new_flow_reports_lost_total") == 0
    finally:
        cluster.remove_vip(vip)


# --- IPv6 UDP ----------------------------------------------------------------------------------

VIP_UDP = "2001:db8:113::16"
UDP_LISTENER = 66
UDP_FLOWS = 400


def _udp_doc(gen: int, backends: list[dict], previous: dict | None = None) -> dict:
    return vip_doc(VIP_UDP, [listener_doc(UDP_LISTENER, backends, generation=gen, protocol="udp",
                                          port=SERVICE_UDP_PORT, drain_timeout_s=DRAIN_S, previous=previous,
                                          backend_cap=BACKEND_CAP)])


def _b6u(node, **kw) -> dict:
    return _b6(node, port=SERVICE_UDP_PORT, **kw)


def test_ipv6_udp_datagrams_follow_the_table_and_keep_their_backend_across_an_add(cluster):
    """An IPv6 UDP listener: datagrams of UDP_FLOWS flows (one source port each) go through the
    router and the muxes' kernels to the backend the Python table names for the flow's bucket
    (the kernel's ip6 hash over the UDP 5-tuple); then a backend is added with a transition and
    every flow keeps being answered by its first backend (UDP has no SYN: every flow of a moved
    bucket goes to the slow path once, its owner decides from the old table, and the re-injected
    datagram pins it in pins6_udp)."""
    lab = cluster.lab
    for mux in cluster.muxes:
        if not mux.alive() or not mux.transitions:
            cluster.restart(mux, transitions=True)
    web1, web2, web3 = lab.backends[:3]
    gen1 = [_b6u(web1), _b6u(web2)]
    cluster.set_vip(_udp_doc(1, gen1))
    wait_route(lab, VIP_UDP, _mux_hops(lab), timeout_s=60)
    flows = UdpFlows(lab.clients[0].netns, VIP_UDP, UDP_FLOWS, SERVICE_UDP_PORT)
    slow_before = sum(m.metric("lbagent_slowpath_packets_total") for m in cluster.muxes)
    try:
        table1 = maglev_table([f"{b.address6}:{SERVICE_UDP_PORT}" for b in (web1, web2)], [1, 1], TABLE)
        wrong = []
        for i in range(UDP_FLOWS):
            if not flows.backend[i]:
                continue
            saddr, sport = flows.source(i)
            bucket = flow_bucket(saddr, VIP_UDP, 17, sport, SERVICE_UDP_PORT, seed=HASH_SEED,
                                 table_size=TABLE)
            expected = (web1, web2)[int(table1[bucket])].name
            if flows.backend[i] != expected:
                wrong.append((saddr, sport, flows.backend[i], expected))
        answered = sum(1 for b in flows.backend if b)
        previous = {"generation": 1, "backends": gen1, "drain_deadline": time.time() + DRAIN_S}
        cluster.set_vip(_udp_doc(2, [*gen1, _b6u(web3)], previous))
        for _ in range(3):
            flows.exchange_round()
        pinned = sum(len(pins(m.mux, "udp", ipv6=True)) for m in cluster.muxes)
        slow = sum(m.metric("lbagent_slowpath_packets_total") for m in cluster.muxes) - slow_before
    finally:
        flows.close()
        cluster.remove_vip(VIP_UDP)
    print(f"\nIPv6 UDP: {answered} of {UDP_FLOWS} flows answered before the add ({len(wrong)} off the "
          f"table); after the add {len(flows.broken)} changed backend, {len(flows.unanswered)} had a round "
          f"without an answer, {pinned} pinned in pins6_udp, {slow:.0f} slow-path packets")
    assert flows.unanswered == {}, f"UDP flows without an answer: {list(flows.unanswered.items())[:5]}"
    assert answered == UDP_FLOWS
    assert wrong == [], f"{len(wrong)} UDP flows answered by another backend than the table's: {wrong[:5]}"
    assert flows.broken == {}, f"UDP flows that changed backend: {list(flows.broken.items())[:5]}"
    assert slow > 0, "no datagram of a moved bucket reached the slow path: the add moved nothing"
    assert pinned > 0, "no IPv6 UDP flow was pinned"
