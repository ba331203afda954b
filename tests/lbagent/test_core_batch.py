"""The batch forms the kernel's new-flow reports go through, each proven equal to its one-at-a-time
original: `decide_new_flows_batch` to `decide` (rule 3's SYN case, and rule 2 for stable buckets),
`RecordStore.put_first_many` to `put_first` in turn, and the packed RECORDS/REPLICATE payload
(`RecordBatch`) to the records it carries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.decide import Forward, Reason, RecordAndForward, decide, decide_new_flows_batch
from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.core.transition import ListenerTables, build_generation
from lbagent.peer import RECORD_DTYPE, DecodeError, RecordBatch, ReplicatedRecord

M = 257  # small prime: fast tables, same logic
BACKENDS = [f"b{i}" for i in range(6)]
MUXES = [f"mux-{i}" for i in range(5)]


@st.composite
def listener_tables(draw) -> ListenerTables:
    """A listener with 0, 1 or 2 old tables still draining, random backend sets per generation."""
    n_gens = draw(st.integers(1, 3))
    gens = [build_generation(g + 1, draw(st.lists(st.sampled_from(BACKENDS), min_size=1, max_size=5,
                                                  unique=True)), table_size=M) for g in range(n_gens)]
    tables = ListenerTables(gens[0])
    for g in gens[1:]:
        tables = tables.with_generation(g, drain_deadline=100.0)
    return tables


@settings(max_examples=150, deadline=None)
@given(listener_tables(), st.lists(st.sampled_from(MUXES), min_size=1, max_size=5, unique=True),
       st.lists(st.integers(0, M - 1), min_size=1, max_size=80), st.data())
def test_new_flow_batch_equals_decide_flow_by_flow(tables, muxes, buckets, data):
    ownership = build_ownership(muxes, owner_seed=data.draw(st.integers(0, 1000)), table_size=M)
    record, backend_ids, primary, backup = decide_new_flows_batch(tables, np.array(buckets), ownership)
    assert len(record) == len(backend_ids) == len(primary) == len(backup) == len(buckets)
    for i, bucket in enumerate(buckets):
        # What the mux is and what it may hold play no part in a SYN's decision: draw them anyway.
        action = decide(tables=tables, bucket=bucket, is_syn=True, pin=None,
                        local_record=data.draw(st.one_of(st.none(), st.sampled_from(BACKENDS))),
                        owners=ownership.owners(bucket), self_mux=data.draw(st.sampled_from(muxes)))
        name = tables.names[backend_ids[i]]
        if record[i]:
            b = int(backup[i])
            assert action == RecordAndForward(name, ownership.muxes[primary[i]],
                                              ownership.muxes[b] if b >= 0 else None, Reason.NEW_FLOW)
        else:
            # stable bucket or no transition: rule 2, no record
            assert action == Forward(name, Reason.STABLE)


def test_new_flow_batch_covers_stable_and_unstable_buckets_and_refuses_strangers():
    tables = ListenerTables(build_generation(1, ["b1", "b2"], table_size=M)).with_generation(
        build_generation(2, ["b1", "b2", "b3"], table_size=M), drain_deadline=100.0)
    ownership = build_ownership(MUXES, owner_seed=3, table_size=M)
    record, _, _, _ = decide_new_flows_batch(tables, np.arange(M), ownership)
    assert np.array_equal(record, tables.unstable)
    assert 0 < record.sum() < M, "the example needs both kinds of bucket"
    steady, _, _, _ = decide_new_flows_batch(ListenerTables(tables.current), np.arange(M), ownership)
    assert not steady.any()
    with pytest.raises(ValueError, match="bucket"):
        decide_new_flows_batch(tables, np.array([M]), ownership)


# --- put_first_many ----------------------------------------------------------------------

# (listener, flow, backend, bucket) of one write
write = st.tuples(st.integers(0, 1), st.integers(0, 12), st.sampled_from(["x", "y", "z"]),
                  st.integers(0, M - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(write, max_size=12), max_size=6), st.lists(st.booleans(), min_size=6, max_size=6),
       st.integers(0, 20))
def test_put_first_many_equals_put_first_in_turn(batches, replica_flags, cap):
    one, many = RecordStore(max_records=cap), RecordStore(max_records=cap)
    for n, (batch, replica) in enumerate(zip(batches, replica_flags, strict=False)):
        keys = [(lid, (flow, 9, 6, 1000 + flow, 80)) for lid, flow, _, _ in batch]
        backends = [backend for _, _, backend, _ in batch]
        buckets = [bucket for *_, bucket in batch]
        want = [one.put_first(k, be, bu, float(n), replica=replica)
                for k, be, bu in zip(keys, backends, buckets, strict=True)]
        winners, stored = many.put_first_many(keys, backends, buckets, float(n), replica=replica)
        assert list(zip(winners, stored, strict=True)) == want
        assert many.counters == one.counters
        assert len(many) <= cap
    assert [(k, r.backend, r.bucket, r.created_s, r.last_seen_s, r.replica) for k, r in many] == \
        [(k, r.backend, r.bucket, r.created_s, r.last_seen_s, r.replica) for k, r in one]


def test_put_first_many_keeps_the_first_writer_and_counts_the_quota():
    s = RecordStore(max_records=2)
    k = [(1, (i, 2, 6, 3, 80)) for i in range(4)]
    assert s.put_first_many([k[0], k[0], k[1], k[2]], ["a", "b", "c", "d"], [5, 5, 6, 7], 1.0) == (
        ["a", "a", "c", "d"], [True, False, True, False])
    assert (s.counters.stored, s.counters.conflicts, s.counters.degraded) == (2, 1, 1)
    assert s.put_first_many([k[1]], ["z"], [6], 2.0, replica=True) == (["c"], [False])
    assert s.peek(k[1]).last_seen_s == 2.0
    assert not s.peek(k[1]).replica


# --- the packed record batch ---------------------------------------------------------------

record = st.builds(ReplicatedRecord, st.integers(0, 2**32 - 1),
                   st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.sampled_from([6, 17]),
                             st.integers(0, 65535), st.integers(0, 65535)),
                   st.integers(0, 2**32 - 1), st.sampled_from(["10.0.0.1:80", "10.0.0.2:80", "w3"]))


@settings(max_examples=100, deadline=None)
@given(st.lists(record, max_size=40), st.integers(0, 40))
def test_record_batch_round_trips_and_concatenates(records, cut):
    batch = RecordBatch.of(records)
    assert list(batch) == records
    again = RecordBatch.decode(batch.encode())
    assert list(again) == records
    assert again.keys() == [(r.listener_id, r.flow) for r in records]
    assert again.backend_names() == [r.backend for r in records]
    joined = RecordBatch.concat([RecordBatch.of(records[:cut]), RecordBatch.of(records[cut:])])
    assert list(joined) == records


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(record, max_size=10), min_size=2, max_size=4))
def test_concatenated_batches_reach_the_peer_intact(parts):
    """Batches combined for one peer (slowpath's outbox) travel as what they were: numpy 2's
    np.concatenate makes structured rows native-endian, and the peer, reading network byte
    order, got garbage listeners, addresses and buckets (issue 11/12)."""
    joined = RecordBatch.concat([RecordBatch.of(p) for p in parts])
    assert joined.rows.dtype == RECORD_DTYPE
    received = RecordBatch.decode(joined.encode())
    assert list(received) == [r for p in parts for r in p]


def test_record_batch_keeps_the_wire_layout_of_rows_in_another_byte_order():
    native = np.zeros(2, dtype=RECORD_DTYPE.newbyteorder("<"))
    native["l"], native["s"], native["sp"], native["b"] = 16, 0xCB007110, 40000, 7
    sent = RecordBatch(native, ("web1:80",)).encode()
    want = ReplicatedRecord(16, (0xCB007110, 0, 0, 40000, 0), 7, "web1:80")
    assert list(RecordBatch.decode(sent)) == [want, want]
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        RecordBatch(np.zeros(2, dtype=[("l", ">u4")]), ("web1:80",))


def test_record_batch_refuses_what_it_cannot_carry():
    good = RecordBatch.of([ReplicatedRecord(1, (1, 2, 6, 3, 80), 4, "a")]).encode()
    for bad in ({**good, "rb": good["rb"][:-4]},  # not a whole record
                {**good, "rb": "!!"},  # not base64
                {**good, "n": []},  # backend index outside the names
                {**good, "n": [""]},
                {"rb": good["rb"]}):
        with pytest.raises(DecodeError):
            RecordBatch.decode(bad)
    with pytest.raises(DecodeError, match="out of range"):
        RecordBatch.of([ReplicatedRecord(1, (1, 2, 6, 70000, 80), 4, "a")])
