"""Ownership, transitions (including two changes in one drain window), records and the decision."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.decide import (
    AskOwner,
    Forward,
    Reason,
    RecordAndForward,
    decide,
    decide_owner_unreachable,
    decide_stable_batch,
    owner_answer,
)
from lbagent.core.ownership import build_ownership, hand_over_plan, moved_owners
from lbagent.core.records import RecordStore
from lbagent.core.transition import ListenerTables, build_generation

M = 1021  # small prime: fast tables, same logic
MUXES = [f"mux-{i}" for i in range(5)]


# --- ownership ---------------------------------------------------------------------------

def test_owners_are_distinct_live_and_independent_of_order():
    own = build_ownership(MUXES, owner_seed=7919, table_size=M)
    again = build_ownership(list(reversed(MUXES)), owner_seed=7919, table_size=M)
    assert np.array_equal(own.primary, again.primary)
    assert np.array_equal(own.backup, again.backup)
    for b in range(M):
        primary, backup = own.owners(b)
        assert primary != backup
        assert {primary, backup} <= set(MUXES)
    shares = np.bincount(own.primary, minlength=5) / M
    assert np.all(np.abs(shares - 0.2) < 0.01)


def test_owner_seed_gives_another_table():
    a = build_ownership(MUXES, owner_seed=1, table_size=M)
    b = build_ownership(MUXES, owner_seed=2, table_size=M)
    assert np.mean(a.primary != b.primary) > 0.5


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 6), st.data())
def test_when_a_primary_fails_its_backup_becomes_primary(n, data):
    muxes = [f"m{i}" for i in range(n)]
    dead = data.draw(st.sampled_from(muxes))
    before = build_ownership(muxes, owner_seed=5, table_size=M)
    after = build_ownership([m for m in muxes if m != dead], owner_seed=5, table_size=M)
    for b in range(M):
        primary, backup = before.owners(b)
        if primary == dead:
            assert after.owners(b)[0] == backup  # it already holds the replicated records


def test_single_mux_has_no_backup_and_moved_owners():
    one = build_ownership(["solo"], owner_seed=1, table_size=M)
    assert one.owners(0) == ("solo", None)
    two = build_ownership(["solo", "other"], owner_seed=1, table_size=M)
    assert len(moved_owners(one, two)) == M  # every bucket gained a backup
    with pytest.raises(ValueError, match="at least one"):
        build_ownership([], owner_seed=1, table_size=M)
    with pytest.raises(ValueError, match="duplicate"):
        build_ownership(["a", "a"], owner_seed=1, table_size=M)


# --- transitions -------------------------------------------------------------------------

G4 = build_generation(4, ["b1", "b2", "b3"], table_size=M)
G5 = build_generation(5, ["b1", "b2", "b3", "b4"], table_size=M)
G6 = build_generation(6, ["b1", "b3", "b4"], table_size=M)


def by_bucket(g):
    return np.asarray(g.backends, dtype=object)[g.table]


def test_steady_state_has_no_unstable_bucket():
    t = ListenerTables(G4)
    assert not t.in_transition
    assert not t.unstable.any()
    assert t.fallback_backend(3) == t.current_backend(3) == by_bucket(G4)[3]


def test_one_change_marks_exactly_the_moved_buckets():
    t = ListenerTables(G4).with_generation(G5, drain_deadline=100.0)
    assert np.array_equal(t.unstable, by_bucket(G4) != by_bucket(G5))
    assert [t.fallback_backend(b) for b in range(M)] == list(by_bucket(G4))
    assert t.expired(99.9).in_transition
    ended = t.expired(100.0)
    assert not ended.in_transition
    assert not ended.unstable.any()


def test_two_changes_in_one_window_keep_the_oldest_table():
    t = ListenerTables(G4).with_generation(G5, drain_deadline=100.0).with_generation(G6, drain_deadline=110.0)
    g4, g5, g6 = by_bucket(G4), by_bucket(G5), by_bucket(G6)
    assert np.array_equal(t.unstable, (g4 != g6) | (g5 != g6))
    # a bucket where 5 and 6 agree but 4 differs is still unstable: gen-4 flows live there
    tricky = np.flatnonzero((g5 == g6) & (g4 != g6))
    assert len(tricky)
    assert t.unstable[tricky].all()
    assert [t.fallback_backend(b) for b in range(M)] == list(g4)
    # gen 4's table ends at its own deadline; gen 5's stays until 110
    mid = t.expired(105.0)
    assert mid.in_transition
    assert np.array_equal(mid.unstable, g5 != g6)
    assert [mid.fallback_backend(b) for b in range(M)] == list(g5)
    assert not t.expired(110.0).in_transition


def test_generation_order_is_enforced():
    t = ListenerTables(G5)
    assert t.with_generation(G5, drain_deadline=1.0) is t
    with pytest.raises(ValueError, match="older"):
        t.with_generation(G4, drain_deadline=1.0)
    with pytest.raises(ValueError, match="table size"):
        t.with_generation(build_generation(6, ["x"], table_size=101), drain_deadline=1.0)


# --- records -----------------------------------------------------------------------------

KEY = (1, (1, 2, 6, 3, 80))


def test_first_writer_wins_and_counters():
    s = RecordStore(max_records=10)
    assert s.answer_query(KEY, 5, "old", 0.0).backend == "old"
    assert s.put_first(KEY, "new", 5, 1.0) == ("old", False)
    res = s.answer_query(KEY, 5, "other", 2.0)
    assert (res.backend, res.found) == ("old", True)
    c = s.counters
    assert (c.queries, c.hits, c.misses, c.stored, c.conflicts, len(s)) == (2, 1, 1, 1, 1, 1)


def test_quota_degrades_to_stateless_answer_and_counts():
    s = RecordStore(max_records=2)
    for i in range(2):
        s.put_first((1, (i, 0, 6, 0, 80)), "b", 0, 0.0)
    res = s.answer_query((1, (9, 0, 6, 0, 80)), 0, "fallback", 0.0)
    assert (res.backend, res.stored, res.degraded) == ("fallback", False, True)
    assert s.put_first((1, (8, 0, 6, 0, 80)), "cur", 0, 0.0) == ("cur", False)
    assert len(s) == 2
    assert s.counters.degraded == 2


def test_idle_expiry_and_listener_drop():
    s = RecordStore(max_records=10, idle_timeout_s=60)
    s.put_first((1, (1, 0, 6, 0, 80)), "b", 0, 0.0)
    s.put_first((1, (2, 0, 6, 0, 80)), "b", 0, 0.0)
    s.put_first((2, (3, 0, 6, 0, 80)), "b", 0, 0.0)
    assert s.get((1, (1, 0, 6, 0, 80)), 50.0) == "b"  # refreshes
    assert s.expire_idle(100.0) == 2
    assert len(s) == 1
    assert s.drop_listener(1) == 1
    assert len(s) == 0
    with pytest.raises(ValueError, match="max_records"):
        RecordStore(max_records=-1)


# --- the decision ------------------------------------------------------------------------

TRANS = ListenerTables(G4).with_generation(G5, drain_deadline=100.0)
UNSTABLE = int(np.flatnonzero(TRANS.unstable)[0])
STABLE = int(np.flatnonzero(~TRANS.unstable)[0])


def d(**kw):
    args = {"tables": TRANS, "bucket": UNSTABLE, "is_syn": False, "pin": None, "local_record": None,
            "owners": ("mux-1", "mux-2"), "self_mux": "mux-0"}
    args.update(kw)
    return decide(**args)


def test_decision_rules_in_order():
    assert d(pin="bX") == Forward("bX", Reason.PINNED)
    assert d(bucket=STABLE) == Forward(TRANS.current_backend(STABLE), Reason.STABLE)
    assert d(tables=ListenerTables(G5)) == Forward(G5.backends[G5.table[UNSTABLE]], Reason.STABLE)
    assert d(is_syn=True) == RecordAndForward(TRANS.current_backend(UNSTABLE), "mux-1", "mux-2",
                                              Reason.NEW_FLOW)
    assert d(local_record="bR") == Forward("bR", Reason.LOCAL_RECORD, pin=True)
    assert d() == AskOwner("mux-1", "mux-2", TRANS.fallback_backend(UNSTABLE))
    assert d(self_mux="mux-1") == RecordAndForward(TRANS.fallback_backend(UNSTABLE), "mux-1", "mux-2",
                                                   Reason.OWNER_OLD_TABLE)
    assert decide_owner_unreachable(d()) == Forward(TRANS.fallback_backend(UNSTABLE),
                                                    Reason.OWNER_UNREACHABLE, pin=True)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, M - 1), st.booleans(), st.one_of(st.none(), st.just("pinned")),
       st.one_of(st.none(), st.just("recorded")), st.sampled_from(["mux-0", "mux-1", "mux-2"]))
def test_decision_properties(bucket, syn, pin, record, me):
    action = d(bucket=bucket, is_syn=syn, pin=pin, local_record=record, self_mux=me)
    if pin:
        assert action == Forward("pinned", Reason.PINNED)
    elif not TRANS.unstable[bucket]:
        # stable: stateless and the same on every mux
        assert action == Forward(TRANS.current_backend(bucket), Reason.STABLE)
    elif syn:
        # new connections always use the new table
        assert isinstance(action, RecordAndForward)
        assert action.backend == TRANS.current_backend(bucket)
    else:
        # an old flow never lands on the new table's backend without asking
        assert not isinstance(action, Forward) or action.backend == record
        if isinstance(action, AskOwner):
            assert me != "mux-1"
            assert action.fallback == TRANS.fallback_backend(bucket)


def test_stable_batch_agrees_with_decide():
    buckets = np.arange(M)
    needs, ids = decide_stable_batch(TRANS, buckets)
    assert np.array_equal(needs, TRANS.unstable)
    for b in np.flatnonzero(~needs):
        assert TRANS.names[ids[b]] == d(bucket=int(b)).backend
    needs0, _ = decide_stable_batch(ListenerTables(G5), buckets)
    assert not needs0.any()


def test_owner_answer_uses_own_tables_and_first_writer():
    s = RecordStore(max_records=10)
    first = owner_answer(s, TRANS, KEY, UNSTABLE, "hint", 0.0)
    assert (first.backend, first.stored) == (TRANS.fallback_backend(UNSTABLE), True)
    assert owner_answer(s, TRANS, KEY, UNSTABLE, "hint", 1.0).found
    unknown = owner_answer(RecordStore(max_records=10), None, KEY, UNSTABLE, "hint", 0.0)
    assert unknown.backend == "hint"


def test_hand_over_plan_sends_to_new_owners_and_drops_the_rest():
    old = build_ownership(MUXES, owner_seed=3, table_size=M)
    new = build_ownership([*MUXES, "mux-9"], owner_seed=3, table_size=M)
    me = "mux-0"
    held = [(f"r{b}", b) for b in range(M) if me in old.owners(b)]
    send, drop = hand_over_plan(held, new, me)
    for rid, b in held:
        primary, backup = new.owners(b)
        for target in (primary, backup):
            if target != me:
                assert rid in send[target]
        assert (rid in drop) == (me not in (primary, backup))
    assert drop  # mux-9 took some of mux-0's buckets
    assert old.replica_peer(0, old.owners(0)[0]) == old.owners(0)[1]
    assert old.replica_peer(0, old.owners(0)[1]) == old.owners(0)[0]
