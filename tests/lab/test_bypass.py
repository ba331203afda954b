"""Single-backend bypass: the router sends a one-backend VIP straight to the backend's host (the
muxes keep nothing for it); scaling back up puts the muxes in the path again, make before break,
and connections opened during bypass stay on their backend."""

from __future__ import annotations

import collections
import time

import pytest

from lbagent.lab import netns
from lbagent.lab.harness import (
    LongConnections,
    ask,
    backend_doc,
    listener_doc,
    vip_doc,
    wait_route,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

VIP = "203.0.113.12"
LISTENER = 12


def _rx_packets(ns: str) -> int:
    return int(netns.run(["cat", "/sys/class/net/eth0/statistics/rx_packets"], netns=ns).stdout)


def test_bypass_moves_the_route_and_scale_up_keeps_connections(cluster):
    lab = cluster.lab
    web1, web2 = lab.backends[:2]
    client = lab.clients[0].netns
    mux_addresses = [m.address for m in lab.muxes]
    two = [backend_doc(web1), backend_doc(web2)]
    cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, two, generation=1)]))
    wait_route(lab, VIP, mux_addresses)
    try:
        # Scale down to one backend: the VIP goes into bypass with its host as next hop.
        one = [backend_doc(web1)]
        started = time.monotonic()
        cluster.vips[VIP] = vip_doc(VIP, [listener_doc(LISTENER, one, generation=2, previous={
            "generation": 1, "backends": two, "drain_deadline": time.time() + 60})],
            bypass=True, bypass_next_hop=web1.address)
        cluster.publish()
        wait_route(lab, VIP, [web1.address], timeout_s=5)
        moved_s = time.monotonic() - started
        assert moved_s < 1.0, f"the router's route moved to the backend host after {moved_s:.2f} s"
        print(f"\nbypass: route moved to {web1.address} in {moved_s * 1000:.0f} ms")

        rx_before = [_rx_packets(m.netns) for m in lab.muxes]
        answers = collections.Counter(ask(client, VIP) for _ in range(200))
        during_bypass = LongConnections(client, VIP, 50)
        rx_after = [_rx_packets(m.netns) for m in lab.muxes]
        assert answers == {web1.name: 200}
        assert set(during_bypass.backend) == {web1.name}
        # 250 connections are at least 1,000 packets towards the VIP; what a mux received meanwhile
        # is only BGP keepalives and ARP.
        seen = [a - b for a, b in zip(rx_after, rx_before, strict=True)]
        assert all(n < 30 for n in seen), f"muxes received {seen} packets during bypass"

        # Scale back up: tables first (old table = everything to web-1), then the muxes announce.
        during_bypass.start_background()
        cluster.vips[VIP] = vip_doc(VIP, [listener_doc(LISTENER, two, generation=3, previous={
            "generation": 2, "backends": one, "drain_deadline": time.time() + 60})])
        cluster.publish()
        wait_route(lab, VIP, mux_addresses, timeout_s=5)
        during_bypass.settle(3)
        assert during_bypass.broken == {}, f"connections from the bypass broke: {during_bypass.broken}"
        slow = sum(m.metric("lbagent_slowpath_packets_total") for m in cluster.muxes)
        print(f"scale-up: 0 of 50 bypass connections broken; slow path decided {slow:.0f} packets")
        after = collections.Counter(ask(client, VIP) for _ in range(200))
        assert set(after) == {web1.name, web2.name}, f"new connections after scale-up: {after}"
        assert sum(m.metric("lbagent_listener_packets_total", listener=str(LISTENER))
                   for m in cluster.muxes) > 0
        during_bypass.close()
    finally:
        cluster.remove_vip(VIP)
