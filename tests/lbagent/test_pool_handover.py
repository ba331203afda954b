"""Pool membership changes (issue 12): what each mux hands over when a mux joins or leaves.

Pure part: `records_for_member` (what a member at the new view sends another member that asks
for its records: the pull of lbagent/pool.py) and `hand_over_plan` (what a leaving mux pushes),
run over random pools, with every record held by its old primary and backup. Then the same
exchange over real UDP: `PeerNode.sync` between FlowOwners, authenticated like every peer message.
"""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.ownership import (
    Ownership,
    build_ownership,
    hand_over_plan,
    moved_to,
    pool_view,
    records_for_member,
)
from lbagent.core.records import RecordStore
from lbagent.peer import FlowOwner, PeerNode

M = 1009

Held = dict[tuple[int, int], tuple[int, str]]  # record key -> (bucket, backend)


def _records(count: int, seed: int) -> list[tuple[tuple[int, int], int, str]]:
    rng = np.random.default_rng(seed)
    return [((7, int(i)), int(b), f"web-{int(b) % 4}") for i, b in enumerate(rng.integers(0, M, count))]


def _held_by_owners(members: list[str], own: Ownership, records) -> dict[str, Held]:
    stores: dict[str, Held] = {m: {} for m in members}
    for key, bucket, backend in records:
        for owner in own.owners(bucket):
            if owner is not None:
                stores[owner][key] = (bucket, backend)
    return stores


def _pull(stores: dict[str, Held], old: Ownership, new: Ownership, *, fresh: set[str]) -> dict[str, int]:
    """Every member of `new` asks every other member for its records (SYNC); returns how many
    records each received. Senders answer from what they held before anyone received anything
    (the exchanges run in parallel)."""
    before = {name: list(store.items()) for name, store in stores.items()}
    received = dict.fromkeys(new.muxes, 0)
    for asker in new.muxes:
        for sender in new.muxes:
            if sender == asker:
                continue
            held = [(k, b) for k, (b, _be) in before[sender]]
            keys = records_for_member(held, old, new, asker, fresh=asker in fresh)
            values = dict(before[sender])
            if asker not in fresh:
                # only buckets the asker did not own before: it holds those already
                assert all(asker not in old.owners(values[k][0]) for k in keys)
            for k in keys:
                stores[asker].setdefault(k, values[k])
                received[asker] += 1
    return received


def _assert_at_new_owners(stores: dict[str, Held], new: Ownership, records) -> None:
    for key, bucket, backend in records:
        for owner in new.owners(bucket):
            if owner is None:
                continue
            got = stores[owner].get(key)
            assert got == (bucket, backend), f"record {key} (bucket {bucket}) missing at new owner {owner}"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=2, max_value=8), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_a_joining_mux_pulls_its_buckets_and_members_pull_only_what_moved_to_them(n, seed):
    members = [f"mux-{i}" for i in range(1, n + 1)]
    old = build_ownership(members, owner_seed=seed, table_size=M)
    records = _records(300, seed % 1000)
    stores = _held_by_owners(members, old, records)
    joined = [*members, "mux-new"]
    new = build_ownership(joined, owner_seed=seed, table_size=M)
    stores["mux-new"] = {}
    received = _pull(stores, old, new, fresh={"mux-new"})
    _assert_at_new_owners(stores, new, records)
    assert received["mux-new"] > 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=3, max_value=8), leaver=st.integers(min_value=0, max_value=7),
       crash=st.booleans(), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_a_leaving_mux_pushes_and_survivors_pull_so_no_record_is_lost(n, leaver, crash, seed):
    """Clean leave: the leaving mux pushes every record to its new owners; crash: it pushes
    nothing. Either way, after the survivors' pulls every record is at its new primary and backup
    (each was held by two muxes, and the survivor holding it sends it where it moved)."""
    members = [f"mux-{i}" for i in range(1, n + 1)]
    gone = members[leaver % n]
    old = build_ownership(members, owner_seed=seed, table_size=M)
    records = _records(300, seed % 1000)
    stores = _held_by_owners(members, old, records)
    survivors = [m for m in members if m != gone]
    new = build_ownership(survivors, owner_seed=seed, table_size=M)
    if not crash:
        send, _drop = hand_over_plan(((k, b) for k, (b, _be) in stores[gone].items()), new, gone)
        for to, keys in send.items():
            assert to in survivors
            for k in keys:
                stores[to].setdefault(k, stores[gone][k])
    del stores[gone]
    _pull(stores, old, new, fresh=set())
    _assert_at_new_owners(stores, new, records)


def test_moved_to_is_what_a_member_owns_now_and_did_not_before():
    old = build_ownership(["a", "b", "c"], owner_seed=5, table_size=M)
    new = build_ownership(["a", "b", "c", "d"], owner_seed=5, table_size=M)
    buckets = np.arange(M)
    for name in ("a", "b", "c"):
        mask = moved_to(buckets, old, new, name)
        for b in np.flatnonzero(mask).tolist():
            assert name in new.owners(b)
            assert name not in old.owners(b)
        # ... and every bucket it owns now but did not before is in it
        now = {b for b in range(M) if name in new.owners(b)}
        before = {b for b in range(M) if name in old.owners(b)}
        assert set(np.flatnonzero(mask).tolist()) == now - before
    assert moved_to(buckets, None, new, "d").sum() == sum(1 for b in range(M) if "d" in new.owners(b))
    assert pool_view(["b", "a", "c"]) == pool_view(["a", "b", "c"]) != pool_view(["a", "b"])


def test_sync_over_udp_delivers_a_joining_muxs_records_and_refuses_another_view():
    """Three FlowOwners on loopback hold records as owners of a 3-mux pool; a fourth joins. After
    all switch to the 4-mux pool, the new one asks each (SYNC, fresh): each answers "ok" after
    sending the records of buckets it now owns. A mux asked at a view it does not run answers
    "other_view" and sends nothing."""
    key = b"k" * 32
    names = ["mux-a", "mux-b", "mux-c"]
    old = build_ownership(names, owner_seed=9, table_size=M)
    new = build_ownership([*names, "mux-d"], owner_seed=9, table_size=M)
    records = [((7, (0x0A000000 + i, 0xCB00710C, 6, 40000 + i, 80)), b, f"web-{b % 3}")
               for i, b in enumerate(range(0, M, 3))]

    async def scenario():
        owners = {n: FlowOwner(n, RecordStore(max_records=10**5), lambda _lid: None)
                  for n in [*names, "mux-d"]}
        for n in names:
            owners[n].ownership = old
            for k, b, be in records:
                if n in old.owners(b):
                    owners[n].store.put_first(k, be, b, 100.0, replica=old.owners(b)[0] != n)
        nodes = {n: PeerNode(n, key, fo) for n, fo in owners.items()}
        try:
            for node in nodes.values():
                await node.start()
            for node in nodes.values():
                node.peers = {o: other.address for o, other in nodes.items() if o != node.name}
            owners["mux-d"].ownership = new
            early = await nodes["mux-d"].sync("mux-a", pool_view(new.muxes), fresh=True)
            for n in names:
                owners[n].previous_ownership, owners[n].ownership = old, new
            answers = [await nodes["mux-d"].sync(n, pool_view(new.muxes), fresh=True) for n in names]
            return early, answers, owners["mux-d"].store, nodes
        finally:
            for node in nodes.values():
                node.close()

    early, answers, store, nodes = asyncio.run(scenario())
    assert early == "other_view"
    assert answers == ["ok", "ok", "ok"]
    wanted = {k for k, b, _be in records if "mux-d" in new.owners(b)}
    assert wanted, "mux-d owns no bucket with a record: the test proves nothing"
    assert {k for k, _r in store} == wanted
    for k, _b, be in records:
        if k in wanted:
            assert store.peek(k).backend == be
    assert sum(n.counters.handed_over for n in nodes.values()) >= len(wanted)
