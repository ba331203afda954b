"""Long-lived connections survive every change (issue 11), on real TCP through the kernel muxes.

Each test keeps connections that exchange a line every second and shortens the lifetimes by
configuration (drain deadline, `flow_idle_timeout_s`) so it runs in well under two minutes;
`bench/longlived.py` runs the same add-a-backend case at the default lifetimes. Every wait is for
an event (a phase in the daemons' metrics, a route, an exchange round that started after some
moment), with a generous bound; no assertion depends on how fast the machine is."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lbagent.lab.harness import LongConnections, backend_doc, listener_doc, vip_doc, wait_route
from tests.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# flow_idle_timeout_s: pins and records live this long without a packet. A connection's packets
# are a round apart (INTERVAL_S plus the round itself: 150-300 connections served by one thread),
# and a loaded machine stretches a round by seconds; a pin or record that expires between two
# packets of a live flow breaks what the tests prove (moved flows through the slow path again,
# flows opened mid-transition sent by the old table). 10x the interval keeps that out of reach.
IDLE_S = 10
INTERVAL_S = 1.0  # every connection exchanges a line every second
BOUND_S = 90  # generous bound for any single event on a loaded machine


@pytest.fixture
def muxes_up(cluster):
    for mux in cluster.muxes:
        if not mux.alive() or not mux.transitions:
            cluster.restart(mux, transitions=True)
    yield cluster
    for mux in cluster.muxes:
        if not mux.alive() or not mux.transitions:
            cluster.restart(mux, transitions=True)


def _phase(cluster, listener_id: int, state: str) -> bool:
    """Every running mux reports the listener in `state` (draining, lingering, stateless)."""
    running = [m for m in cluster.muxes if m.alive()]
    return bool(running) and all(
        m.metric("lbagent_listener_transition", listener=str(listener_id), state=state) == 1 for m in running)


def _left(cluster, listener_id: int, state: str) -> bool:
    """Every running mux reports the listener, and none of them in `state` any more."""
    running = [m for m in cluster.muxes if m.alive()]
    for m in running:
        phases = {s: m.metric("lbagent_listener_transition", listener=str(listener_id), state=s)
                  for s in ("draining", "lingering", "stateless")}
        if sum(phases.values()) != 1 or phases[state] == 1:
            return False
    return bool(running)


def _rounds_started_after(conns: LongConnections, moment: float, rounds: int) -> None:
    """Wait until `rounds` exchange rounds have started at or after `moment` (and completed)."""
    def done() -> bool:
        started = [i for i, t in enumerate(conns.round_started) if t >= moment]
        return len(started) >= rounds and conns.rounds > started[rounds - 1]
    wait_until(done, timeout_s=max(0.0, moment - time.time()) + rounds * 10 + BOUND_S,
               what=f"{rounds} exchange rounds after {moment:.1f}")


def _previous(generation: int, backends: list[dict], drain_s: float) -> tuple[dict, float]:
    deadline = time.time() + drain_s
    return {"generation": generation, "backends": backends, "drain_deadline": deadline}, deadline


def test_connections_outlive_every_lifetime_after_an_add_then_survive_a_mux_kill(muxes_up):
    """Acceptance 1: 200 connections survive adding a backend for more than 3x the drain timeout
    and 3x the idle timeout of pins and records (the transition's own lifetime is the drain),
    then a mux killed with kill -9 (daemon and ExaBGP): the router sends everything to the
    other mux, which has no pins for those flows and answers them from the owner records."""
    cluster = muxes_up
    lab = cluster.lab
    vip, lid, drain_s = "203.0.113.13", 31, 4
    web1, web2, web3, web4 = lab.backends[:4]
    gen1 = [backend_doc(web1), backend_doc(web2), backend_doc(web3)]

    def doc(gen: int, backends: list[dict], previous: dict | None) -> dict:
        return vip_doc(vip, [listener_doc(lid, backends, generation=gen, drain_timeout_s=drain_s,
                                          previous=previous, flow_idle_timeout_s=IDLE_S)])

    cluster.set_vip(doc(1, gen1, None))
    wait_route(lab, vip, [m.address for m in lab.muxes])
    conns = LongConnections(lab.clients[0].netns, vip, 200, interval_s=INTERVAL_S)
    fresh: LongConnections | None = None
    try:
        conns.start_background()
        previous, _deadline = _previous(1, gen1, drain_s)
        changed_at = time.time()
        cluster.set_vip(doc(2, [*gen1, backend_doc(web4)], previous))
        # Connections opened during the transition: those in moved buckets are on the new
        # backend, which no old table names; after the kill only their owner records (kept
        # alive by the keep-alive, far past the idle timeout) can send them there.
        fresh = LongConnections(lab.clients[0].netns, vip, 100, interval_s=INTERVAL_S)
        fresh.start_background()
        wait_until(lambda: _phase(cluster, lid, "lingering"), timeout_s=BOUND_S,
                   what="both muxes past the drain deadline, keeping the moved flows (lingering)")
        slow_before = cluster.total("lbagent_slowpath_packets_total")
        lifetime = 3 * max(drain_s, IDLE_S)
        _rounds_started_after(conns, max(changed_at + lifetime, time.time() + 2 * IDLE_S), 1)
        assert conns.broken == {}, f"broken after the add: {list(conns.broken.items())[:5]}"
        assert _phase(cluster, lid, "lingering"), "active moved flows must keep the old table alive"
        records = cluster.total("lbagent_flow_records")
        assert records >= 10, f"only {records} records: the moved flows were not recorded"
        # The kernel renews each pin with every packet: over two idle timeouts and more, a moved
        # flow's packets stay in the kernel. Pins that merely expired and were re-learned through
        # the slow path would send every moved flow there again each idle timeout.
        moved_flows = records / 2  # each record is held by its owner and its backup
        slow = cluster.total("lbagent_slowpath_packets_total") - slow_before
        assert slow < moved_flows, (f"{slow:.0f} slow-path packets for {moved_flows:.0f} moved flows: the "
                                    "pins were not renewed by their packets")
        assert cluster.total("lbagent_keepalive_flows_total") > 0, "no pinned flow renewed its records"

        victim, survivor = cluster.muxes
        local_before = survivor.metric("lbagent_slowpath_decisions_total", reason="local_record")
        victim.kill9_with_bgp()
        wait_route(lab, vip, [survivor.mux.address], timeout_s=BOUND_S)
        killed_at = time.time()
        _rounds_started_after(conns, killed_at + 2 * IDLE_S, 1)
        answered = survivor.metric("lbagent_slowpath_decisions_total", reason="local_record") - local_before
    finally:
        conns.close()
        if fresh is not None:
            fresh.close()
        cluster.remove_vip(vip)
    on_new = sum(1 for b in fresh.backend if b == web4.name)
    print(f"\nadd then kill -9: {len(conns.broken)} of 200 broken, {len(fresh.broken)} of 100 opened during "
          f"the transition ({on_new} on the new backend), {records:.0f} records held, {answered:.0f} flows "
          f"answered from owner records after the kill")
    assert conns.broken == {}, f"broken after the kill: {list(conns.broken.items())[:5]}"
    assert on_new > 0
    assert fresh.broken == {}, f"opened during the transition, broken: {list(fresh.broken.items())[:5]}"
    assert answered > 0, "no flow reached the surviving mux without a pin: the kill moved nothing"


@pytest.mark.parametrize("how", ["drained", "removed"])
def test_a_drained_backend_keeps_its_connections_until_the_deadline_and_no_longer(muxes_up, how):
    """Acceptance 2 (Octavia's drain): a drained backend's (or one removed with a drain)
    connections live until the deadline and end at the first exchange after the muxes reach it;
    no other connection breaks."""
    cluster = muxes_up
    lab = cluster.lab
    vip, lid, drain_s = "203.0.113.14", 32, 10
    web1, web2, web3 = lab.backends[:3]
    gen1 = [backend_doc(web1), backend_doc(web2), backend_doc(web3)]

    def doc(gen: int, backends: list[dict], previous: dict | None) -> dict:
        return vip_doc(vip, [listener_doc(lid, backends, generation=gen, drain_timeout_s=drain_s,
                                          previous=previous, flow_idle_timeout_s=IDLE_S)])

    cluster.set_vip(doc(1, gen1, None))
    wait_route(lab, vip, [m.address for m in lab.muxes])
    conns = LongConnections(lab.clients[0].netns, vip, 150, interval_s=INTERVAL_S)
    try:
        conns.start_background()
        previous, deadline = _previous(1, gen1, drain_s)
        gen2 = gen1[1:] if how == "removed" else [backend_doc(web1, state="draining"), *gen1[1:]]
        cluster.set_vip(doc(2, gen2, previous))
        wait_until(lambda: time.time() >= deadline and _left(cluster, lid, "draining"),
                   timeout_s=drain_s + BOUND_S, what="both muxes past the drain deadline")
        ended_at = time.time()
        _rounds_started_after(conns, ended_at, 2)
    finally:
        conns.close()
        cluster.remove_vip(vip)
    drained = {i for i, b in enumerate(conns.backend) if b == web1.name}
    assert drained, "no connection was on the drained backend"
    early = {i: conns.broken[i] for i in drained if i in conns.broken
             and conns.round_started[conns.broken_round[i]] < deadline}
    assert early == {}, f"drained backend's connections broke before the deadline: {list(early.items())[:3]}"
    first_after = next(r for r, t in enumerate(conns.round_started) if t >= ended_at)
    late = {i for i in drained if i not in conns.broken or conns.broken_round[i] > first_after}
    assert late == set(), (f"{len(late)} drained connections still worked after the deadline: rounds "
                           f"{sorted((conns.broken_round.get(i), conns.broken.get(i)) for i in late)[:5]}, "
                           f"first round after the end {first_after}, rounds {conns.rounds}; "
                           + " | ".join(m.log_tail(1500) for m in cluster.muxes))
    others = {i: why for i, why in conns.broken.items() if i not in drained}
    assert others == {}, f"connections of other backends broke: {list(others.items())[:5]}"
    delays = sorted(conns.broken_at[i] - deadline for i in drained)
    print(f"\n{how}: {len(drained)} connections on the {how} backend ended "
          f"{delays[0]:.2f}-{delays[-1]:.2f} s after the deadline (exchanges every {INTERVAL_S} s); "
          f"{len(conns.backend) - len(drained)} others intact")


def test_scaling_to_one_backend_enters_bypass_only_after_the_drain(muxes_up):
    """Acceptance 3: 3 -> 1 with a drain keeps the route on the muxes until the deadline (no
    connection breaks before it), then moves it to the backend's host; 1 -> 3 breaks nothing."""
    cluster = muxes_up
    lab = cluster.lab
    vip, lid, drain_s = "203.0.113.13", 33, 8
    web1, web2, web3 = lab.backends[:3]
    gen1 = [backend_doc(web1), backend_doc(web2), backend_doc(web3)]
    muxes = [m.address for m in lab.muxes]

    def doc(gen: int, backends: list[dict], previous: dict | None, bypass: bool) -> dict:
        return vip_doc(vip, [listener_doc(lid, backends, generation=gen, drain_timeout_s=drain_s,
                                          previous=previous, flow_idle_timeout_s=IDLE_S)],
                       bypass=bypass, bypass_next_hop=web3.address if bypass else None)

    cluster.set_vip(doc(1, gen1, None, False))
    wait_route(lab, vip, muxes)
    conns = LongConnections(lab.clients[0].netns, vip, 150, interval_s=INTERVAL_S)
    later: LongConnections | None = None
    try:
        conns.start_background()
        previous, deadline = _previous(1, gen1, drain_s)
        cluster.set_vip(doc(2, [backend_doc(web3)], previous, True))
        routes_during_drain = lab.router_routes(vip)
        wait_route(lab, vip, [web3.address], timeout_s=drain_s + BOUND_S)
        moved_at = time.time()
        _rounds_started_after(conns, moved_at, 2)
        on_removed = {i for i, b in enumerate(conns.backend) if b in (web1.name, web2.name)}
        early = {i: why for i, why in conns.broken.items()
                 if conns.round_started[conns.broken_round[i]] < deadline}
        on_kept = {i: why for i, why in conns.broken.items() if i not in on_removed}
        # connections opened while in bypass (straight to web-3's host), then scale back up
        later = LongConnections(lab.clients[0].netns, vip, 50, interval_s=INTERVAL_S)
        later.start_background()
        previous, _ = _previous(2, [backend_doc(web3)], drain_s)
        cluster.set_vip(doc(3, gen1, previous, False))
        wait_route(lab, vip, muxes, timeout_s=BOUND_S)
        back_at = time.time()
        _rounds_started_after(later, back_at, 3)
        _rounds_started_after(conns, back_at, 3)
    finally:
        conns.close()
        if later is not None:
            later.close()
        cluster.remove_vip(vip)
    print(f"\n3 -> 1: route {routes_during_drain} during the drain, {web3.address} "
          f"{moved_at - deadline:+.2f} s after the deadline; {len(on_removed)} connections on removed "
          f"backends; 1 -> 3: "
          f"{len(later.broken)} of 50 bypass connections broken")
    assert routes_during_drain == sorted(muxes), "the route left the muxes before the drain deadline"
    assert moved_at >= deadline
    assert early == {}, f"connections broke before the deadline: {list(early.items())[:5]}"
    assert on_kept == {}, f"connections on the kept backend broke: {list(on_kept.items())[:5]}"
    assert later.broken == {}, f"scaling back up broke bypass connections: {list(later.broken.items())[:5]}"
    after_back = {i: why for i, why in conns.broken.items() if i not in on_removed}
    assert after_back == {}


def test_a_change_without_previous_drains_from_what_the_mux_runs(muxes_up):
    """Acceptance 4: a document that adds a backend but carries no `previous` breaks nothing: the
    mux transitions from the generation it runs, and says so in its log."""
    cluster = muxes_up
    lab = cluster.lab
    vip, lid, drain_s = "203.0.113.14", 34, 3
    web1, web2, web3, web4 = lab.backends[:4]
    gen1 = [backend_doc(web1), backend_doc(web2), backend_doc(web3)]

    def doc(gen: int, backends: list[dict]) -> dict:
        return vip_doc(vip, [listener_doc(lid, backends, generation=gen, drain_timeout_s=drain_s,
                                          previous=None, flow_idle_timeout_s=IDLE_S)])

    cluster.set_vip(doc(1, gen1))
    wait_route(lab, vip, [m.address for m in lab.muxes])
    conns = LongConnections(lab.clients[0].netns, vip, 200, interval_s=INTERVAL_S)
    try:
        conns.start_background()
        changed_at = time.time()
        cluster.set_vip(doc(2, [*gen1, backend_doc(web4)]))
        wait_until(lambda: _phase(cluster, lid, "lingering"), timeout_s=BOUND_S,
                   what="both muxes past the synthesized drain, keeping the moved flows")
        _rounds_started_after(conns, changed_at + 3 * max(drain_s, IDLE_S), 1)
    finally:
        conns.close()
        cluster.remove_vip(vip)
    print(f"\nno previous: {len(conns.broken)} of 200 broken")
    assert conns.broken == {}, f"broken: {list(conns.broken.items())[:5]}"
    for mux in cluster.muxes:
        assert f"listener {lid}: generation 2 has no `previous`: draining from the running generation 1" \
            in mux.log_tail(200_000)


def test_lab_up_writes_ready_documents_that_the_state_commands_edit(lab):
    """`lbagent lab up` writes one desired-state document per mux; `lbagent validate` accepts them
    and `lbagent state drain-backend` turns them into the next generation with `previous`."""
    import json

    from lbagent.cli import main as lbagent
    from lbagent.lab.cli import write_desired_states

    files = [str(p) for p in write_desired_states(lab).values()]
    assert len(files) == len(lab.muxes)
    assert lbagent(["validate", *files]) == 0
    web1 = lab.backends[0]
    assert lbagent(["state", "drain-backend", *files, "--listener", "1", "--address", web1.address]) == 0
    assert lbagent(["validate", *files]) == 0
    for path in files:
        listener = json.loads(Path(path).read_text())["vips"][0]["listeners"][0]
        assert listener["generation"] == 2
        assert listener["previous"]["generation"] == 1
        assert [b["state"] for b in listener["backends"]] == ["draining", "active", "active"]
