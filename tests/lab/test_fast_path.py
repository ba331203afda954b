"""The kernel fast path on live TCP: weights, correct backends, statelessness, and the kernel's
bucket equal to Python's for every flow."""

from __future__ import annotations

import collections
import json
import os
import signal
import time

import pytest

from lbagent.core.flowhash import flow_bucket
from lbagent.core.maglev import maglev_table
from lbagent.lab.harness import (
    HASH_SEED,
    backend_doc,
    connect_and_ask,
    learned_buckets,
    listener_doc,
    vip_doc,
    wait_route,
    write_atomically,
)
from lbagent.state import table_size_for_cap
from tests.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

VIP = "203.0.113.10"
LISTENER = 10
WEIGHTS = (1, 2, 3)
# This listener's own table (cluster.table_size stays 65,537): proves the per-listener size
# end to end, the daemon's Maglev table, the kernel's `mod` and Python's flow_bucket agreeing.
BACKEND_CAP = 8
LISTENER_TABLE_SIZE = table_size_for_cap(BACKEND_CAP)  # 809


@pytest.fixture(scope="module")
def weighted_vip(cluster):
    backends = cluster.lab.backends[:3]
    docs = [backend_doc(b, weight=w) for b, w in zip(backends, WEIGHTS, strict=True)]
    cluster.set_vip(vip_doc(VIP, [listener_doc(LISTENER, docs, backend_cap=BACKEND_CAP)]))
    wait_route(cluster.lab, VIP, [m.address for m in cluster.lab.muxes])
    # What every mux must compute: the Maglev table over `address:port` names with these weights.
    table = maglev_table([f"{b.address}:80" for b in backends], list(WEIGHTS), LISTENER_TABLE_SIZE)
    yield backends, table
    cluster.remove_vip(VIP)


def test_short_connections_follow_weights_and_the_table(cluster, weighted_vip):
    backends, table = weighted_vip
    client = cluster.lab.clients[0]
    answers = [connect_and_ask(client.netns, VIP) for _ in range(1000)]

    wrong = []
    for saddr, sport, name in answers:
        bucket = flow_bucket(saddr, VIP, 6, sport, 80, seed=HASH_SEED, table_size=LISTENER_TABLE_SIZE)
        expected = backends[int(table[bucket])].name
        if name != expected:
            wrong.append((saddr, sport, name, expected))
    assert wrong == [], f"{len(wrong)} answers came from another backend than the table's: {wrong[:5]}"

    counts = collections.Counter(name for _, _, name in answers)
    assert set(counts) == {b.name for b in backends}
    for backend, weight in zip(backends, WEIGHTS, strict=True):
        share = counts[backend.name] / len(answers)
        expected = weight / sum(WEIGHTS)
        # Four standard deviations of a share of 1,000 independent flows (0.047-0.063): the table
        # is exact, only the sample of client ports varies.
        tolerance = 4 * (expected * (1 - expected) / len(answers)) ** 0.5
        assert abs(share - expected) < tolerance, (
            f"{backend.name}: {share:.3f} of connections, weight share {expected:.3f} (+-{tolerance:.3f})")
    # Both muxes carried traffic (ECMP on ports), and the per-backend counters saw it.
    per_mux = [m.metric("lbagent_listener_packets_total", listener=str(LISTENER)) for m in cluster.muxes]
    assert all(p > 0 for p in per_mux), f"listener packets per mux: {per_mux}"


def _stateless_counters(mux) -> dict[str, float]:
    return {
        "slow-path packets": mux.metric("lbagent_slowpath_packets_total"),
        "packets handed to the slow path": mux.metric("lbagent_slowpath_accepted_packets_total",
                                                       listener=str(LISTENER)),
        "pinned packets": mux.metric("lbagent_pinned_packets_total", listener=str(LISTENER)),
        "packets re-injected": mux.metric("lbagent_kernel_reinjected_packets_total"),
    }


def test_steady_state_is_stateless(cluster, weighted_vip):
    client = cluster.lab.clients[0]
    before_packets = cluster.total("lbagent_listener_packets_total", listener=str(LISTENER))
    before = [_stateless_counters(m) for m in cluster.muxes]
    deadline = time.monotonic() + 2.0
    count = 0
    while time.monotonic() < deadline:  # steady traffic for two seconds
        connect_and_ask(client.netns, VIP)
        count += 1
    after_packets = cluster.total("lbagent_listener_packets_total", listener=str(LISTENER))
    assert after_packets - before_packets >= 5 * count, "the muxes did not see the traffic"
    for mux, old in zip(cluster.muxes, before, strict=True):
        new = _stateless_counters(mux)
        grew = {k: new[k] - old[k] for k in new if new[k] != old[k]}
        assert grew == {}, f"{mux.mux.name} kept state in steady state: {grew}"
        assert mux.metric("lbagent_flow_records") == 0, mux.mux.name
        assert mux.metric("lbagent_listeners_in_transition") == 0, mux.mux.name


def test_kernel_and_python_agree_on_buckets(cluster, weighted_vip):
    client = cluster.lab.clients[0]
    for _ in range(1000):
        connect_and_ask(client.netns, VIP)
    learned: dict = {}
    for mux in cluster.lab.muxes:
        learned.update(learned_buckets(mux, LISTENER))
    assert len(learned) >= 1000
    mismatches = [
        (flow, kernel) for flow, kernel in learned.items()
        if flow_bucket(flow[0], flow[1], 6, flow[2], flow[3], seed=HASH_SEED,
                       table_size=LISTENER_TABLE_SIZE) != kernel
    ]
    assert mismatches == [], f"{len(mismatches)} of {len(learned)} flows hashed differently: {mismatches[:5]}"


def test_a_bad_config_file_is_refused_and_the_applied_state_kept(cluster, weighted_vip):
    mux = cluster.muxes[0]
    errors_before = mux.metric("lbagent_config_errors_total")
    applied = mux.metric("lbagent_config_generation")
    applies = mux.metric("lbagent_applies_total")
    good = mux.config.read_text()
    try:
        write_atomically(mux.config, good.replace('"table_size": 65537', '"table_size": 65536'))
        wait_until(lambda: mux.metric("lbagent_config_errors_total") != errors_before, timeout_s=60,
                   interval_s=0.05, what="the daemon to report the refused config")
        assert "table_size" in mux.log_tail(), "the log does not name the offending field"
        # a refused file changes nothing: no apply, and no log line that reads as if it were applied
        tail = mux.log_tail(20_000)
        assert " INFO applied generation" not in tail[tail.rindex("refused"):], tail[-1500:]
        assert mux.metric("lbagent_applies_total") == applies
        assert mux.metric("lbagent_config_generation") == applied
        client = cluster.lab.clients[0]
        names = {connect_and_ask(client.netns, VIP)[2] for _ in range(50)}
        assert names <= {b.name for b in weighted_vip[0]}
    finally:
        write_atomically(mux.config, good)


def test_a_dead_exabgp_is_restarted_and_the_route_comes_back(cluster, weighted_vip):
    lab = cluster.lab
    mux = cluster.muxes[0]
    pid = int((mux.dir / "bgp" / "exabgp.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    # The session drops (the router loses this mux's route), the daemon notices, starts a new
    # ExaBGP and re-announces; ECMP over both muxes again.
    wait_route(lab, VIP, [m.address for m in lab.muxes], timeout_s=30)
    wait_until(lambda: mux.metric("lbagent_bgp_speaker_restarts_total") >= 1, timeout_s=60,
               interval_s=0.05, what="the daemon to count the ExaBGP restart")
    assert int((mux.dir / "bgp" / "exabgp.pid").read_text()) != pid
    names = {connect_and_ask(lab.clients[0].netns, VIP)[2] for _ in range(30)}
    assert names <= {b.name for b in weighted_vip[0]}


def test_a_vip_a_mux_cannot_apply_keeps_its_last_state_and_every_other_vip_stays_served(
    cluster, weighted_vip
):
    """A backend whose MAC cannot be resolved (no such host on the segment) refuses only the VIP
    that names it. A VIP that was running keeps its last applied tables and its route; a new VIP
    is not announced; the refusal shows in the metrics; and the apply itself succeeds, so no other
    VIP leaves this mux. A config without the bad backend clears it."""
    backends, _ = weighted_vip
    lab = cluster.lab
    mux = cluster.muxes[0]
    both = [m.address for m in lab.muxes]
    ghost_vip = "203.0.113.19"
    good = json.loads(mux.config.read_text())
    broken = json.loads(json.dumps(good))
    ghost = {"address": "10.90.0.99", "port": 80, "weight": 1, "state": "active", "mac": None,
             "host": "ghost"}
    listener = next(v for v in broken["vips"] if v["address"] == VIP)["listeners"][0]
    listener["previous"] = {"generation": listener["generation"], "backends": listener["backends"],
                            "drain_deadline": time.time() + 60}
    listener["generation"] += 1
    listener["backends"] = [*listener["backends"], ghost]
    broken["vips"].append(vip_doc(ghost_vip, [listener_doc(19, [ghost])]))
    broken["generation"] = cluster.generation + 1
    errors_before = mux.metric("lbagent_apply_errors_total")

    def refused() -> set[str]:
        return {dict(labels)["vip"] for (name, labels), value in mux.metrics().items()
                if name == "lbagent_vip_refused" and value == 1}

    try:
        write_atomically(mux.config, json.dumps(broken))
        mux.wait_applied(broken["generation"])
        assert refused() == {VIP, ghost_vip}
        assert mux.metric("lbagent_apply_errors_total") == errors_before
        time.sleep(1.0)  # what the router would have heard by now
        assert lab.router_routes(VIP) == sorted(both), "the refused VIP's old state is still served"
        assert lab.router_routes(ghost_vip) == [], "a VIP this mux cannot serve must not be announced"
        names = {connect_and_ask(lab.clients[0].netns, VIP)[2] for _ in range(60)}
        assert names <= {b.name for b in backends}
    finally:
        cluster.generation += 2  # keep the cluster's numbering ahead of what this mux saw
        good["generation"] = cluster.generation
        write_atomically(mux.config, json.dumps(good))
    mux.wait_applied(cluster.generation)
    assert refused() == set()
    wait_route(lab, VIP, both, timeout_s=30)
