"""The slow path: during a transition, packets of unstable buckets that have no pin yet and are
not a TCP SYN (SYNs are pinned and forwarded by the kernel itself, decision rule 3 compiled into
nft; their records reach the owner through `on_new_flows`, fed by lbagent.dataplane.nflog) reach
the mux's IP stack (the netdev table `accept`s them), where an iptables-nft rule queues them to
NFQUEUE. Here each one is decided by lbagent.core.decide, and the packet is re-injected with the
chosen backend's MAC (destination) and the mux's (source) into the injection veth; the kernel's
netdev table on the veth's peer pins the flow (`add @pins_<proto>`, first writer wins) and
forwards the packet to the backend with `fwd`. The queued copy gets a DROP verdict.

Why not the obvious alternatives: an ACCEPT verdict continues into the mux's routing, which
cannot choose a per-flow backend MAC; NF_REPEAT re-runs only the PREROUTING hook, never the netdev
ingress table that does the `fwd`; and pinning from userspace costs an nft transaction whose
parser takes ~45 us per element here, while the kernel learns a pin from the re-injected packet
for free (the pin exists before the flow's next packet arrives).

In steady state nothing is queued: this reader sleeps in select().
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lbagent.core.decide import (
    AskOwner,
    RecordAndForward,
    decide,
    decide_new_flows_batch,
    decide_owner_unreachable,
    owner_answer,
)
from lbagent.core.flowhash import bucket_of_mark, ipv6_fingerprint
from lbagent.core.ownership import Ownership, hand_over_plan
from lbagent.core.records import FlowKey, RecordStore
from lbagent.core.transition import ListenerTables
from lbagent.peer import PeerHandler, PeerNode, RecordBatch, ReplicatedRecord, sync_answer

log = logging.getLogger("lbagent.slowpath")

IPPROTO = {6: "tcp", 17: "udp"}
TCP_SYN, TCP_ACK = 0x02, 0x10
IPTABLES_CHAIN = "LBAGENT_SLOWPATH"
INJECT_IFACE = "lbinj0"  # the slow path writes here; its veth peer lbinj1 has the pinning chain
INJECT_PEER = "lbinj1"


@dataclass(frozen=True, eq=False)
class SlowListener:
    """What the slow path needs to know about one listener in transition."""

    listener_id: int
    vip: str
    protocol: str
    port: int
    tables: ListenerTables
    macs: dict[str, str]  # backend name -> MAC
    drain_deadline: float  # unix time of the last draining old table's end (inf: only lingering)
    idle_timeout_s: float = 7440.0  # records of this listener live this long without a packet
    headers: dict[str, bytes] = field(default_factory=dict)  # backend name -> Ethernet header

    def with_headers(self, mux_mac: str) -> SlowListener:
        """Precomputed Ethernet headers (backend MAC, mux MAC, IPv4 or IPv6 as the VIP) per backend."""
        src = bytes.fromhex(mux_mac.replace(":", ""))
        ethertype = b"\x86\xdd" if ":" in self.vip else b"\x08\x00"
        for name, mac in self.macs.items():
            self.headers[name] = bytes.fromhex(mac.replace(":", "")) + src + ethertype
        return self


Flow = tuple[str, str, int, int]  # saddr, daddr, sport, dport


@dataclass
class SlowPathStats:
    packets: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    owner_queries: int = 0  # flows whose owner is another mux
    owner_unreachable: int = 0  # ... answered with the stateless fallback (no peer reachable)
    records_sent: int = 0  # records that belong to another owner (kept here until peers exist)
    reinjected: int = 0
    batches: int = 0
    send_errors: int = 0
    unknown_listener: int = 0
    malformed: int = 0
    new_flows: int = 0  # SYNs the kernel pinned and reported (NFLOG), decided here for their record
    replicas_queued: int = 0  # owner answers and records copied to the backup owner
    keepalives: int = 0  # active pinned flows whose records were renewed here and at their owners


@dataclass
class Outbox:
    """Messages for other muxes, collected under the slow path's lock and sent after it: single
    records and replicas from the per-packet path, record batches from the kernel's new flows."""

    records: list[tuple[str, str | None, int, FlowKey, int, str]] = field(default_factory=list)
    replicas: dict[str, list[ReplicatedRecord]] = field(default_factory=dict)
    record_batches: dict[tuple[str, str | None], list[RecordBatch]] = field(default_factory=dict)
    replica_batches: dict[str, list[RecordBatch]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.records or self.replicas or self.record_batches or self.replica_batches)


class CoreDecider:
    """Runs lbagent.core.decide for a packet (or decide_new_flows_batch for a batch of the
    kernel's new flows) and does its action's bookkeeping: records here when this mux owns the
    flow, queues records for flows another mux owns and replicas for this mux's backup (in
    `outbox`). An AskOwner is returned to the caller, which asks the owner (PeerBridge)."""

    def __init__(self, node: str, store: RecordStore, ownership: Ownership) -> None:
        self.node = node
        self.store = store
        self.ownership = ownership
        self.outbox = Outbox()
        # the per-packet path appends to these (the current Outbox's lists)
        self.outbox_records = self.outbox.records
        self.outbox_replicas = self.outbox.replicas

    def take_outbox(self) -> Outbox:
        """What is queued for other muxes; starts a new, empty outbox."""
        out, self.outbox = self.outbox, Outbox()
        self.outbox_records, self.outbox_replicas = self.outbox.records, self.outbox.replicas
        return out

    def decide(self, listener: SlowListener, flow_key: FlowKey, bucket: int, is_syn: bool,
               now: float, stats: SlowPathStats) -> str | AskOwner:
        lid = listener.listener_id
        key = (lid, flow_key)
        action = decide(tables=listener.tables, bucket=bucket, is_syn=is_syn, pin=None,
                        local_record=self.store.get(key, now), owners=self.ownership.owners(bucket),
                        self_mux=self.node)
        if isinstance(action, AskOwner):
            stats.owner_queries += 1
            return action
        reason = action.reason._value_  # a plain str: hashing the enum member itself is a Python call
        stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
        if isinstance(action, RecordAndForward):
            if action.owner != self.node:
                # Owned elsewhere: keep a local copy (answers our own later packets) and tell the owner.
                backend, _ = self.store.put_first(key, action.backend, bucket, now, replica=True)
                self.outbox_records.append((action.owner, action.backup, lid, flow_key, bucket, backend))
                stats.records_sent += 1
                return backend
            backend, stored = self.store.put_first(key, action.backend, bucket, now)
            if stored and action.backup is not None:
                self.outbox_replicas.setdefault(action.backup, []).append(
                    ReplicatedRecord(lid, flow_key, bucket, backend))
            return backend
        return action.backend

    def record_new_flows(self, listener: SlowListener, flows: np.ndarray, now: float,
                         stats: SlowPathStats) -> None:
        """Rule 3's SYN case for many new flows of one listener at once (`decide_new_flows_batch`,
        proven equal to `decide` flow by flow): `flows` is an (n, 6) integer array of saddr,
        daddr, proto, sport, dport, bucket. Does the bookkeeping `decide` does one by one: flows
        this mux owns are recorded here and queued as replicas for their backup; flows another mux
        owns are kept here as a replica (answers our own later packets) and queued for their
        owner, grouped per (owner, backup). Flows of stable buckets need no record (rule 2)."""
        lid = listener.listener_id
        tables = listener.tables
        # (IPv6 flows come as an object array of Python integers: the buckets as int64 for numpy)
        record, backend_ids, primary, backup = decide_new_flows_batch(tables, flows[:, 5].astype(np.int64),
                                                                      self.ownership)
        n_record = int(np.count_nonzero(record))
        reasons = stats.reasons
        if n_record < len(flows):
            reasons["stable"] = reasons.get("stable", 0) + len(flows) - n_record
        if not n_record:
            return
        reasons["new_flow"] = reasons.get("new_flow", 0) + n_record
        if n_record < len(flows):
            flows, backend_ids = flows[record], backend_ids[record]
            primary, backup = primary[record], backup[record]
        batch = RecordBatch.build(lid, flows[:, :5], flows[:, 5].astype(np.int64), backend_ids, tables.names)
        muxes = self.ownership.muxes
        me = muxes.index(self.node) if self.node in muxes else -1
        mine = primary == me
        store = self.store
        if mine.any():
            own = batch if mine.all() else batch.take(mine)
            _, stored = store.put_first_many(own.keys(), own.backend_names(), own.rows["b"].tolist(), now)
            # a new record's copy goes to the bucket's backup owner (never an existing one: its
            # copy was sent when it was created)
            copy = np.asarray(stored, dtype=bool) & (backup[mine] >= 0)
            for b in np.unique(backup[mine][copy]).tolist():
                part = own.take(copy & (backup[mine] == b))
                self.outbox.replica_batches.setdefault(muxes[b], []).append(part)
                stats.replicas_queued += len(part)
        if not mine.all():
            theirs_mask = ~mine
            theirs = batch.take(theirs_mask)
            winners, _ = store.put_first_many(theirs.keys(), theirs.backend_names(),
                                              theirs.rows["b"].tolist(), now, replica=True)
            if theirs.backend_names() != winners:
                # An earlier writer here won for some flows: tell the owner that backend.
                index = {n: i for i, n in enumerate(theirs.backends)}
                rows = theirs.rows.copy()
                names = list(theirs.backends)
                for i, w in enumerate(winners):
                    if w not in index:
                        index[w] = len(names)
                        names.append(w)
                    rows["be"][i] = index[w]
                theirs = RecordBatch(rows, tuple(names))
            owners = primary[theirs_mask].astype(np.int64) * (len(muxes) + 1) + backup[theirs_mask] + 1
            for pair in np.unique(owners).tolist():
                p, b = divmod(pair, len(muxes) + 1)
                key = (muxes[p], muxes[b - 1] if b > 0 else None)
                self.outbox.record_batches.setdefault(key, []).append(theirs.take(owners == pair))
            stats.records_sent += len(theirs)

    def settle(self, listener_id: int, flow_key: FlowKey, bucket: int, backend: str, now: float) -> str:
        """Keep what the owner answered (a replica: the owner holds the record)."""
        winner, _ = self.store.put_first((listener_id, flow_key), backend, bucket, now, replica=True)
        return winner

    def forget(self, alive: dict[int, frozenset[str]]) -> None:
        """Drop the records of listeners no longer in transition, and those of backends whose
        connections ended (drain deadline passed): their flows must not be sent there again."""
        self.store.drop_where(lambda k, r: k[0] not in alive or r.backend not in alive[k[0]])

    def keep_alive(self, listener: SlowListener, flows: np.ndarray, backends: Sequence[str],
                   now: float) -> int:
        """Flows this mux forwarded by a pin since the last round ((n, 6) array as in
        `record_new_flows`, `backends` their pinned backends): renew their record here and queue
        a renewal for each of their owners (primary as RECORDS, backup as REPLICATE), so an
        active flow's record lives at both owners for as long as the flow does, and an owner
        that restarted gets it back. Returns how many flows."""
        if not len(flows):
            return 0
        lid = listener.listener_id
        names = tuple(dict.fromkeys(backends))
        index = {n: i for i, n in enumerate(names)}
        ids = np.fromiter((index[b] for b in backends), dtype=np.int64, count=len(backends))
        buckets = flows[:, 5].astype(np.int64)
        batch = RecordBatch.build(lid, flows[:, :5], buckets, ids, names)
        muxes = self.ownership.muxes
        me = muxes.index(self.node) if self.node in muxes else -1
        primary, backup = self.ownership.primary[buckets], self.ownership.backup[buckets]
        mine = primary == me
        for part, replica in ((batch.take(mine), False), (batch.take(~mine), True)):
            if len(part):
                self.store.put_first_many(part.keys(), part.backend_names(), part.rows["b"].tolist(), now,
                                          replica=replica)
        for p in np.unique(primary[~mine]).tolist():
            if p >= 0:
                self.outbox.record_batches.setdefault((muxes[p], None), []).append(
                    batch.take(~mine & (primary == p)))
        for b in np.unique(backup).tolist():
            if b >= 0 and b != me:
                self.outbox.replica_batches.setdefault(muxes[b], []).append(batch.take(backup == b))
        return len(flows)


class PeerBridge:
    """lbagent.peer's asyncio PeerNode on its own thread, for the synchronous slow path: owner
    queries (answer delivered to a callback), RECORD and REPLICATE messages, and the owner side
    (answering other muxes) through `handler`."""

    def __init__(self, node: str, key: bytes, peers: dict[str, tuple[str, int]], bind: tuple[str, int],
                 handler: PeerHandler, timeout_s: float = 0.25) -> None:
        self.peer = PeerNode(node, key, handler, peers=peers, timeout_s=timeout_s)
        self.bind = bind
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="peer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(*self.bind), self._loop).result(timeout=5)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.peer.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=2)

    def query(self, action: AskOwner, listener_id: int, flow: FlowKey, bucket: int,
              done: Callable[[str | None], None]) -> None:
        async def ask() -> None:
            answer = await self.peer.query(action.owner, action.backup, listener_id, flow, bucket,
                                           action.fallback)
            done(answer.backend if answer is not None else None)
        asyncio.run_coroutine_threadsafe(ask(), self._loop)

    def send(self, outbox: Outbox) -> None:
        """Records for other owners, grouped per (owner, backup) into RECORDS batches (packed, up
        to 1,500 flows a datagram: the kernel pins tens of thousands of new flows a second), and
        replicas for backups."""
        grouped: dict[tuple[str, str | None], list[RecordBatch]] = {
            k: list(v) for k, v in outbox.record_batches.items()}
        singles: dict[tuple[str, str | None], list[ReplicatedRecord]] = {}
        for owner, backup, lid, flow, bucket, backend in outbox.records:
            singles.setdefault((owner, backup), []).append(ReplicatedRecord(lid, flow, bucket, backend))
        for k, recs in singles.items():
            grouped.setdefault(k, []).append(RecordBatch.of(recs))
        copies: dict[str, list[RecordBatch]] = {k: list(v) for k, v in outbox.replica_batches.items()}
        for to, recs in outbox.replicas.items():
            copies.setdefault(to, []).append(RecordBatch.of(recs))

        async def send() -> None:
            await asyncio.gather(*(self.peer.record_batch(owner, backup, RecordBatch.concat(batches))
                                   for (owner, backup), batches in grouped.items()),
                                 *(self.peer.replicate(to, RecordBatch.concat(batches))
                                   for to, batches in copies.items()))
        asyncio.run_coroutine_threadsafe(send(), self._loop)

    def call_soon(self, fn: Callable[[], None], delay_s: float) -> None:
        """Run `fn` on the peer thread after `delay_s` (coalescing replicas of owner answers)."""
        self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, fn)


def ip_header(data: bytes) -> tuple[int, int, int, int]:
    """(transport offset, protocol, saddr, daddr as integers) of an IPv4 or IPv6 packet. IPv6:
    only the fixed header (a packet with extension headers raises IndexError: malformed here)."""
    version = data[0] >> 4
    if version == 4:
        saddr, daddr = struct.unpack_from("!II", data, 12)
        return (data[0] & 0x0F) * 4, data[9], saddr, daddr
    if version == 6 and data[6] in IPPROTO and len(data) >= 44:
        return (40, data[6], int.from_bytes(data[8:24], "big"), int.from_bytes(data[24:40], "big"))
    raise IndexError(f"not an IPv4 or IPv6 TCP/UDP packet (version {version})")


def iptables_rules(listeners: Sequence[tuple[str, str, int]], queue_num: int, *, ipv6: bool = False) -> str:
    """iptables-nft-restore input that queues (vip, protocol, port) packets reaching the stack:
    the IPv4 listeners, or (ipv6=True, for ip6tables-nft-restore) the IPv6 ones."""
    lines = ["*mangle", f":{IPTABLES_CHAIN} - [0:0]"]
    for vip, protocol, port in listeners:
        if (":" in vip) != ipv6:
            continue
        lines.append(f"-A {IPTABLES_CHAIN} -d {vip}/{128 if ipv6 else 32} -p {protocol} --dport {port} "
                     f"-j NFQUEUE --queue-num {queue_num} --queue-bypass")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_iptables(listeners: Sequence[tuple[str, str, int]], queue_num: int) -> None:
    """Replace our chain's rules atomically (IPv4 and IPv6) and make sure PREROUTING jumps to it."""
    for tool, ipv6 in (("iptables-nft", False), ("ip6tables-nft", True)):
        rules = iptables_rules(listeners, queue_num, ipv6=ipv6)
        subprocess.run([f"{tool}-restore", "--noflush"], input=rules, text=True, check=True,
                       capture_output=True)
        check = subprocess.run([tool, "-t", "mangle", "-C", "PREROUTING", "-j", IPTABLES_CHAIN],
                               capture_output=True, check=False)
        if check.returncode != 0:
            subprocess.run([tool, "-t", "mangle", "-I", "PREROUTING", "-j", IPTABLES_CHAIN],
                           check=True, capture_output=True)


def ensure_inject_veth() -> None:
    """The veth pair the slow path re-injects through (made once per namespace, kept across
    restarts so the nft chain bound to its peer stays valid)."""
    if Path(f"/sys/class/net/{INJECT_IFACE}").exists():
        return
    subprocess.run(["ip", "link", "add", INJECT_IFACE, "type", "veth", "peer", "name", INJECT_PEER],
                   check=True, capture_output=True)
    for dev in (INJECT_IFACE, INJECT_PEER):
        with contextlib.suppress(OSError):  # no IPv6 chatter (router solicitations) on the pair
            Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6").write_text("1")
        subprocess.run(["ip", "link", "set", dev, "up"], check=True, capture_output=True)


def remove_inject_veth() -> None:
    subprocess.run(["ip", "link", "del", INJECT_IFACE], capture_output=True, check=False)


def remove_iptables() -> None:
    for tool in ("iptables-nft", "ip6tables-nft"):
        for argv in (["-D", "PREROUTING", "-j", IPTABLES_CHAIN], ["-F", IPTABLES_CHAIN],
                     ["-X", IPTABLES_CHAIN]):
            subprocess.run([tool, "-t", "mangle", *argv], capture_output=True, check=False)


class SlowPath:
    """Reads NFQUEUE `queue_num` in a thread; decides each packet and re-injects it into
    `inject_iface` (the kernel pins and forwards it from there)."""

    def __init__(self, inject_iface: str, mux_mac: str, queue_num: int, *, decider: CoreDecider,
                 peers: PeerBridge | None = None) -> None:
        self.peers = peers
        self._held: dict[tuple[int, FlowKey], list[bytes]] = {}  # packets waiting for an owner's answer
        self._by_id: dict[int, SlowListener] = {}
        self.inject_iface = inject_iface
        self.mux_mac = mux_mac
        self.queue_num = queue_num
        self.decider = decider
        self.stats = SlowPathStats()
        self._listeners: dict[tuple[int, int, int], SlowListener] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the record store against update()'s forget()
        self._now = time.time()
        self.kernel_stats = SlowPathStats()  # the kernel's new flows (NFLOG), apart from NFQUEUE's
        self._ship_scheduled = False
        self.ready = False  # the first state is applied: records of its listeners can be kept
        self.previous_ownership: Ownership | None = None  # before the last pool membership change

    def update(self, listeners: Sequence[SlowListener]) -> None:
        """Swap in the listeners now in transition (others are answered by the kernel alone)."""
        protocols = {"tcp": 6, "udp": 17}
        table = {(int(ipaddress.ip_address(ln.vip)), protocols[ln.protocol], ln.port):
                 ln.with_headers(self.mux_mac) for ln in listeners}
        with self._lock:
            self._listeners = table
            self._by_id = {ln.listener_id: ln for ln in table.values()}
            self.decider.forget({ln.listener_id: ln.tables.alive_backends() for ln in listeners})
            self.ready = True

    # -- pool membership (lbagent/pool.py drives these) -------------------------------------------
    def set_ownership(self, new: Ownership) -> None:
        """Switch to the owners of a new member set; records held here stay (they still answer
        this mux's own packets and SYNCs), marked as replicas unless this mux is now primary."""
        with self._lock:
            self.previous_ownership, self.decider.ownership = self.decider.ownership, new
            me = self.decider.node
            for _key, rec in self.decider.store:
                rec.replica = not (rec.bucket < new.table_size
                                   and new.muxes[int(new.primary[rec.bucket])] == me)

    def on_sync(self, sender: str, view: str, fresh: bool) -> tuple[str, RecordBatch | None]:
        """A member at pool view `view` asks for the records it now owns (runs on the peer thread)."""
        with self._lock:
            return sync_answer(list(self.decider.store), self.decider.ownership, self.previous_ownership,
                               sender, view, fresh)

    def leaving_hand_over(self) -> dict[str, RecordBatch]:
        """This mux left the pool: every record it holds, for its bucket's new primary and backup."""
        with self._lock:
            held = dict(iter(self.decider.store))
            send, _drop = hand_over_plan(((k, r.bucket) for k, r in held.items()), self.decider.ownership,
                                         self.decider.node)
        return {to: RecordBatch.of([ReplicatedRecord(k[0], k[1], held[k].bucket, held[k].backend)
                                    for k in keys]) for to, keys in send.items()}

    def listener_of(self, daddr: int, proto: int, dport: int) -> SlowListener | None:
        return self._listeners.get((daddr, proto, dport))

    def ipv6_keepalive_batches(self, pins: Sequence[tuple[int, int, int, int, str, int]], interval_s: float,
                               seed: int) -> list[tuple[SlowListener, np.ndarray, list[str]]]:
        """The keep-alive rows of IPv6 flows (for `keep_alive`). An IPv6 pin is keyed by a
        fingerprint of the addresses (lbagent.dataplane.nft), not the addresses, so the flows are
        found among the records this mux holds (every flow it pinned has one here, as owner or as
        a copy): each IPv6 record whose fingerprint and ports match a pin a packet renewed since
        the last round. Costs a Python jhash pair per IPv6 record in transition."""
        active = {(f1, f2, sp, dp): mac for f1, f2, sp, dp, mac, idle in pins if idle <= interval_s + 1}
        if not active:
            return []
        found: dict[int, tuple[SlowListener, list[tuple[int, ...]], list[str]]] = {}
        with self._lock:
            names_of: dict[int, dict[str, str]] = {}
            for (lid, flow), rec in self.decider.store:
                listener = self._by_id.get(lid)
                if listener is None or ":" not in listener.vip:
                    continue
                saddr, daddr, proto, sport, dport = flow
                f1, f2 = ipv6_fingerprint(ipaddress.IPv6Address(saddr), ipaddress.IPv6Address(daddr),
                                          seed=seed)
                mac = active.get((f1, f2, sport, dport))
                if mac is None:
                    continue
                names = names_of.get(lid)
                if names is None:
                    alive = listener.tables.alive_backends()
                    names = names_of[lid] = {m: n for n, m in listener.macs.items() if n in alive}
                backend = names.get(mac)
                if backend is None:
                    continue  # a pin to an ended backend: its flow is over
                entry = found.setdefault(lid, (listener, [], []))
                entry[1].append((saddr, daddr, proto, sport, dport, rec.bucket))
                entry[2].append(backend)
        out = []
        for listener, rows, backends in found.values():
            arr = np.empty((len(rows), 6), dtype=object)
            arr[:] = rows
            out.append((listener, arr, backends))
        return out

    def keep_alive(self, per_listener: Sequence[tuple[SlowListener, np.ndarray, list[str]]]) -> int:
        """Renew the records of the flows this mux's kernel forwarded by a pin since the last
        round, here and at their owners (see CoreDecider.keep_alive)."""
        now = time.time()
        n = 0
        with self._lock:
            for listener, flows, backends in per_listener:
                if listener.listener_id in self._by_id:
                    n += self.decider.keep_alive(listener, flows, backends, now)
            outbox = self.decider.take_outbox()
        self.kernel_stats.keepalives += n
        if self.peers is not None and outbox:
            self.peers.send(outbox)
        return n

    def expire_records(self, now: float) -> int:
        """Remove records idle longer than their listener's idle timeout."""
        with self._lock:
            by_id = self._by_id
            return self.decider.store.expire_idle_by(
                lambda lid: by_id[lid].idle_timeout_s if lid in by_id else 0.0, now)

    def beacon_moved(self, listener_id: int, to: Sequence[str]) -> bool:
        """Copy one record of a moved flow of the listener to each mux in `to` (REPLICATE).

        Why: a mux drops a lingering table when it holds no record on a moved bucket for the idle
        timeout. With three or more muxes, one that neither owns nor forwards any moved flow would
        drop it on its own count while the flows live on elsewhere, and send a flow that ECMP later
        moves to it to the current table. One live record a round keeps its count honest; the copy
        is an ordinary replica (it answers that flow correctly) and expires like one. Returns
        whether this mux, as an owner, held such a record."""
        with self._lock:
            listener = self._by_id.get(listener_id)
            if listener is None:
                return False
            tables = listener.tables
            # Only a record of a bucket this mux is the primary owner of (never a replica): copies
            # must not renew each other in a circle, or a dead flow's records would never expire
            # and the table never end. Not "any record held as owner": when the primary answers
            # late, the backup records the flow as owner too (the query's fallback), and two
            # owner records of one flow, each beaconed to the other mux, renewed each other for
            # ever (every REPLICATE refreshes the record it lands on).
            own, me = self.decider.ownership, self.decider.node
            found = next(((k, r) for k, r in self.decider.store
                          if k[0] == listener_id and not r.replica
                          and r.bucket < own.table_size and own.muxes[int(own.primary[r.bucket])] == me
                          and r.backend != tables.current_backend(r.bucket)), None)
            if found is None:
                return False
            (lid, flow), rec = found
            batch = RecordBatch.of([ReplicatedRecord(lid, flow, rec.bucket, rec.backend)])
            for mux in to:
                if mux != self.decider.node:
                    self.decider.outbox.replica_batches.setdefault(mux, []).append(batch)
            outbox = self.decider.take_outbox()
        if self.peers is not None and outbox:
            self.peers.send(outbox)
        return True

    def moved_records(self, listener_id: int) -> int:
        """Records of a listener whose backend is not the current table's for their bucket: flows
        that still need the listener's old (lingering) tables."""
        with self._lock:
            listener = self._by_id.get(listener_id)
            if listener is None:
                return 0
            tables = listener.tables
            return sum(1 for k, r in self.decider.store
                       if k[0] == listener_id and r.backend != tables.current_backend(r.bucket))

    @property
    def records(self) -> int:
        return len(self.decider.store)

    def start(self) -> None:
        from netfilterqueue import NetfilterQueue  # compiled binding: only the mux role needs it

        self._nfq = NetfilterQueue()
        # A long queue and a big socket buffer: a burst of new flows waits instead of being dropped.
        self._nfq.bind(self.queue_num, self._on_packet, max_len=65536, sock_len=64 << 20)
        # sock_len is capped by net.core.rmem_max; as root, force the size (a full socket drops packets).
        nl = socket.socket(fileno=os.dup(self._nfq.get_fd()))
        with contextlib.suppress(OSError):
            nl.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        nl.close()
        self._out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self._out.bind((self.inject_iface, 0))
        self._thread = threading.Thread(target=self._loop, name="slowpath", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._nfq.unbind()
            self._out.close()
            self._thread = None

    def _loop(self) -> None:
        fd = self._nfq.get_fd()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            self._now = time.time()  # one clock read per receive batch
            with self._lock:
                self._nfq.run(block=False)  # every packet waiting now: one receive batch
                outbox = self.decider.take_outbox()
            self.stats.batches += 1
            if self.peers is not None and outbox:
                self.peers.send(outbox)

    def _on_packet(self, pkt) -> None:
        self.stats.packets += 1
        data = pkt.get_payload()
        try:
            ihl, proto, saddr, daddr = ip_header(data)
            sport, dport = struct.unpack_from("!HH", data, ihl)
            listener = self._listeners.get((daddr, proto, dport))
            if listener is None:
                self.stats.unknown_listener += 1
                pkt.drop()
                return
            is_syn = proto == 6 and (data[ihl + 13] & (TCP_SYN | TCP_ACK)) == TCP_SYN
            # The netdev table hashed the flow into the mark (slot << 17 | bucket): no rehash here.
            bucket = bucket_of_mark(pkt.get_mark())
            flow = (saddr, daddr, proto, sport, dport)
            backend = self.decider.decide(listener, flow, bucket, is_syn, self._now, self.stats)
            if isinstance(backend, AskOwner):
                self._ask_owner(backend, listener, flow, bucket, data)
            else:
                self._reinject(listener, backend, data)
        except (IndexError, struct.error, KeyError):
            self.stats.malformed += 1  # not a well-formed IPv4/IPv6 TCP/UDP packet, or no MAC for it
        pkt.drop()

    def _reinject(self, listener: SlowListener, backend: str, data: bytes) -> None:
        try:
            self._out.send(listener.headers[backend] + data)
            self.stats.reinjected += 1
        except OSError:
            self.stats.send_errors += 1

    def _ask_owner(self, action: AskOwner, listener: SlowListener, flow: FlowKey, bucket: int,
                   data: bytes) -> None:
        """Hold the packet (a copy: the queued one is dropped) until the owner answers."""
        if self.peers is None:
            self.stats.owner_unreachable += 1
            self._reinject(listener, decide_owner_unreachable(action).backend, data)
            return
        key = (listener.listener_id, flow)
        held = self._held.get(key)
        if held is not None:
            held.append(data)  # a query for this flow is already out
            return
        self._held[key] = [data]

        def answered(backend: str | None) -> None:  # runs on the peer thread
            with self._lock:
                packets = self._held.pop(key, [])
                if backend is None:
                    self.stats.owner_unreachable += 1
                    backend = decide_owner_unreachable(action).backend
                if listener.listener_id in self._by_id:
                    backend = self.decider.settle(listener.listener_id, flow, bucket, backend, time.time())
            for packet in packets:
                self._reinject(listener, backend, packet)

        self.peers.query(action, listener.listener_id, flow, bucket, answered)

    # -- new flows the kernel pinned itself (rule 3's SYN case in nft), from nfnetlink_log ------
    def on_new_flows(self, flows: np.ndarray | Sequence[tuple[int, int, int, int, int, int]]) -> None:
        """Record new flows the kernel pinned (one NFLOG receive batch: an (n, 6) array of saddr,
        daddr, proto, sport, dport, bucket, or such tuples) at their owner: `decide`'s SYN case
        (RecordAndForward: record here if this mux owns the flow, else a RECORDS batch for the
        owner, and a replica for the backup) done for the whole batch by
        `decide_new_flows_batch`. The packets themselves are already forwarded by the kernel."""
        now = time.time()
        stats = self.kernel_stats
        wide = isinstance(flows, np.ndarray) and flows.dtype == object  # IPv6 among them (nflog)
        flows = np.asarray(flows, dtype=object if wide else np.int64).reshape(-1, 6)
        if not len(flows):
            return
        with self._lock:
            listeners = self._listeners
            # Usually one listener per batch (one transition at a time): split only if not.
            daddr, proto, dport = flows[:, 1], flows[:, 2], flows[:, 4]
            same = (daddr == daddr[0]) & (proto == proto[0]) & (dport == dport[0])
            if same.all():
                groups = [((int(daddr[0]), int(proto[0]), int(dport[0])), flows)]
            elif wide:
                keys = [(int(d), int(p), int(pt)) for d, p, pt in flows[:, [1, 2, 4]].tolist()]
                groups = [(k, flows[np.array([x == k for x in keys])]) for k in dict.fromkeys(keys)]
            else:
                ids = np.unique(flows[:, [1, 2, 4]], axis=0)
                groups = [((int(d), int(p), int(pt)),
                           flows[(daddr == d) & (proto == p) & (dport == pt)]) for d, p, pt in ids]
            for key, part in groups:
                listener = listeners.get(key)
                if listener is None:
                    stats.unknown_listener += len(part)  # transition just ended: nothing to record
                    continue
                stats.new_flows += len(part)
                self.decider.record_new_flows(listener, part, now, stats)
            outbox = self.decider.take_outbox()
        stats.batches += 1
        if self.peers is not None and outbox:
            self.peers.send(outbox)

    # -- the owner's side: what other muxes ask this one (called on the peer thread) ----------
    def _replicate_to_backup(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                             backend: str) -> None:
        """Queue a copy of a record this mux just created as owner for the bucket's backup owner
        (not back to the mux that sent it: that one already holds a copy). Called under _lock."""
        primary, backup = self.decider.ownership.owners(bucket)
        other = backup if primary == self.decider.node else primary
        if other is None or other in (sender, self.decider.node):
            return
        self.decider.outbox_replicas.setdefault(other, []).append(
            ReplicatedRecord(listener_id, flow, bucket, backend))
        self.kernel_stats.replicas_queued += 1
        self._schedule_ship()

    def _schedule_ship(self) -> None:
        if not self._ship_scheduled and self.peers is not None:
            # Coalesce: one REPLICATE batch for the answers of the next few milliseconds.
            self._ship_scheduled = True
            self.peers.call_soon(self._ship, 0.005)

    def _ship(self) -> None:
        with self._lock:
            self._ship_scheduled = False
            outbox = self.decider.take_outbox()
        if self.peers is not None and outbox:
            self.peers.send(outbox)

    def on_query(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                 hint: str) -> tuple[str, str]:
        with self._lock:
            listener = self._by_id.get(listener_id)
            if listener is None:
                # Not in transition here (ended, or not applied yet): keep no state for it.
                return hint, "unknown"
            result = owner_answer(self.decider.store, listener.tables, (listener_id, flow), bucket, hint,
                                  time.time())
            if result.stored:
                self._replicate_to_backup(sender, listener_id, flow, bucket, result.backend)
        status = "found" if result.found else ("stored" if result.stored else "degraded")
        return result.backend, status

    def on_record(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                  backend: str) -> tuple[str, str]:
        with self._lock:
            if listener_id not in self._by_id:
                return backend, "unknown"
            winner, stored = self.decider.store.put_first((listener_id, flow), backend, bucket, time.time())
            if stored:
                self._replicate_to_backup(sender, listener_id, flow, bucket, winner)
        return winner, "stored" if stored else "found"

    def on_records(self, sender: str, records: RecordBatch | Sequence[ReplicatedRecord]) -> None:
        """New flows `sender` pinned, for this mux as their owner: stored in bulk (first writer
        wins), and each new record copied to the bucket's other owner unless that is `sender`."""
        batch = RecordBatch.of(records)
        now = time.time()
        with self._lock:
            batch = self._known(batch)
            if not len(batch):
                return
            buckets = batch.rows["b"]
            _, stored = self.decider.store.put_first_many(batch.keys(), batch.backend_names(),
                                                          buckets.tolist(), now)
            own = self.decider.ownership
            muxes = own.muxes
            me = muxes.index(self.decider.node) if self.decider.node in muxes else -1
            not_to = muxes.index(sender) if sender in muxes else -1
            # A bucket outside our table (a peer with another configuration) has no owners here:
            # stored as sent, copied nowhere.
            in_table = buckets < own.table_size
            at = np.where(in_table, buckets, 0)
            primary, backup = own.primary[at], own.backup[at]
            other = np.where(primary == me, backup, primary)
            copy = (np.asarray(stored, dtype=bool) & in_table & (other >= 0) & (other != me)
                    & (other != not_to))
            if not copy.any():
                return
            for to in np.unique(other[copy]).tolist():
                part = batch.take(copy & (other == to))
                self.decider.outbox.replica_batches.setdefault(muxes[to], []).append(part)
                self.kernel_stats.replicas_queued += len(part)
            self._schedule_ship()

    def on_replicate(self, sender: str, records: RecordBatch | Sequence[ReplicatedRecord]) -> str | None:
        batch = RecordBatch.of(records)
        now = time.time()
        with self._lock:
            if not self.ready:
                return "not_ready"  # no listener applied yet: the sender sends them again
            batch = self._known(batch)
            if not len(batch):
                return None
            # A copy of a bucket this mux is the primary of (a hand-over after a membership
            # change) is held as the owner's record; any other is a replica.
            own, me = self.decider.ownership, self.decider.node
            buckets = batch.rows["b"].astype(np.int64)
            inside = buckets < own.table_size
            mine = inside & (own.primary[np.where(inside, buckets, 0)] ==
                             (own.muxes.index(me) if me in own.muxes else -1))
            for part, replica in ((batch.take(~mine), True), (batch.take(mine), False)):
                if len(part):
                    self.decider.store.put_first_many(part.keys(), part.backend_names(),
                                                      part.rows["b"].tolist(), now, replica=replica)
        return None

    def _known(self, batch: RecordBatch) -> RecordBatch:
        """The records of listeners in transition here (others: not applied yet, or ended)."""
        known = np.isin(batch.rows["l"], np.fromiter(self._by_id, dtype=np.int64, count=len(self._by_id)))
        return batch if known.all() else batch.take(known)

    def record_dump(self) -> list[list]:
        """Every record held: [listener, [saddr, daddr, proto, sport, dport], bucket, backend,
        replica] (tests and debugging, served on /records)."""
        with self._lock:
            return [[k[0], list(k[1]), r.bucket, r.backend, r.replica] for k, r in self.decider.store]
