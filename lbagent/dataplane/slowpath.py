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

from lbagent.core.decide import AskOwner, RecordAndForward, decide, decide_owner_unreachable, owner_answer
from lbagent.core.ownership import Ownership
from lbagent.core.records import FlowKey, RecordStore
from lbagent.core.transition import ListenerTables
from lbagent.peer import PeerHandler, PeerNode, ReplicatedRecord

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
    drain_deadline: float  # unix time of the last old table's end: pins are worthless after it
    headers: dict[str, bytes] = field(default_factory=dict)  # backend name -> Ethernet header

    def with_headers(self, mux_mac: str) -> SlowListener:
        """Precomputed Ethernet headers (backend MAC, mux MAC, IPv4) per backend."""
        src = bytes.fromhex(mux_mac.replace(":", ""))
        for name, mac in self.macs.items():
            self.headers[name] = bytes.fromhex(mac.replace(":", "")) + src + b"\x08\x00"
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


class CoreDecider:
    """Runs lbagent.core.decide for a packet and does its action's bookkeeping: records here when
    this mux owns the flow, queues RECORD messages for flows another mux owns and replicas for
    this mux's backup. An AskOwner is returned to the caller, which asks the owner (PeerBridge)."""

    def __init__(self, node: str, store: RecordStore, ownership: Ownership) -> None:
        self.node = node
        self.store = store
        self.ownership = ownership
        self.outbox_records: list[tuple[str, str | None, int, FlowKey, int, str]] = []
        self.outbox_replicas: dict[str, list[ReplicatedRecord]] = {}

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

    def settle(self, listener_id: int, flow_key: FlowKey, bucket: int, backend: str, now: float) -> str:
        """Keep what the owner answered (a replica: the owner holds the record)."""
        winner, _ = self.store.put_first((listener_id, flow_key), backend, bucket, now, replica=True)
        return winner

    def forget(self, keep_listeners: set[int]) -> None:
        self.store.drop_where(lambda k, _r: k[0] not in keep_listeners)


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

    def send_records(self, records: list[tuple[str, str | None, int, FlowKey, int, str]],
                     replicas: dict[str, list[ReplicatedRecord]]) -> None:
        """Records for other owners, grouped per (owner, backup) into RECORDS batches (one
        datagram per 200 flows: the kernel pins tens of thousands of new flows a second), and
        replicas for backups."""
        grouped: dict[tuple[str, str | None], list[ReplicatedRecord]] = {}
        for owner, backup, lid, flow, bucket, backend in records:
            grouped.setdefault((owner, backup), []).append(ReplicatedRecord(lid, flow, bucket, backend))

        async def send() -> None:
            await asyncio.gather(*(self.peer.record_batch(owner, backup, recs)
                                   for (owner, backup), recs in grouped.items()),
                                 *(self.peer.replicate(to, recs) for to, recs in replicas.items()))
        asyncio.run_coroutine_threadsafe(send(), self._loop)

    def call_soon(self, fn: Callable[[], None], delay_s: float) -> None:
        """Run `fn` on the peer thread after `delay_s` (coalescing replicas of owner answers)."""
        self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, fn)


def iptables_rules(listeners: Sequence[tuple[str, str, int]], queue_num: int) -> str:
    """iptables-nft-restore input that queues (vip, protocol, port) packets reaching the stack."""
    lines = ["*mangle", f":{IPTABLES_CHAIN} - [0:0]"]
    for vip, protocol, port in listeners:
        lines.append(f"-A {IPTABLES_CHAIN} -d {vip}/32 -p {protocol} --dport {port} "
                     f"-j NFQUEUE --queue-num {queue_num} --queue-bypass")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_iptables(listeners: Sequence[tuple[str, str, int]], queue_num: int) -> None:
    """Replace our chain's rules atomically and make sure PREROUTING jumps to it."""
    subprocess.run(["iptables-nft-restore", "--noflush"], input=iptables_rules(listeners, queue_num),
                   text=True, check=True, capture_output=True)
    check = subprocess.run(["iptables-nft", "-t", "mangle", "-C", "PREROUTING", "-j", IPTABLES_CHAIN],
                           capture_output=True, check=False)
    if check.returncode != 0:
        subprocess.run(["iptables-nft", "-t", "mangle", "-I", "PREROUTING", "-j", IPTABLES_CHAIN],
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
    for argv in (["-D", "PREROUTING", "-j", IPTABLES_CHAIN], ["-F", IPTABLES_CHAIN], ["-X", IPTABLES_CHAIN]):
        subprocess.run(["iptables-nft", "-t", "mangle", *argv], capture_output=True, check=False)


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

    def update(self, listeners: Sequence[SlowListener]) -> None:
        """Swap in the listeners now in transition (others are answered by the kernel alone)."""
        protocols = {"tcp": 6, "udp": 17}
        table = {(int.from_bytes(socket.inet_aton(ln.vip), "big"), protocols[ln.protocol], ln.port):
                 ln.with_headers(self.mux_mac) for ln in listeners}
        with self._lock:
            self._listeners = table
            self._by_id = {ln.listener_id: ln for ln in table.values()}
            self.decider.forget({ln.listener_id for ln in listeners})

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
                records, replicas = self.decider.outbox_records, self.decider.outbox_replicas
                self.decider.outbox_records, self.decider.outbox_replicas = [], {}
            self.stats.batches += 1
            if self.peers is not None and (records or replicas):
                self.peers.send_records(records, replicas)

    def _on_packet(self, pkt) -> None:
        self.stats.packets += 1
        data = pkt.get_payload()
        try:
            ihl = (data[0] & 0x0F) * 4
            proto = data[9]
            saddr, daddr = struct.unpack_from("!II", data, 12)
            sport, dport = struct.unpack_from("!HH", data, ihl)
            listener = self._listeners.get((daddr, proto, dport))
            if listener is None:
                self.stats.unknown_listener += 1
                pkt.drop()
                return
            is_syn = proto == 6 and (data[ihl + 13] & (TCP_SYN | TCP_ACK)) == TCP_SYN
            bucket = pkt.get_mark()  # the netdev table hashed the flow into the mark: no rehash here
            flow = (saddr, daddr, proto, sport, dport)
            backend = self.decider.decide(listener, flow, bucket, is_syn, self._now, self.stats)
            if isinstance(backend, AskOwner):
                self._ask_owner(backend, listener, flow, bucket, data)
            else:
                self._reinject(listener, backend, data)
        except (IndexError, struct.error, KeyError):
            self.stats.malformed += 1  # not a well-formed IPv4 TCP/UDP packet, or no MAC for it
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
    def on_new_flows(self, flows: Sequence[tuple[int, int, int, int, int, int]]) -> None:
        """Record each flow at its owner: the same `decide` call the NFQUEUE path makes for a SYN
        (RecordAndForward: record here if this mux owns it, else a RECORD for the owner, and a
        replica for the backup). The packet itself is already forwarded by the kernel."""
        now = time.time()
        stats = self.kernel_stats
        with self._lock:
            listeners = self._listeners
            decide_one = self.decider.decide
            for saddr, daddr, proto, sport, dport, bucket in flows:
                listener = listeners.get((daddr, proto, dport))
                if listener is None:
                    stats.unknown_listener += 1  # transition just ended: nothing to record
                    continue
                stats.new_flows += 1
                decide_one(listener, (saddr, daddr, proto, sport, dport), bucket, True, now, stats)
            records, replicas = self.decider.outbox_records, self.decider.outbox_replicas
            self.decider.outbox_records, self.decider.outbox_replicas = [], {}
        stats.batches += 1
        if self.peers is not None and (records or replicas):
            self.peers.send_records(records, replicas)

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
        if not self._ship_scheduled and self.peers is not None:
            # Coalesce: one REPLICATE batch for the answers of the next few milliseconds.
            self._ship_scheduled = True
            self.peers.call_soon(self._ship, 0.005)

    def _ship(self) -> None:
        with self._lock:
            self._ship_scheduled = False
            records, replicas = self.decider.outbox_records, self.decider.outbox_replicas
            self.decider.outbox_records, self.decider.outbox_replicas = [], {}
        if self.peers is not None and (records or replicas):
            self.peers.send_records(records, replicas)

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

    def on_records(self, sender: str, records: Sequence[ReplicatedRecord]) -> None:
        now = time.time()
        with self._lock:
            put = self.decider.store.put_first
            for r in records:
                if r.listener_id not in self._by_id:
                    continue
                winner, stored = put((r.listener_id, r.flow), r.backend, r.bucket, now)
                if stored:
                    self._replicate_to_backup(sender, r.listener_id, r.flow, r.bucket, winner)

    def on_replicate(self, sender: str, records: Sequence[ReplicatedRecord]) -> None:
        now = time.time()
        with self._lock:
            for r in records:
                if r.listener_id in self._by_id:
                    self.decider.store.put_first((r.listener_id, r.flow), r.backend, r.bucket, now,
                                                 replica=True)

    def record_dump(self) -> list[list]:
        """Every record held: [listener, [saddr, daddr, proto, sport, dport], bucket, backend,
        replica] (tests and debugging, served on /records)."""
        with self._lock:
            return [[k[0], list(k[1]), r.bucket, r.backend, r.replica] for k, r in self.decider.store]
