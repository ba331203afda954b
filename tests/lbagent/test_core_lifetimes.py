"""How long flow state lives: what a drain deadline ends (Octavia's semantics), lingering old
tables for moved flows that are still active, per-listener idle timeouts, record expiry and the
keep-alive that renews an active flow's records at both of its owners."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.core.transition import ListenerTables, build_generation
from lbagent.dataplane.slowpath import CoreDecider, SlowListener
from lbagent.state import DEFAULT_FLOW_IDLE_TIMEOUT_S, StateError, parse_state
from tests.lbagent.test_state import example_document

M = 1021
A, B, C, D = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"


def _names(tables: ListenerTables, which) -> np.ndarray:
    return np.asarray(which.backends, dtype=object)[which.table]


def test_adding_a_backend_lingers_after_the_deadline_for_the_flows_that_moved():
    g1 = build_generation(1, [A, B, C], None, M)
    g2 = build_generation(2, [A, B, C, D], None, M)
    t = ListenerTables(g1).with_generation(g2, drain_deadline=100.0)
    moved = t.unstable.copy()
    assert t.after_deadlines(99.0) is t, "nothing changes before the deadline"
    after = t.after_deadlines(100.0)
    assert after.in_transition
    assert after.lingering
    assert not after.draining
    assert math.isinf(after.old[0].drain_deadline)
    # every backend of the old table is still in service: every moved bucket stays unstable, so a
    # flow on it keeps its pin and record, and an owner still answers the old backend
    assert np.array_equal(after.unstable, moved)
    assert all(after.fallback_backend(b) == _names(t, g1)[b] for b in np.flatnonzero(moved)[:50])
    assert after.after_deadlines(10**9) is after, "lingering tables have no clock"
    assert after.next_deadline() is None
    stateless = after.without_lingering()
    assert not stateless.in_transition
    assert not stateless.unstable.any()


def test_a_drained_backend_ends_at_its_deadline_and_nothing_else_moves():
    g2 = build_generation(2, [A, B, C], None, M)
    g3 = build_generation(3, [A, B, C], [0, 1, 1], M)  # A draining: weight 0
    t = ListenerTables(g2).with_generation(g3, drain_deadline=50.0)
    assert A in t.alive_backends(), "until its deadline the drained backend keeps its connections"
    assert t.draining
    after = t.after_deadlines(50.0)
    assert A not in after.alive_backends()
    # what lingers is only what moved between backends still in service (Maglev moves a few of
    # those too); the drained backend's buckets are the current table's, stable, no state
    old_names, cur_names = _names(t, g2), _names(t, g3)
    assert np.array_equal(after.unstable, (old_names != cur_names) & (old_names != A))
    assert after.unstable.sum() < 0.05 * M
    for o in after.old:
        assert A not in o.table.backends


def test_removing_one_and_adding_another_keeps_only_the_survivors_moved_buckets():
    g1 = build_generation(1, [A, B, C], None, M)
    g2 = build_generation(2, [B, C, D], None, M)  # A removed, D added
    t = ListenerTables(g1).with_generation(g2, drain_deadline=10.0)
    after = t.after_deadlines(11.0)
    old_names = _names(t, g1)
    cur_names = _names(t, g2)
    assert after.lingering
    assert A not in after.alive_backends()
    residual = np.asarray(after.old[0].table.backends, dtype=object)[after.old[0].table.table]
    # A's buckets: stable now (current backend); B's and C's moved buckets: still the old backend
    assert np.array_equal(residual[old_names == A], cur_names[old_names == A])
    keep = (old_names != A) & (old_names != cur_names)
    assert keep.any()
    assert np.array_equal(residual[keep], old_names[keep])
    assert np.array_equal(after.unstable, keep)


def test_a_later_removal_ends_a_lingering_backend_too():
    g1 = build_generation(1, [A, B, C], None, M)
    g2 = build_generation(2, [A, B, C, D], None, M)
    lingering = ListenerTables(g1).with_generation(g2, drain_deadline=10.0).after_deadlines(10.0)
    g3 = build_generation(3, [A, C, D], None, M)  # B removed, 20 s drain
    t = lingering.with_generation(g3, drain_deadline=30.0)
    assert B in t.after_deadlines(29.0).alive_backends()
    after = t.after_deadlines(30.0)
    assert B not in after.alive_backends()
    for o in after.old:
        assert B not in o.table.backends, "no old table may still send a flow to an ended backend"


def test_flow_idle_timeout_defaults_per_protocol_and_is_validated():
    doc = example_document()
    state = parse_state(doc)
    listener = state.vips[0].listeners[0]
    assert listener.flow_idle_timeout_s is None
    assert listener.idle_timeout_s == DEFAULT_FLOW_IDLE_TIMEOUT_S[listener.protocol]
    assert "flow_idle_timeout_s" not in listener.to_dict()
    doc["vips"][0]["listeners"][0]["flow_idle_timeout_s"] = 30
    assert parse_state(doc).vips[0].listeners[0].idle_timeout_s == 30
    doc["vips"][0]["listeners"][0]["flow_idle_timeout_s"] = 1
    with pytest.raises(StateError, match=r"vips\[0\]\.listeners\[0\]\.flow_idle_timeout_s"):
        parse_state(doc)


def test_records_expire_after_their_listeners_idle_timeout_unless_renewed():
    store = RecordStore(max_records=10)
    store.put_first((1, (1, 2, 6, 3, 80)), A, 5, now=0.0)
    store.put_first((2, (1, 2, 6, 3, 80)), A, 5, now=0.0)
    timeouts = {1: 10.0, 2: 100.0}
    assert store.expire_idle_by(timeouts.__getitem__, 9.0) == 0
    store.put_first((1, (1, 2, 6, 3, 80)), A, 5, now=9.0)  # a keep-alive renews it
    assert store.expire_idle_by(timeouts.__getitem__, 18.0) == 0
    assert store.expire_idle_by(timeouts.__getitem__, 19.5) == 1
    assert [k[0] for k, _ in store] == [2]
    assert store.counters.expired == 1


def test_keep_alive_renews_here_and_queues_both_owners():
    g1 = build_generation(1, [A, B], None, M)
    g2 = build_generation(2, [A, B, C], None, M)
    tables = ListenerTables(g1).with_generation(g2, drain_deadline=10.0).after_deadlines(10.0)
    names = ["mux-a", "mux-b", "mux-c"]
    ownership = build_ownership(names, owner_seed=7919, table_size=M)
    store = RecordStore(max_records=1000)
    decider = CoreDecider("mux-a", store, ownership)
    macs = {n: "02:00:00:00:00:01" for n in tables.names}
    listener = SlowListener(4, "203.0.113.4", "tcp", 80, tables, macs, math.inf, 60.0)
    buckets = np.flatnonzero(tables.unstable)[:40]
    flows = np.array([(0x0A000001 + i, 0xCB007104, 6, 2000 + i, 80, int(b)) for i, b in enumerate(buckets)],
                     dtype=np.int64)
    backends = [tables.fallback_backend(int(b)) for b in buckets]
    assert decider.keep_alive(listener, flows, backends, now=5.0) == len(flows)
    held = {k[1]: (r.backend, r.replica, r.last_seen_s) for k, r in store}
    assert len(held) == len(flows)
    out = decider.take_outbox()
    sent_to_owner = {m for (m, _b) in out.record_batches}
    copies_to = set(out.replica_batches)
    for (saddr, daddr, proto, sport, dport, b), backend in zip(flows.tolist(), backends, strict=True):
        primary, backup = ownership.owners(b)
        assert held[(saddr, daddr, proto, sport, dport)][:2] == (backend, primary != "mux-a")
        if primary != "mux-a":
            assert primary in sent_to_owner
        if backup not in (None, "mux-a"):
            assert backup in copies_to
    assert "mux-a" not in sent_to_owner | copies_to
    total = sum(len(x) for v in out.record_batches.values() for x in v)
    assert total == sum(1 for b in buckets if ownership.owners(int(b))[0] != "mux-a")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sets(st.sampled_from([A, B, C, D, "10.0.0.5:80"]), min_size=1, max_size=5),
                min_size=2, max_size=4),
       st.data())
def test_after_deadlines_ends_exactly_the_gone_backends(sets, data):
    """For random chains of changes and deadlines: after a deadline no old table still names a
    backend that is gone, every bucket whose flows must live on (an old table's backend still
    alive and different from the current one) stays unstable, and nothing else does."""
    gens = [build_generation(i + 1, sorted(s), None, M) for i, s in enumerate(sets)]
    t = ListenerTables(gens[0])
    deadlines = []
    for i, g in enumerate(gens[1:]):
        deadline = float(data.draw(st.integers(0, 10), label=f"deadline {i}"))
        deadlines.append(deadline)
        t = t.with_generation(g, drain_deadline=deadline)
    now = float(data.draw(st.integers(0, 11), label="now"))
    after = t.after_deadlines(now)
    cur = np.asarray(t.current.backends, dtype=object)[t.current.table]
    still = [o for o in t.old if o.drain_deadline > now]
    alive = set(cur.tolist())
    for o in still:
        alive |= set(np.asarray(o.table.backends, dtype=object)[o.table.table].tolist())
    assert set(after.alive_backends()) == alive
    must = np.zeros(M, dtype=bool)
    for o in t.old:
        names = np.asarray(o.table.backends, dtype=object)[o.table.table]
        must |= (names != cur) & np.isin(names, list(alive))
    assert np.array_equal(after.unstable, must)
    for o in after.old:
        used = set(np.asarray(o.table.backends, dtype=object)[o.table.table].tolist())
        assert used <= alive
        assert o.lingering == (o.drain_deadline > 1e300)
