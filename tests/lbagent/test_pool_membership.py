"""The daemon's pool membership (lbagent/pool.py) over real UDP on loopback, without a kernel:
slow paths holding records of a listener in transition, their peer bridges, and the
PoolMembership of each. A mux joins (it changes no route until the members have handed it its
records), a mux leaves (it withdraws only after handing its records over), and a member that
never answers holds a starting mux's routes back only for SYNC_SILENT_S."""

from __future__ import annotations

import socket
import time

import pytest

from lbagent import pool as pool_module
from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.core.transition import ListenerTables, OldTable, build_generation
from lbagent.dataplane.slowpath import CoreDecider, PeerBridge, SlowListener, SlowPath
from lbagent.pool import PoolMembership
from lbagent.state import Mux
from tests.services import wait_until

SIZE = 1009
SEED = 11
KEY = b"k" * 32
LISTENER = 1


class Node:
    def __init__(self, name: str, tables: ListenerTables) -> None:
        self.store = RecordStore(max_records=10_000)
        alone = build_ownership([name], owner_seed=SEED, table_size=SIZE)
        self.slowpath = SlowPath("lo", "02:00:00:00:00:01", 0, decider=CoreDecider(name, self.store, alone))
        self.bridge = PeerBridge(name, KEY, {}, ("127.0.0.1", 0), handler=self.slowpath)
        self.bridge.start()
        self.mux = Mux(name, *self.bridge.peer.address)
        self.slowpath.peers = self.bridge
        macs = {n: "02:00:00:00:00:02" for n in tables.names}
        listener = SlowListener(LISTENER, "203.0.113.10", "tcp", 80, tables, macs, time.time() + 600)
        self.slowpath.update([listener])
        self.pool = PoolMembership(name, self.slowpath, self.bridge)

    def change(self, members: list[Node], *, starting: bool = False) -> None:
        own = build_ownership([m.mux.name for m in members], owner_seed=SEED, table_size=SIZE)
        self.pool.change(tuple(m.mux for m in members), own, starting=starting)

    def close(self) -> None:
        self.bridge.stop()


@pytest.fixture
def tables() -> ListenerTables:
    old = build_generation(1, ["web-1", "web-2"], None, SIZE)
    new = build_generation(2, ["web-1", "web-2", "web-3"], None, SIZE)
    return ListenerTables(current=new, old=(OldTable(old, time.time() + 600),))


@pytest.fixture
def nodes(tables):
    made: list[Node] = []

    def make(name: str) -> Node:
        made.append(Node(name, tables))
        return made[-1]

    yield make
    for n in made:
        n.close()


def _records(count: int = 400) -> list[tuple[tuple, int, str]]:
    return [((LISTENER, (0x0A000000 + i, 0xCB00710A, 6, 30000 + i, 80)), (i * 37) % SIZE, f"web-{1 + i % 3}")
            for i in range(count)]


def _misplaced(nodes: list[Node], records) -> list[str]:
    own = build_ownership([n.mux.name for n in nodes], owner_seed=SEED, table_size=SIZE)
    by_name = {n.mux.name: n for n in nodes}
    wrong = []
    for key, bucket, backend in records:
        for owner in own.owners(bucket):
            rec = by_name[owner].store.peek(key) if owner is not None else None
            if owner is not None and (rec is None or rec.backend != backend):
                wrong.append(f"{key} at {owner}: {rec}")
    return wrong


def test_a_joining_mux_holds_routes_until_synced_and_a_leaving_one_withdraws_after_handing_over(nodes):
    a, b, c = nodes("mux-a"), nodes("mux-b"), nodes("mux-c")
    pool = [a, b, c]
    for n in pool:
        n.change(pool, starting=True)
    wait_until(lambda: all(n.pool.route_mode() == "announce" for n in pool), timeout_s=30,
               what="the three muxes synced with each other at start")
    records = _records()
    own = build_ownership([n.mux.name for n in pool], owner_seed=SEED, table_size=SIZE)
    for key, bucket, backend in records:  # each record at its primary and backup, as replication leaves it
        primary, backup = own.owners(bucket)
        for n in pool:
            if n.mux.name in (primary, backup):
                n.store.put_first(key, backend, bucket, time.time(), replica=n.mux.name != primary)

    d = nodes("mux-d")
    joined = [*pool, d]
    d.change(joined, starting=True)
    assert d.pool.route_mode() == "hold", "a new mux announced before it held its records"
    for n in pool:
        n.change(joined)
    wait_until(lambda: d.pool.route_mode() == "announce", timeout_s=30, what="the new mux synced")
    assert _misplaced(joined, records) == []
    assert len(d.store) > 0
    assert d.pool.synced_members == 3
    assert sum(n.bridge.peer.counters.handed_over for n in pool) >= len(d.store)

    rest = [b, c, d]
    for n in joined:
        n.change(rest)
    assert a.pool.route_mode() in ("hold", "withdraw")
    wait_until(lambda: a.pool.route_mode() == "withdraw", timeout_s=30, what="the leaving mux withdrew")
    wait_until(lambda: not _misplaced(rest, records), timeout_s=30,
               what="every record at its owners after the leave")
    assert all(n.pool.route_mode() == "announce" for n in rest)


def test_a_silent_member_holds_a_starting_muxs_routes_only_for_a_while(nodes, monkeypatch):
    monkeypatch.setattr(pool_module, "SYNC_SILENT_S", 1.0)
    e = nodes("mux-e")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read: a dead mux
    silent.bind(("127.0.0.1", 0))
    ghost = Mux("mux-ghost", *silent.getsockname())
    own = build_ownership(["mux-e", "mux-ghost"], owner_seed=SEED, table_size=SIZE)
    t0 = time.monotonic()
    e.pool.change((e.mux, ghost), own, starting=True)
    assert e.pool.route_mode() == "hold"
    wait_until(lambda: e.pool.route_mode() == "announce", timeout_s=30, what="the hold given up")
    assert time.monotonic() - t0 >= 1.0
    assert e.pool.synced_members == 0
    silent.close()
