"""Decision rule 3's SYN case compiled into nft: for every new flow of an unstable bucket the
kernel pins exactly the backend `lbagent.core.decide.decide` names, forwards the SYN without
userspace (no NFQUEUE packet), and the flow's owner mux ends up holding the record (reported
through nfnetlink_log, recorded locally or sent to the other mux), with a copy at the backup."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from lbagent.core.decide import RecordAndForward, decide
from lbagent.core.flowhash import flow_bucket
from lbagent.core.ownership import build_ownership
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.lab import netns
from lbagent.lab.flood import tcp_frames, unstable_flows
from lbagent.lab.harness import (
    HASH_SEED,
    OWNER_SEED,
    TABLE_SIZE,
    backend_doc,
    listener_doc,
    pins,
    vip_doc,
)


def int_to_ipv4(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


pytestmark = [pytest.mark.lab, pytest.mark.slow]

VIP = "203.0.113.18"  # not used by the other lab tests
LISTENER = 18
FLOWS = 1200


def _wait(what: str, check, timeout_s: float = 60.0) -> None:
    """Poll until `check()` is true; the deadline only stops a hung test (no timing is asserted)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_kernel_pins_new_flows_as_decide_says_and_owners_record_them(cluster):
    lab = cluster.lab
    web1, web2, web3 = lab.backends[:3]
    gen1 = [backend_doc(web1), backend_doc(web2)]
    gen2 = [*gen1, backend_doc(web3)]
    deadline = time.time() + 600
    previous = {"generation": 1, "backends": gen1, "drain_deadline": deadline}
    cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, gen2, generation=2, drain_timeout_s=600,
                                               previous=previous)]))
    try:
        old = build_generation(1, [f"{b['address']}:80" for b in gen1], None, TABLE_SIZE)
        new = build_generation(2, [f"{b['address']}:80" for b in gen2], None, TABLE_SIZE)
        tables = ListenerTables(current=new, old=(OldTable(old, deadline),))
        ownership = build_ownership([m.name for m in lab.muxes], owner_seed=OWNER_SEED, table_size=TABLE_SIZE)
        flows = unstable_flows(FLOWS, tables, VIP, seed=HASH_SEED, table_size=TABLE_SIZE, rng_seed=15)
        mux = cluster.muxes[0]
        assert all(m.metric("lbagent_new_flow_reader_up") == 1 for m in cluster.muxes)
        queued_before = mux.metric("lbagent_slowpath_packets_total")
        new_before = mux.metric("lbagent_kernel_new_flows_total", listener=str(LISTENER))

        sender = netns.socket_in(lab.router.netns, socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind(("br0", 0))
        try:
            for frame in tcp_frames(mux.mux.mac, lab.router.mac, flows, VIP):
                sender.send(frame)
                time.sleep(0.0002)  # this test is about correctness, not rate: no drops wanted
        finally:
            sender.close()

        _wait("the kernel to count every new flow", lambda: mux.metric(
            "lbagent_kernel_new_flows_total", listener=str(LISTENER)) - new_before >= FLOWS)
        assert mux.metric("lbagent_slowpath_packets_total") == queued_before, \
            "SYNs of unstable buckets reached NFQUEUE: the kernel should have handled them"

        # What the specification says for each flow.
        macs = {f"{b.address}:80": b.mac for b in lab.backends}
        want: dict[tuple[str, str, int, int], tuple[str, int, str, str | None]] = {}
        vip_int = int.from_bytes(socket.inet_aton(VIP), "big")
        for saddr, sport in flows:
            bucket = flow_bucket(int_to_ipv4(saddr), VIP, 6, sport, 80, seed=HASH_SEED, table_size=TABLE_SIZE)
            action = decide(tables=tables, bucket=bucket, is_syn=True, pin=None, local_record=None,
                            owners=ownership.owners(bucket), self_mux=mux.mux.name)
            assert isinstance(action, RecordAndForward), action
            want[(int_to_ipv4(saddr), VIP, sport, 80)] = (action.backend, bucket, action.owner, action.backup)

        kernel = pins(mux.mux)
        wrong = [(f, kernel.get(f), macs[b]) for f, (b, _, _, _) in want.items()
                 if (kernel.get(f) or "").lower() != macs[b].lower()]
        assert wrong == [], f"{len(wrong)} of {len(want)} kernel pins differ from decide(): {wrong[:5]}"

        # Records: the owner holds one (not a replica) with decide()'s backend, the backup a copy.
        def held() -> dict[str, dict]:
            out = {}
            for m in cluster.muxes:
                out[m.mux.name] = {(int_to_ipv4(r[1][0]), int_to_ipv4(r[1][1]), r[1][3], r[1][4]): r
                                   for r in m.records() if r[0] == LISTENER and r[1][1] == vip_int}
            return out

        def missing() -> list:
            h = held()
            return [(f, w) for f, w in want.items()
                    if f not in h[w[2]] or h[w[2]][f][4] or (w[3] is not None and f not in h[w[3]])]

        _wait("every owner and backup to hold the records", lambda: not missing())
        h = held()
        bad = [(f, h[w[2]][f][3], w[0]) for f, w in want.items() if h[w[2]][f][3] != w[0]]
        assert bad == [], f"{len(bad)} owner records differ from decide(): {bad[:5]}"
        owners = {w[2] for w in want.values()}
        assert owners == {m.name for m in lab.muxes}, f"flows owned by {owners}: both muxes should own some"
        assert mux.metric("lbagent_new_flow_reports_lost_total") == 0
    finally:
        cluster.remove_vip(VIP)
