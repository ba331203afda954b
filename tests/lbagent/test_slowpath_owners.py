"""The kernel slow path's owner side over the real peer protocol (UDP on 127.0.0.1, three muxes):
what an owner records — answering a query for a flow it never saw, or taking a batch of new flows
the kernel pinned on another mux — is copied to the bucket's backup owner, never back to the
sender; and `on_new_flows` (the NFLOG reports) records exactly `decide`'s backend at the owner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lbagent.core.decide import RecordAndForward, decide
from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.dataplane.slowpath import CoreDecider, PeerBridge, SlowListener, SlowPath

SIZE = 257
NAMES = ["mux-a", "mux-b", "mux-c"]
KEY = b"k" * 32
VIP = 0xCB00710E  # 203.0.113.14


@pytest.fixture
def muxes():
    old = build_generation(1, ["10.0.0.1:80", "10.0.0.2:80"], None, SIZE)
    new = build_generation(2, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], None, SIZE)
    tables = ListenerTables(current=new, old=(OldTable(old, time.time() + 600),))
    ownership = build_ownership(NAMES, owner_seed=7919, table_size=SIZE)
    paths: dict[str, SlowPath] = {}
    bridges: dict[str, PeerBridge] = {}
    try:
        for name in NAMES:
            path = SlowPath("lo", "02:00:00:00:00:01", 0,
                            decider=CoreDecider(name, RecordStore(max_records=10_000), ownership))
            path.update([SlowListener(3, "203.0.113.14", "tcp", 80, tables,
                                      {n: "02:00:00:00:00:02" for n in tables.names}, time.time() + 600)])
            bridge = PeerBridge(name, KEY, {}, ("127.0.0.1", 0), handler=path, timeout_s=1.0)
            bridge.start()
            path.peers = bridge
            paths[name], bridges[name] = path, bridge
        addresses = {n: b.peer.address for n, b in bridges.items()}
        for n, b in bridges.items():
            b.peer.peers.update({o: a for o, a in addresses.items() if o != n})
        yield paths, bridges, tables, ownership
    finally:
        for b in bridges.values():
            b.stop()


def _records(path: SlowPath) -> dict[tuple, tuple[str, bool]]:
    return {tuple(r[1]): (r[3], r[4]) for r in path.record_dump()}


def _wait_for(check, timeout_s: float = 60.0) -> None:
    """Wait for `check` with a generous bound; the assertions after it say what is missing."""
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)


def _buckets_owned(ownership, tables, owner: str, backup: str, count: int) -> list[int]:
    out = [b for b in np.flatnonzero(tables.unstable).tolist() if ownership.owners(b) == (owner, backup)]
    assert len(out) >= count, f"only {len(out)} unstable buckets owned by ({owner}, {backup})"
    return out[:count]


def test_an_owner_answer_is_replicated_to_the_backup(muxes):
    paths, bridges, tables, ownership = muxes
    buckets = _buckets_owned(ownership, tables, "mux-b", "mux-c", 5)
    answers: list[str | None] = []
    done = threading.Event()
    for i, bucket in enumerate(buckets):
        flow = (0x0A000001 + i, VIP, 6, 40000 + i, 80)
        action = decide(tables=tables, bucket=bucket, is_syn=False, pin=None, local_record=None,
                        owners=ownership.owners(bucket), self_mux="mux-a")

        def got(backend: str | None) -> None:
            answers.append(backend)
            if len(answers) == len(buckets):
                done.set()
        bridges["mux-a"].query(action, 3, flow, bucket, got)
    assert done.wait(10), f"answers: {answers}"
    want = {(0x0A000001 + i, VIP, 6, 40000 + i, 80): tables.fallback_backend(b)
            for i, b in enumerate(buckets)}
    assert sorted(answers) == sorted(want.values()), "the owner answers the oldest table's backend"
    _wait_for(lambda: set(want) <= set(_records(paths["mux-c"])))
    owner, backup = _records(paths["mux-b"]), _records(paths["mux-c"])
    assert {f: owner[f] for f in want} == {f: (b, False) for f, b in want.items()}
    assert {f: backup[f] for f in want} == {f: (b, True) for f, b in want.items()}, "backup has no copy"
    assert not set(want) & set(_records(paths["mux-a"])), "the asker holds no copy (it did not store)"


def test_kernel_new_flows_are_recorded_at_their_owner_with_a_backup_copy(muxes):
    paths, _bridges, tables, ownership = muxes
    unstable = np.flatnonzero(tables.unstable).tolist()
    flows = [(0x0B000000 + i, VIP, 6, 1024 + i, 80, unstable[i % len(unstable)]) for i in range(600)]
    paths["mux-a"].on_new_flows(flows)  # what the NFLOG reader hands over on mux-a

    want = {}
    for saddr, daddr, proto, sport, dport, bucket in flows:
        action = decide(tables=tables, bucket=bucket, is_syn=True, pin=None, local_record=None,
                        owners=ownership.owners(bucket), self_mux="mux-a")
        assert isinstance(action, RecordAndForward)
        want[(saddr, daddr, proto, sport, dport)] = (action.backend, action.owner, action.backup)

    def complete() -> bool:
        held = {n: _records(p) for n, p in paths.items()}
        return all(f in held[o] and (b is None or f in held[b]) for f, (_, o, b) in want.items())

    _wait_for(complete)
    held = {n: _records(p) for n, p in paths.items()}
    wrong = [(f, w) for f, w in want.items()
             if held[w[1]].get(f) != (w[0], False)
             or (w[2] is not None and held[w[2]].get(f, ("",))[0] != w[0])]
    assert wrong == [], f"{len(wrong)} of {len(want)} flows not recorded as decide() says: {wrong[:3]}"
    assert {w[1] for w in want.values()} == set(NAMES), "every mux should own some of these flows"
    assert paths["mux-a"].kernel_stats.new_flows == len(flows)


def test_a_report_batch_records_what_decide_says_for_each_flow_and_nothing_else():
    """One NFLOG batch with flows of stable buckets (rule 2: no record), unstable ones owned here
    or elsewhere, a duplicate report and a listener not in transition here."""
    old = build_generation(1, ["10.0.0.1:80", "10.0.0.2:80"], None, SIZE)
    new = build_generation(2, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], None, SIZE)
    tables = ListenerTables(current=new, old=(OldTable(old, time.time() + 600),))
    ownership = build_ownership(NAMES, owner_seed=7919, table_size=SIZE)
    path = SlowPath("lo", "02:00:00:00:00:01", 0,
                    decider=CoreDecider("mux-a", RecordStore(max_records=10_000), ownership))
    path.update([SlowListener(3, "203.0.113.14", "tcp", 80, tables,
                              {n: "02:00:00:00:00:02" for n in tables.names}, time.time() + 600)])
    flows = [(0x0C000000 + b, VIP, 6, 2000 + b, 80, b) for b in range(SIZE)]
    flows += [flows[7], (0x0D000001, VIP, 6, 3000, 81, 5)]  # a duplicate; port 81: no listener
    path.on_new_flows(np.array(flows))

    want = {}
    for saddr, daddr, proto, sport, dport, bucket in flows[:SIZE]:
        action = decide(tables=tables, bucket=bucket, is_syn=True, pin=None, local_record=None,
                        owners=ownership.owners(bucket), self_mux="mux-a")
        if isinstance(action, RecordAndForward):
            want[(saddr, daddr, proto, sport, dport)] = (action.backend, action.owner != "mux-a")
    assert _records(path) == want, "a record for each unstable flow (a replica when owned elsewhere)"
    stats = path.kernel_stats
    assert (stats.new_flows, stats.unknown_listener) == (SIZE + 1, 1)
    stable = SIZE - int(tables.unstable.sum())
    assert stats.reasons == {"stable": stable + (0 if tables.unstable[7] else 1),
                             "new_flow": len(want) + (1 if tables.unstable[7] else 0)}
    # What goes to other muxes (on_new_flows hands it to the peer bridge; this path has none):
    # the same flows through the decider of a fresh mux-a, its outbox kept.
    decider = CoreDecider("mux-a", RecordStore(max_records=10_000), ownership)
    decider.record_new_flows(path._by_id[3], np.array(flows[:SIZE]), time.time(), stats)
    outbox = decider.take_outbox()
    sent = {f for batches in outbox.record_batches.values() for b in batches for f in b.flows()}
    assert sent == {f for f, (_, elsewhere) in want.items() if elsewhere}
    for (owner, backup), batches in outbox.record_batches.items():
        for b in batches:
            assert all(ownership.owners(r.bucket) == (owner, backup) for r in b)
    copies = {(to, f) for to, batches in outbox.replica_batches.items() for b in batches for f in b.flows()}
    assert copies == {(ownership.owners(f[3] - 2000)[1], f) for f, (_, elsewhere) in want.items()
                      if not elsewhere}


def test_a_moved_flow_is_beaconed_to_every_mux_so_none_ends_its_lingering_table_early(muxes):
    """A mux that neither owns nor forwards a moved flow still gets one live record of the
    listener each keep-alive round, so it keeps the lingering table as long as the owners do."""
    paths, _bridges, tables, ownership = muxes
    bucket = _buckets_owned(ownership, tables, "mux-a", "mux-b", 1)[0]
    old = tables.fallback_backend(bucket)
    assert old != tables.current_backend(bucket)
    assert not paths["mux-b"].beacon_moved(3, NAMES), "no moved record held: nothing to beacon"
    paths["mux-a"].decider.store.put_first((3, (0x0C000001, VIP, 6, 5000, 80)), old, bucket, time.time())
    assert paths["mux-a"].moved_records(3) == 1
    assert paths["mux-c"].moved_records(3) == 0
    assert paths["mux-a"].beacon_moved(3, NAMES)
    _wait_for(lambda: paths["mux-c"].moved_records(3) == 1 and paths["mux-b"].moved_records(3) == 1)
    assert _records(paths["mux-c"])[(0x0C000001, VIP, 6, 5000, 80)] == (old, True)
    assert _records(paths["mux-b"])[(0x0C000001, VIP, 6, 5000, 80)] == (old, True)
    # copies never beacon again: records must not keep each other alive once the flow is gone
    assert not paths["mux-c"].beacon_moved(3, NAMES)
    assert not paths["mux-b"].beacon_moved(3, NAMES)


def test_owner_records_of_one_flow_on_two_muxes_do_not_renew_each_other_through_beacons(muxes):
    """When the primary answers a query late, the backup records the flow as owner too (the
    query's fallback): both then hold an owner record of it. Only the bucket's primary beacons,
    so once the flow is idle its records expire and the lingering table can end; before, each
    mux beaconed its record to the other every round and they renewed each other for ever."""
    paths, _bridges, tables, ownership = muxes
    bucket = _buckets_owned(ownership, tables, "mux-a", "mux-b", 1)[0]
    old = tables.fallback_backend(bucket)
    flow = (0x0C000002, VIP, 6, 5001, 80)
    long_ago = time.time() - 100
    for name in ("mux-a", "mux-b"):
        paths[name].decider.store.put_first((3, flow), old, bucket, long_ago)
        assert not paths[name].decider.store.peek((3, flow)).replica
    assert not paths["mux-b"].beacon_moved(3, NAMES), "the backup beaconed its owner record"
    assert paths["mux-a"].beacon_moved(3, NAMES)
    _wait_for(lambda: paths["mux-b"].decider.store.peek((3, flow)).last_seen_s > long_ago)
    assert paths["mux-a"].decider.store.peek((3, flow)).last_seen_s == long_ago
    # the flow is idle: the primary's record expires, then nothing renews the backup's any more
    assert paths["mux-a"].decider.store.expire_idle_by(lambda _lid: 50.0, time.time()) == 1
    assert not paths["mux-a"].beacon_moved(3, NAMES)
    assert not paths["mux-b"].beacon_moved(3, NAMES)
