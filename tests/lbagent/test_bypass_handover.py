"""Entering single-backend bypass is make-before-break: the mux announces the backend's host as
next hop while its kernel still forwards the VIP (every bucket to the single backend), and removes
the VIP's kernel state only after BYPASS_HANDOVER_S, so packets the router still sends to the mux
until it has switched are forwarded, not reset (a lab run saw 52 resets on the kept backend).

Pure planning (no kernel, no root): the daemon's planner is driven with explicit clocks, and what
an apply records after a successful kernel transaction is mimicked by `commit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lbagent.daemon import BYPASS_HANDOVER_S, DaemonOptions, MuxDaemon
from lbagent.state import parse_state

VIP = "203.0.113.10"
KEPT = "10.1.0.5"
BACKENDS = [KEPT, "10.1.0.6", "10.1.0.7"]
T0 = 1_800_000_000.0


def _backend(address: str) -> dict:
    return {"address": address, "port": 80, "weight": 1, "state": "active",
            "mac": "02:00:00:00:00:0" + address[-1], "host": None}


def _document(generation: int, backends: list[str], *, bypass: bool,
              previous: tuple[int, list[str], float] | None = None) -> str:

    listener = {"id": 12, "protocol": "tcp", "port": 80, "generation": generation, "drain_timeout_s": 10,
                "backends": [_backend(a) for a in backends], "table_size": 251,
                "previous": None if previous is None else {
                    "generation": previous[0], "backends": [_backend(a) for a in previous[1]],
                    "drain_deadline": previous[2]}}
    return json.dumps({
        "version": 1, "generation": generation, "node": "mux-a",
        "cluster": {"hash_seed": 24301, "table_size": 251, "owner_seed": 7919,
                    "muxes": [{"name": "mux-a", "address": "10.0.0.2", "peer_port": 4790}],
                    "peer_key": "11" * 32, "redirect_key": "22" * 32, "max_records": 1000},
        "vips": [{"address": VIP, "bypass": bypass, "bypass_next_hop": KEPT if bypass else None,
                  "fast_path": False, "listeners": [listener]}],
    })


def _daemon() -> MuxDaemon:
    return MuxDaemon(DaemonOptions(config=Path("unused.json")))


def commit(daemon: MuxDaemon, document: str, now: float) -> tuple[list, dict]:
    """Plan at `now` and record it as applied, as MuxDaemon.apply does once the kernel has it."""
    daemon.state = parse_state(document)
    plans, _slow, routes = daemon._plan(now)
    daemon._kernel_vips = daemon._planned_vips
    daemon._last_good = daemon._planned[0]
    return plans, routes


def _kept_index(plan) -> int:
    return [address for address, _mac in plan.backends].index(KEPT)


def test_entering_bypass_keeps_forwarding_until_the_handover_ends_then_drops_the_vip():
    daemon = _daemon()
    plans, routes = commit(daemon, _document(1, BACKENDS, bypass=False), T0)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: None}

    # 3 -> 1 with a drain: the muxes keep the VIP and stay its next hop until the deadline.
    bypass = _document(2, [KEPT], bypass=True, previous=(1, BACKENDS, T0 + 10))
    plans, routes = commit(daemon, bypass, T0 + 1)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: None}

    # Drain over: the route moves to the host now, and the kernel still forwards every bucket
    # to the kept backend while the router switches.
    plans, routes = commit(daemon, bypass, T0 + 10.5)
    assert routes == {VIP: KEPT}
    assert [p.vip for p in plans] == [VIP]
    assert np.all(plans[0].current == _kept_index(plans[0]))
    during = daemon._signature(T0 + 10.5 + BYPASS_HANDOVER_S - 0.1)
    plans, routes = commit(daemon, bypass, T0 + 10.5 + BYPASS_HANDOVER_S - 0.1)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: KEPT}

    # Hand-over over: the daemon's own signature changes (so the loop re-applies) and the VIP's
    # kernel state goes, the route stays at the host.
    after = T0 + 10.5 + BYPASS_HANDOVER_S + 0.1
    assert daemon._signature(after) != during
    plans, routes = commit(daemon, bypass, after)
    assert plans == []
    assert routes == {VIP: KEPT}
    assert daemon.tables == {}
    later = daemon._signature(after + 60)
    plans, routes = commit(daemon, bypass, after + 60)
    assert plans == []
    assert routes == {VIP: KEPT}
    assert daemon._signature(after + 120) == later  # no endless re-apply once in bypass

    # Leaving bypass is make-before-break as before: tables first (old table = the kept backend).
    plans, routes = commit(daemon, _document(3, BACKENDS, bypass=False), after + 200)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: None}
    assert plans[0].old is not None
    assert np.all(plans[0].old == _kept_index(plans[0]))


def test_bypass_without_a_drain_also_hands_over():
    daemon = _daemon()
    commit(daemon, _document(1, BACKENDS, bypass=False), T0)
    plans, routes = commit(daemon, _document(2, [KEPT], bypass=True, previous=(1, BACKENDS, T0 + 1)), T0 + 1)
    assert routes == {VIP: KEPT}
    assert [p.vip for p in plans] == [VIP]
    assert np.all(plans[0].current == _kept_index(plans[0]))
    plans, routes = commit(daemon, _document(2, [KEPT], bypass=True), T0 + 1 + BYPASS_HANDOVER_S + 0.1)
    assert plans == []
    assert routes == {VIP: KEPT}


def test_leaving_bypass_during_the_handover_keeps_the_vip_without_a_gap():
    daemon = _daemon()
    commit(daemon, _document(1, BACKENDS, bypass=False), T0)
    commit(daemon, _document(2, [KEPT], bypass=True, previous=(1, BACKENDS, T0 + 1)), T0 + 1)
    plans, routes = commit(daemon, _document(3, BACKENDS, bypass=False, previous=(2, [KEPT], T0 + 2)), T0 + 2)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: None}
    # a later bypass starts a fresh hand-over instead of reusing the stale one
    plans, routes = commit(daemon, _document(4, [KEPT], bypass=True, previous=(3, BACKENDS, T0 + 100)),
                           T0 + 100)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: KEPT}


def test_a_mux_started_while_the_vip_is_in_bypass_does_not_serve_it():
    daemon = _daemon()
    plans, routes = commit(daemon, _document(2, [KEPT], bypass=True), T0)
    assert plans == []
    assert routes == {VIP: KEPT}
    assert daemon.tables == {}


def test_bypass_without_previous_drains_from_the_running_table_first():
    """A hand-written 3 -> 1 bypass document without `previous`: the mux drains from what it runs
    (the listener's drain timeout, 10 s here) before moving the route, then hands over."""
    daemon = _daemon()
    commit(daemon, _document(1, BACKENDS, bypass=False), T0)
    bypass = _document(2, [KEPT], bypass=True)
    plans, routes = commit(daemon, bypass, T0 + 1)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: None}
    plans, routes = commit(daemon, bypass, T0 + 11.5)
    assert [p.vip for p in plans] == [VIP]
    assert routes == {VIP: KEPT}
    plans, routes = commit(daemon, bypass, T0 + 11.5 + BYPASS_HANDOVER_S + 0.1)
    assert plans == []
    assert routes == {VIP: KEPT}
