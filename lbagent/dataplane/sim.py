"""Simulator driver: N muxes running the real decision code and the real peer protocol.

Each simulated mux is a `SimMux` with its own tables, ownership view, flow-record store, pins and
a `PeerNode` on a real loopback UDP socket (HMAC, replay window, timeouts); all muxes run as
asyncio tasks in one event loop. A router model spreads packets over the live muxes by an ECMP
hash of the 5-tuple (and rehashes everything when the mux set changes). Clients open long-lived
and short flows (SYN, data, FIN) and every packet's backend is checked against the backend the
flow's connection lives on: a difference is a broken flow.

Speed: packets are handled in vectorised batches per mux. Packets of stable buckets (or with no
transition) take `decide_stable_batch`, the vectorised form of the decision's stable rule; only
packets of unstable buckets go through `decide()` one by one, and only those whose owner is
another mux send peer messages. Time is simulated (`now` is passed in), so drain windows of
30 s take no wall time.

Replication of new owner records to the backup owner is batched per round (`flush`), as a real
agent would batch them every few milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lbagent.core.decide import (
    AskOwner,
    Forward,
    Reason,
    RecordAndForward,
    decide,
    decide_owner_unreachable,
    decide_stable_batch,
)
from lbagent.core.flowhash import flow_buckets, flow_hashes
from lbagent.core.ownership import Ownership, build_ownership
from lbagent.core.records import FlowKey, RecordKey, RecordStore
from lbagent.core.transition import GenerationTable, ListenerTables, build_generation
from lbagent.peer import FlowOwner, PeerNode, ReplicatedRecord

__all__ = ["SCENARIOS", "ScenarioResult", "SimConfig", "SimMux", "run_scenarios"]

LISTENER_ID = 1
VIP = 0xCB00710A  # 203.0.113.10
VIP_PORT = 80
TCP = 6


@dataclass(frozen=True)
class SimConfig:
    flows: int = 100_000  # established flows before the first change
    muxes: int = 8
    backends: int = 10
    new_flows_per_round: int = 2_000  # half long-lived, half short (SYN, data, FIN)
    table_size: int = 65537
    hash_seed: int = 24301
    owner_seed: int = 7919
    router_seed: int = 0xEC3B
    drain_timeout_s: float = 30.0
    max_records: int = 100_000
    peer_timeout_s: float = 1.0  # generous: the simulated muxes share one CPU with the test run
    # Concurrent peer requests in the whole simulated cluster: all muxes share one CPU here, so
    # more in flight only makes answers late (a real mux has its own CPU).
    max_in_flight: int = 64
    seed: int = 1


# --------------------------------------------------------------------------------------------
# one mux


@dataclass
class MuxCounters:
    decisions: dict[str, int] = field(default_factory=dict)
    peer_queries: int = 0
    peer_records: int = 0
    owner_unreachable: int = 0
    repinned: int = 0  # a record answer disagreed with what this mux had forwarded


class SimMux:
    """One mux: the real core, a `FlowOwner` and a real `PeerNode`."""

    def __init__(self, name: str, key: bytes, config: SimConfig, *, stateful: bool,
                 in_flight: asyncio.Semaphore | None = None) -> None:
        self.name = name
        self.in_flight = in_flight or asyncio.Semaphore(config.max_in_flight)
        self.config = config
        self.stateful = stateful
        self.tables: dict[int, ListenerTables] = {}
        self.store = RecordStore(max_records=config.max_records)
        self.pins: dict[RecordKey, str] = {}
        self.now = 0.0
        # the owner side of the peer protocol, on this mux's store and tables, in simulated time
        self.owner = FlowOwner(name, self.store, lambda lid: self.tables.get(lid), clock=lambda: self.now)
        self.peer = PeerNode(name, key, self.owner, timeout_s=config.peer_timeout_s)
        self.counters = MuxCounters()

    # --- control plane -----------------------------------------------------------------

    def apply_generation(self, listener_id: int, gen: GenerationTable, *, now: float) -> None:
        cur = self.tables.get(listener_id)
        if cur is None or not self.stateful:
            # stateless baseline: the new table replaces the old one, nothing drains
            self.tables[listener_id] = ListenerTables(current=gen)
            return
        self.tables[listener_id] = cur.with_generation(gen, drain_deadline=now + self.config.drain_timeout_s)

    def expire(self, now: float) -> None:
        """Drop old tables past their deadline, and the records and pins they no longer justify."""
        for lid, tables in list(self.tables.items()):
            newer = tables.expired(now)
            if newer is tables:
                continue
            self.tables[lid] = newer
            if not newer.in_transition:
                self.store.drop_listener(lid)
                self.pins = {k: v for k, v in self.pins.items() if k[0] != lid}
            else:  # buckets that became stable need no state any more
                unstable = newer.unstable
                self.store.drop_where(lambda k, r, lid=lid, u=unstable: k[0] == lid and not u[r.bucket])
                self.pins = {k: v for k, v in self.pins.items()
                             if k[0] != lid or unstable[self._bucket_of(k[1])]}

    def _bucket_of(self, flow: FlowKey) -> int:
        return int(flow_buckets(np.array([flow[0]]), np.array([flow[1]]), flow[2], np.array([flow[3]]),
                                np.array([flow[4]]), seed=self.config.hash_seed,
                                table_size=self.config.table_size)[0])

    def hand_over(self, new: Ownership) -> dict[str, list[ReplicatedRecord]]:
        return self.owner.hand_over(new)

    @property
    def ownership(self) -> Ownership | None:
        return self.owner.ownership

    async def flush(self) -> None:
        """Send queued record copies to the other owner of each bucket."""
        await self.owner.flush(self.peer)

    # --- data plane ------------------------------------------------------------------------

    async def process(self, listener_id: int, src: np.ndarray, sport: np.ndarray, syn: np.ndarray,
                      now: float) -> np.ndarray:
        """Decide a batch of packets (all of one listener). Returns backend names per packet."""
        self.now = now
        tables = self.tables[listener_id]
        buckets = flow_buckets(src, VIP, TCP, sport, VIP_PORT, seed=self.config.hash_seed,
                               table_size=self.config.table_size)
        needs_decision, ids = decide_stable_batch(tables, buckets)
        names = np.asarray(tables.names, dtype=object)
        out = names[ids]  # object array of backend names; slow-path packets are overwritten below
        n_stable = int(len(buckets) - needs_decision.sum())
        self._count(Reason.STABLE, n_stable)
        slow = np.flatnonzero(needs_decision)
        if len(slow) == 0:
            return out
        sem = self.in_flight
        tasks = []
        assert self.ownership is not None
        # Decide every packet first and only then let the spawned requests run: the muxes share
        # one CPU here, and decide loops interleaved with requests in flight would delay answers.
        spawn = asyncio.get_running_loop().create_task
        for j in slow.tolist():
            flow = (int(src[j]), VIP, TCP, int(sport[j]), VIP_PORT)
            bucket = int(buckets[j])
            key = (listener_id, flow)
            action = decide(tables=tables, bucket=bucket, is_syn=bool(syn[j]), pin=self.pins.get(key),
                            local_record=self.store.get(key, now), owners=self.ownership.owners(bucket),
                            self_mux=self.name)
            if isinstance(action, Forward):
                out[j] = action.backend
                self._count(action.reason)
                if action.pin:
                    self.pins[key] = action.backend
            elif isinstance(action, RecordAndForward):
                self._count(action.reason)
                if action.owner == self.name:
                    out[j] = self.pins[key] = self.owner.record_local(listener_id, flow, bucket,
                                                                      action.backend)
                else:
                    out[j] = self.pins[key] = action.backend
                    tasks.append(spawn(self._record_remote(sem, action, key, bucket)))
            else:
                tasks.append(spawn(self._ask_remote(sem, action, key, bucket, j, out)))
        if tasks:
            await asyncio.gather(*tasks)
        return out

    async def _record_remote(self, sem: asyncio.Semaphore, action: RecordAndForward, key: RecordKey,
                             bucket: int) -> None:
        async with sem:
            self.counters.peer_records += 1
            answer = await self.peer.record(action.owner, action.backup, key[0], key[1], bucket,
                                            action.backend)
        if answer is not None and answer.backend != action.backend:
            # another writer came first: follow the owner from the next packet on
            self.pins[key] = answer.backend
            self.counters.repinned += 1

    async def _ask_remote(self, sem: asyncio.Semaphore, action: AskOwner, key: RecordKey, bucket: int,
                          j: int, out: np.ndarray) -> None:
        async with sem:
            self.counters.peer_queries += 1
            answer = await self.peer.query(action.owner, action.backup, key[0], key[1], bucket,
                                           action.fallback)
        if answer is None:
            fwd = decide_owner_unreachable(action)
            self.counters.owner_unreachable += 1
            self._count(fwd.reason)
            backend = fwd.backend
        else:
            self._count(Reason.OWNER_RECORD if answer.status == "found" else Reason.OWNER_OLD_TABLE)
            backend = answer.backend
        self.pins[key] = backend
        out[j] = backend

    def _count(self, reason: Reason, n: int = 1) -> None:
        if n:
            self.counters.decisions[reason.value] = self.counters.decisions.get(reason.value, 0) + n

    def state_counts(self) -> tuple[int, int]:
        return len(self.store), len(self.pins)

    def records_outside_unstable(self) -> int:
        bad = 0
        for (lid, _flow), rec in self.store:
            t = self.tables.get(lid)
            if t is None or not t.in_transition or not t.unstable[rec.bucket]:
                bad += 1
        return bad


# --------------------------------------------------------------------------------------------
# scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("add", "add a backend"),
    Scenario("drain", "drain a backend (it stays up for existing flows)"),
    Scenario("remove", "remove a backend (it is gone: its own flows are lost)"),
    Scenario("two_changes", "add a backend, then drain another inside the same drain window"),
    Scenario("mux_failure", "add a backend, then a mux fails during the transition"),
    Scenario("mux_added", "add a backend, then a mux joins during the transition"),
)}


@dataclass
class ScenarioResult:
    scenario: str
    stateful: bool
    flows: int = 0  # flows that sent packets
    broken: int = 0  # flows with a packet at another backend than their connection's
    lost_with_backend: int = 0  # flows whose own backend was removed (not counted as broken)
    unstable_flows: int = 0  # established flows in buckets that moved
    records_steady: int = 0  # flow records + pins before the change
    records_peak: int = 0  # flow records (all muxes) during the transition, at most
    pins_peak: int = 0
    records_outside_unstable: int = 0  # records in stable buckets during the transition (must be 0)
    records_after: int = 0  # records + pins after the last drain deadline
    peer_queries: int = 0
    peer_records: int = 0
    peer_timeouts: int = 0
    peer_dropped: int = 0  # datagrams dropped by receivers (all reasons)
    peer_rejected: int = 0  # ... of which malformed, unauthenticated, replayed or unknown (not late)
    owner_unreachable: int = 0
    degraded: int = 0
    wall_s: float = 0.0


class _Flows:
    """All client flows: addresses, ports, the backend each connection lives on, open or not."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.src = np.zeros(0, dtype=np.uint32)
        self.sport = np.zeros(0, dtype=np.uint32)
        self.backend = np.zeros(0, dtype=object)  # "" until the SYN went somewhere
        self.open = np.zeros(0, dtype=bool)
        self.long = np.zeros(0, dtype=bool)
        self.broken = np.zeros(0, dtype=bool)
        self.lost = np.zeros(0, dtype=bool)
        self._used: set[tuple[int, int]] = set()

    def add(self, n: int, *, long: bool) -> np.ndarray:
        src = (0x0A000000 + self.rng.integers(0, 1 << 24, size=n)).astype(np.uint32)
        sport = self.rng.integers(1024, 65536, size=n).astype(np.uint32)
        # keep 5-tuples unique (a reused tuple would be the same connection)
        for k in range(n):
            while (int(src[k]), int(sport[k])) in self._used:
                sport[k] = self.rng.integers(1024, 65536)
            self._used.add((int(src[k]), int(sport[k])))
        start = len(self.src)
        self.src = np.concatenate([self.src, src])
        self.sport = np.concatenate([self.sport, sport])
        self.backend = np.concatenate([self.backend, np.full(n, "", dtype=object)])
        self.open = np.concatenate([self.open, np.ones(n, dtype=bool)])
        self.long = np.concatenate([self.long, np.full(n, long)])
        self.broken = np.concatenate([self.broken, np.zeros(n, dtype=bool)])
        self.lost = np.concatenate([self.lost, np.zeros(n, dtype=bool)])
        return np.arange(start, start + n)


class _Cluster:
    def __init__(self, config: SimConfig, *, stateful: bool) -> None:
        self.config = config
        self.stateful = stateful
        self.key = os.urandom(32)
        self.muxes: dict[str, SimMux] = {}
        self.live: list[str] = []
        self.backends = [f"10.1.0.{i + 1}:80" for i in range(config.backends + 2)]
        self.dead_backends: set[str] = set()
        self.flows = _Flows(np.random.default_rng(config.seed))
        self.result: ScenarioResult | None = None
        self.in_flight = asyncio.Semaphore(config.max_in_flight)

    async def add_mux(self, name: str, *, like: SimMux | None = None) -> SimMux:
        mux = SimMux(name, self.key, self.config, stateful=self.stateful, in_flight=self.in_flight)
        await mux.peer.start("127.0.0.1", 0)
        if like is not None:  # a joining mux gets the same desired state (tables, chain) as the others
            mux.tables = dict(like.tables)
        self.muxes[name] = mux
        addrs = {n: m.peer.address for n, m in self.muxes.items()}
        for m in self.muxes.values():
            m.peer.peers = dict(addrs)
        return mux

    def fail_mux(self, name: str) -> None:
        """The mux dies silently: socket closed, state gone; the router stops sending to it."""
        self.muxes[name].peer.close()
        self.live.remove(name)

    async def set_ownership(self, members: Sequence[str]) -> None:
        own = build_ownership(members, owner_seed=self.config.owner_seed, table_size=self.config.table_size)
        handovers = [self.muxes[n].hand_over(own) for n in members]
        sends = []
        for n, h in zip(members, handovers, strict=True):
            for to, recs in h.items():
                sends.append(self.muxes[n].peer.replicate(to, recs))
        await asyncio.gather(*sends)

    def apply(self, gen: GenerationTable, now: float) -> None:
        for n in self.live:
            self.muxes[n].apply_generation(LISTENER_ID, gen, now=now)

    def expire(self, now: float) -> None:
        for n in self.live:
            self.muxes[n].expire(now)

    def route(self, idx: np.ndarray) -> np.ndarray:
        """ECMP: hash-threshold over the live muxes (what Linux multipath does)."""
        h = flow_hashes(self.flows.src[idx], VIP, TCP, self.flows.sport[idx], VIP_PORT,
                        seed=self.config.router_seed).astype(np.uint64)
        return ((h * np.uint64(len(self.live))) >> np.uint64(32)).astype(np.int64)

    async def send(self, idx: np.ndarray, *, syn: bool, now: float) -> None:
        """One packet for each flow in `idx` (all SYN, or all not SYN); check where it went."""
        f = self.flows
        idx = idx[~f.lost[idx]]
        if len(idx) == 0:
            return
        mux_of = self.route(idx)
        got = np.empty(len(idx), dtype=object)

        async def one(k: int) -> None:
            sel = np.flatnonzero(mux_of == k)
            if len(sel):
                mux = self.muxes[self.live[k]]
                got[sel] = await mux.process(LISTENER_ID, f.src[idx[sel]], f.sport[idx[sel]],
                                             np.full(len(sel), syn), now)

        await asyncio.gather(*(one(k) for k in range(len(self.live))))
        await asyncio.gather(*(self.muxes[n].flush() for n in self.live))
        if syn:
            f.backend[idx] = got
        else:
            f.broken[idx] |= got != f.backend[idx]
        self._observe()

    def _observe(self) -> None:
        r = self.result
        assert r is not None
        recs = sum(len(self.muxes[n].store) for n in self.live)
        pins = sum(len(self.muxes[n].pins) for n in self.live)
        r.records_peak = max(r.records_peak, recs)
        r.pins_peak = max(r.pins_peak, pins)
        r.records_outside_unstable += sum(self.muxes[n].records_outside_unstable() for n in self.live)

    def remove_backend_flows(self, backend: str) -> None:
        f = self.flows
        hit = f.open & (f.backend == backend)
        f.lost |= hit
        f.open &= ~hit

    def state_total(self) -> int:
        return sum(sum(self.muxes[n].state_counts()) for n in self.live)

    async def round(self, now: float, *, new_long: int, new_short: int) -> None:
        f = self.flows
        long_idx = f.add(new_long, long=True) if new_long else np.zeros(0, dtype=np.int64)
        short_idx = f.add(new_short, long=False) if new_short else np.zeros(0, dtype=np.int64)
        await self.send(np.concatenate([long_idx, short_idx]), syn=True, now=now)
        await self.send(np.flatnonzero(f.open), syn=False, now=now)  # data on every open flow
        await self.send(short_idx, syn=False, now=now)  # FIN of the short flows
        f.open[short_idx] = False

    async def close_all(self, now: float) -> None:
        """Every open flow sends its FIN (before the drain deadline: the drain timeout's promise)."""
        f = self.flows
        await self.send(np.flatnonzero(f.open), syn=False, now=now)
        f.open[:] = False


async def _run_one(name: str, config: SimConfig, *, stateful: bool) -> ScenarioResult:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    started = time.perf_counter()
    c = _Cluster(config, stateful=stateful)
    c.result = r = ScenarioResult(scenario=name, stateful=stateful)
    m = config.table_size
    nb = config.backends
    base = c.backends[:nb]
    extra = c.backends[nb]  # the backend an "add" brings
    victim = base[3 % nb]  # the backend drained or removed
    try:
        for i in range(config.muxes):
            await c.add_mux(f"mux-{i}")
        c.live = list(c.muxes)
        await c.set_ownership(c.live)
        gen1 = build_generation(1, base, table_size=m)
        c.apply(gen1, now=0.0)

        # steady state: established flows (SYN long ago), then data, and short flows
        est = c.flows.add(config.flows, long=True)
        await c.send(est, syn=True, now=0.0)
        half = config.new_flows_per_round // 2
        await c.round(0.5, new_long=0, new_short=half)
        r.records_steady = c.state_total()

        if name == "add":
            gen2 = build_generation(2, [*base, extra], table_size=m)
        elif name in ("drain", "remove"):
            gen2 = build_generation(2, [b for b in base if b != victim], table_size=m)
        else:
            gen2 = build_generation(2, [*base, extra], table_size=m)
        moved = gen1.bucket_backends() != gen2.bucket_backends()
        buckets = flow_buckets(c.flows.src[est], VIP, TCP, c.flows.sport[est], VIP_PORT,
                               seed=config.hash_seed, table_size=m)
        r.unstable_flows = int(moved[buckets].sum())
        c.apply(gen2, now=1.0)
        if name == "remove":
            c.dead_backends.add(victim)
            c.remove_backend_flows(victim)

        await c.round(2.0, new_long=half, new_short=half)
        await c.round(5.0, new_long=half, new_short=half)

        last_change = 1.0
        if name == "two_changes":
            gen3 = build_generation(3, [b for b in [*base, extra] if b != victim], table_size=m)
            c.apply(gen3, now=10.0)
            last_change = 10.0
        elif name == "mux_failure":
            c.fail_mux(c.live[min(3, len(c.live) - 1)])
            # the router reroutes at once; the muxes learn it a moment later: meanwhile queries
            # to the dead owner time out and go to the backup owner
            await c.round(10.2, new_long=half, new_short=half)
            await c.set_ownership(c.live)
        elif name == "mux_added":
            newcomer = await c.add_mux(f"mux-{config.muxes}", like=c.muxes[c.live[0]])
            # make before break: records move to their new owners before the router sends traffic
            await c.set_ownership([*c.live, newcomer.name])
            c.live.append(newcomer.name)

        await c.round(12.0, new_long=half, new_short=half)
        await c.round(20.0, new_long=0, new_short=half)
        await c.close_all(last_change + config.drain_timeout_s - 1.0)

        end = last_change + config.drain_timeout_s + 1.0
        c.expire(end)
        await c.round(end, new_long=half, new_short=half)
        await c.close_all(end + 1.0)
        r.records_after = c.state_total()

        f = c.flows
        r.flows = len(f.src)
        r.lost_with_backend = int(f.lost.sum())
        r.broken = int((f.broken & ~f.lost).sum())
        for mux in c.muxes.values():
            r.peer_queries += mux.counters.peer_queries
            r.peer_records += mux.counters.peer_records
            r.peer_timeouts += mux.peer.counters.timeouts
            r.peer_dropped += mux.peer.counters.dropped()
            r.peer_rejected += mux.peer.counters.dropped() - mux.peer.counters.unexpected
            r.owner_unreachable += mux.counters.owner_unreachable
            r.degraded += mux.store.counters.degraded
    finally:
        for mux in c.muxes.values():
            mux.peer.close()
    r.wall_s = time.perf_counter() - started
    return r


def run_scenarios(names: Sequence[str], config: SimConfig, *, baseline: bool = True) -> list[ScenarioResult]:
    """Run scenarios with transitions on and (if `baseline`) the stateless baseline."""
    async def main() -> list[ScenarioResult]:
        out = []
        for name in names:
            out.append(await _run_one(name, config, stateful=True))
            if baseline:
                out.append(await _run_one(name, config, stateful=False))
        return out

    return asyncio.run(main())
