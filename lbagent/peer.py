"""UDP protocol between muxes: ask a flow's owner, record flows, replicate records to the backup.

Every datagram is authenticated with HMAC-SHA256 over a cluster key and protected against
replay by a timestamp window plus a cache of nonces seen inside that window. Anything malformed,
unauthenticated, replayed, from an unknown sender or answering nothing we asked is dropped and
counted; no datagram can raise out of the receive path.

Wire format (network byte order)::

    magic "LBP1" | type u8 | timestamp_ms u64 | nonce 8 bytes | request id u32 |
    sender length u8 | sender (UTF-8) | payload (JSON) | HMAC-SHA256 tag (32 bytes)

The tag covers everything before it, prefixed by a domain string. Types: QUERY, RECORD,
RECORDS (a batch of RECORDs for the owner, from the kernel's new-flow notifications) and
REPLICATE are requests; RECORDS and REPLICATE carry their records packed (`RecordBatch`:
fixed 23-byte rows, base64, plus the backend names they index, inside the JSON payload;
the JSON list form "r" of the previous version is still accepted). ANSWER (to QUERY/RECORD)
and ACK (to REPLICATE/RECORDS) are responses and must carry the request id of a request we
sent to that sender. A QUERY sent to the backup owner after the primary did not answer carries
"as": "backup", so the backup counts the answers it gives in the primary's place.

SYNC {"v": pool view, "fresh": bool} (pool membership, `docs/dataplane.md` "Mux pools") asks a
member for the records the sender now owns; the member answers "ok" once it has sent them
(REPLICATE, acknowledged), "other_view" while it runs another member set (the sender asks again).
A REPLICATE is acknowledged with "not_ready" by a mux that has not applied its first state yet
(it could not keep the records): the hand-over sends them again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import numpy as np

from lbagent.core.decide import owner_answer
from lbagent.core.ownership import Ownership, hand_over_plan, pool_view, records_for_member
from lbagent.core.records import FlowKey, FlowRecord, RecordKey, RecordStore
from lbagent.core.transition import ListenerTables

__all__ = [
    "DecodeError",
    "FlowOwner",
    "Message",
    "MsgType",
    "PeerAnswer",
    "PeerCounters",
    "PeerHandler",
    "PeerNode",
    "RecordBatch",
    "ReplayGuard",
    "ReplicatedRecord",
    "decode_message",
    "encode_message",
    "peer_key_from_hex",
    "sync_answer",
]

log = logging.getLogger("lbagent.peer")

MAGIC = b"LBP1"
_HEADER = struct.Struct("!4sBQ8sIB")
_TAG_LEN = 32
_DOMAIN = b"lbagent-peer-v1\x00"
MAX_DATAGRAM = 60_000
REPLICATE_BATCH = 200  # records per REPLICATE/RECORDS datagram in the JSON list form ("r")
# Records per datagram in the packed form ("rb"): 1,500 x 23 bytes, base64, is 46 KB.
PACKED_BATCH = 1500
PACKED_BATCH6 = 700  # the wide (IPv6) rows: 700 x 47 bytes, base64, is 44 KB
# One record in the packed form: listener, saddr, daddr, proto, sport, dport, bucket, backend
# (an index into the message's list of backend names).
RECORD_DTYPE = np.dtype([("l", ">u4"), ("s", ">u4"), ("d", ">u4"), ("p", "u1"), ("sp", ">u2"),
                         ("dp", ">u2"), ("b", ">u4"), ("be", ">u2")])
# The same with 128-bit addresses (two big-endian 64-bit halves), for batches holding an IPv6 flow
# ("rb6" in the payload, 47 bytes a row). A flow key's addresses are plain integers whatever the
# family (an IPv6 listener's daddr, its VIP, is never below 2**32: see `address_int`).
RECORD6_DTYPE = np.dtype([("l", ">u4"), ("s", ">u8", (2,)), ("d", ">u8", (2,)), ("p", "u1"), ("sp", ">u2"),
                          ("dp", ">u2"), ("b", ">u4"), ("be", ">u2")])
_U64 = (1 << 64) - 1


def _wide(rows: np.ndarray) -> np.ndarray:
    """RECORD_DTYPE rows as RECORD6_DTYPE (a batch mixing IPv4 and IPv6 flows is wide)."""
    if rows.dtype == RECORD6_DTYPE:
        return rows
    out = np.zeros(len(rows), dtype=RECORD6_DTYPE)
    for col in ("l", "p", "sp", "dp", "b", "be"):
        out[col] = rows[col]
    out["s"][:, 1] = rows["s"]
    out["d"][:, 1] = rows["d"]
    return out


def _addresses(column: np.ndarray) -> list[int]:
    """A RECORD6_DTYPE address column as integers."""
    return [(hi << 64) | lo for hi, lo in column.tolist()]
_ROW_LAYOUTS = (RECORD_DTYPE, RECORD6_DTYPE)  # what a RecordBatch's rows may be (each has its wire key)


class MsgType(IntEnum):
    QUERY = 1
    ANSWER = 2
    RECORD = 3
    REPLICATE = 4
    ACK = 5
    RECORDS = 6  # many RECORDs in one datagram (new flows the kernel pinned), acknowledged with ACK
    # "I run pool view v: send me the records of buckets I now own" (pool membership changes and
    # a mux's start). Answered with ANSWER only after those records were sent and acknowledged.
    SYNC = 7


class DecodeError(ValueError):
    """Why a datagram was refused; `kind` names the counter it goes to."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Message:
    type: MsgType
    timestamp_ms: int
    nonce: bytes
    request_id: int
    sender: str
    payload: dict[str, Any]


def _keyed(key: bytes | hmac.HMAC) -> hmac.HMAC:
    """An HMAC already fed the key and domain; `.copy()` per message is cheaper than a new one."""
    if isinstance(key, hmac.HMAC):
        return key
    return hmac.new(key, _DOMAIN, hashlib.sha256)


def _tag(keyed: hmac.HMAC, body: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(body)
    return mac.digest()


def encode_message(key: bytes | hmac.HMAC, mtype: MsgType, sender: str, request_id: int,
                   payload: Mapping[str, Any], *, now: float, nonce: bytes | None = None) -> bytes:
    """A signed datagram. `key`: the cluster key (or a prepared HMAC from `_keyed`)."""
    sender_raw = sender.encode("utf-8")
    if not 0 < len(sender_raw) < 256:
        raise ValueError(f"sender name {sender!r} must be 1..255 bytes of UTF-8")
    body = _HEADER.pack(MAGIC, int(mtype), int(now * 1000), nonce or os.urandom(8),
                        request_id & 0xFFFFFFFF, len(sender_raw)) + sender_raw + json.dumps(
        payload, separators=(",", ":")).encode()
    if len(body) + _TAG_LEN > MAX_DATAGRAM:
        raise ValueError(f"message of {len(body)} bytes is too large for one datagram")
    return body + _tag(_keyed(key), body)


class ReplayGuard:
    """Refuses messages outside a timestamp window and nonces already seen inside it."""

    def __init__(self, window_s: float = 30.0, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._floor_s = 0.0  # messages older than this are refused (raised when the cache is full)

    def check(self, sender: str, nonce: bytes, timestamp_s: float, now: float) -> None:
        if abs(now - timestamp_s) > self.window_s:
            raise DecodeError("stale", f"timestamp {timestamp_s:.3f} is {now - timestamp_s:+.1f}s off")
        if timestamp_s < self._floor_s:
            raise DecodeError("stale", "older than the replay cache remembers")
        self._purge(now)
        key = (sender, nonce)
        if key in self._seen:
            raise DecodeError("replayed", f"nonce {nonce.hex()} from {sender!r} seen before")
        self._seen[key] = timestamp_s
        if len(self._seen) > self.max_entries:
            _, ts = self._seen.popitem(last=False)
            self._floor_s = max(self._floor_s, ts)

    def _purge(self, now: float) -> None:
        limit = now - 2 * self.window_s
        while self._seen:
            k, ts = next(iter(self._seen.items()))
            if ts >= limit:
                break
            del self._seen[k]


def decode_message(data: bytes, key: bytes | hmac.HMAC, *, now: float, known_senders: Callable[[str], bool],
                   replay: ReplayGuard) -> Message:
    """Parse and verify a datagram or raise DecodeError (kind: malformed, bad_mac, stale,
    replayed, unknown_sender)."""
    if len(data) < _HEADER.size + 1 + _TAG_LEN:
        raise DecodeError("malformed", f"{len(data)} bytes is too short")
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("malformed", f"{len(data)} bytes is too long")
    body, tag = data[:-_TAG_LEN], data[-_TAG_LEN:]
    magic, mtype, ts_ms, nonce, req_id, sender_len = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise DecodeError("malformed", "bad magic")
    if not hmac.compare_digest(tag, _tag(_keyed(key), body)):
        raise DecodeError("bad_mac", "HMAC does not verify")
    # Authenticated from here on; still validate, a peer may run a different version.
    try:
        mtype = MsgType(mtype)
    except ValueError as exc:
        raise DecodeError("malformed", f"unknown message type {mtype}") from exc
    start = _HEADER.size
    if sender_len == 0 or start + sender_len > len(body):
        raise DecodeError("malformed", "bad sender length")
    try:
        sender = body[start:start + sender_len].decode("utf-8")
        payload = json.loads(body[start + sender_len:])
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError("malformed", f"undecodable sender or payload: {exc}") from exc
    if not isinstance(payload, dict):
        raise DecodeError("malformed", "payload is not an object")
    if not known_senders(sender):
        raise DecodeError("unknown_sender", f"sender {sender!r} is not a cluster mux")
    replay.check(sender, nonce, ts_ms / 1000.0, now)
    return Message(mtype, ts_ms, nonce, req_id, sender, payload)


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    backend: str
    status: str  # found | stored | degraded | unknown
    answered_by: str


@dataclass(frozen=True, slots=True)
class ReplicatedRecord:
    listener_id: int
    flow: FlowKey
    bucket: int
    backend: str


@dataclass(frozen=True, eq=False)
class RecordBatch:
    """Many records as columns (a RECORD_DTYPE array) plus the backend names they index: what
    the kernel's new flows travel as, from the reporting mux to the owner and on to the backup.
    Building, sending and storing them costs no Python object per record until the record store
    needs its keys. Iterating yields ReplicatedRecords (for handlers that take one at a time)."""

    rows: np.ndarray  # RECORD_DTYPE
    backends: tuple[str, ...]

    def __post_init__(self) -> None:
        # The wire form is these rows' bytes: rows in another byte order (numpy 2's np.concatenate
        # makes structured arrays native-endian, for one) would reach the peer garbled, so they
        # are converted; any other layout is a bug of the caller.
        dtype = self.rows.dtype
        if dtype in _ROW_LAYOUTS:
            return
        layout = next((d for d in _ROW_LAYOUTS if d.newbyteorder("<") == dtype.newbyteorder("<")), None)
        if layout is None:
            raise TypeError(f"record rows must be RECORD_DTYPE, got {dtype}")
        object.__setattr__(self, "rows", self.rows.astype(layout))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ReplicatedRecord]:
        names = self.backends
        for lid, flow, bucket, be in zip(self.listener_ids(), self.flows(), self.rows["b"].tolist(),
                                         self.rows["be"].tolist(), strict=True):
            yield ReplicatedRecord(lid, flow, bucket, names[be])

    def listener_ids(self) -> list[int]:
        return self.rows["l"].tolist()

    def flows(self) -> list[FlowKey]:
        r = self.rows
        if r.dtype == RECORD6_DTYPE:
            return list(zip(_addresses(r["s"]), _addresses(r["d"]), r["p"].tolist(), r["sp"].tolist(),
                            r["dp"].tolist(), strict=True))
        return list(zip(r["s"].tolist(), r["d"].tolist(), r["p"].tolist(), r["sp"].tolist(),
                        r["dp"].tolist(), strict=True))

    def keys(self) -> list[tuple[int, FlowKey]]:
        """The records' RecordKeys (listener, flow), as the record store holds them."""
        return list(zip(self.listener_ids(), self.flows(), strict=True))

    def backend_names(self) -> list[str]:
        names = self.backends
        return [names[i] for i in self.rows["be"].tolist()]

    @property
    def per_datagram(self) -> int:
        """Rows one datagram carries (fewer of the wide IPv6 rows)."""
        return PACKED_BATCH6 if self.rows.dtype == RECORD6_DTYPE else PACKED_BATCH

    def take(self, index: np.ndarray) -> RecordBatch:
        """The records at `index` (a mask or positions)."""
        return RecordBatch(self.rows[index], self.backends)

    @staticmethod
    def build(listener_ids: np.ndarray | int, flows: np.ndarray, buckets: np.ndarray,
              backend_ids: np.ndarray, backends: Sequence[str]) -> RecordBatch:
        """From columns: `flows` is (n, 5) (saddr, daddr, proto, sport, dport), `backend_ids`
        index `backends`. IPv6 flows come as an object array of Python integers (they do not fit
        int64) and give RECORD6_DTYPE rows."""
        if flows.dtype == object:
            return RecordBatch._build6(listener_ids, flows, buckets, backend_ids, backends)
        rows = np.empty(len(buckets), dtype=RECORD_DTYPE)
        if len(rows):
            for col, values in (("l", listener_ids), ("b", buckets), ("be", backend_ids),
                                *zip(("s", "d", "p", "sp", "dp"), flows.T, strict=True)):
                # numpy would wrap an out-of-range value silently: refuse it instead.
                if np.min(values) < 0 or np.max(values) > np.iinfo(RECORD_DTYPE[col]).max:
                    raise DecodeError("malformed", f"record field {col} out of range")
        rows["l"] = listener_ids
        for i, col in enumerate(("s", "d", "p", "sp", "dp")):
            rows[col] = flows[:, i]
        rows["b"] = buckets
        rows["be"] = backend_ids
        return RecordBatch(rows, tuple(backends))

    @staticmethod
    def _build6(listener_ids: np.ndarray | int, flows: np.ndarray, buckets: np.ndarray,
                backend_ids: np.ndarray, backends: Sequence[str]) -> RecordBatch:
        rows = np.zeros(len(buckets), dtype=RECORD6_DTYPE)
        limits = {"s": (1 << 128) - 1, "d": (1 << 128) - 1, "p": 0xFF, "sp": 0xFFFF, "dp": 0xFFFF}
        for i, col in enumerate(("s", "d", "p", "sp", "dp")):
            values = [int(v) for v in flows[:, i]]
            if any(v < 0 or v > limits[col] for v in values):
                raise DecodeError("malformed", f"record field {col} out of range")
            if col in ("s", "d"):
                rows[col] = [(v >> 64, v & _U64) for v in values] or np.zeros((0, 2))
            else:
                rows[col] = values
        for col, values in (("l", listener_ids), ("b", buckets), ("be", backend_ids)):
            if len(rows) and (np.min(values) < 0 or np.max(values) > np.iinfo(RECORD6_DTYPE[col]).max):
                raise DecodeError("malformed", f"record field {col} out of range")
            rows[col] = values
        return RecordBatch(rows, tuple(backends))

    @staticmethod
    def of(records: Sequence[ReplicatedRecord] | RecordBatch) -> RecordBatch:
        if isinstance(records, RecordBatch):
            return records
        index: dict[str, int] = {}
        be = [index.setdefault(r.backend, len(index)) for r in records]
        wide = any(r.flow[0] > 0xFFFFFFFF or r.flow[1] > 0xFFFFFFFF for r in records)
        flows = (np.array([r.flow for r in records], dtype=object) if wide
                 else np.array([r.flow for r in records], dtype=np.int64)).reshape(-1, 5)
        return RecordBatch.build(np.array([r.listener_id for r in records], dtype=np.int64), flows,
                                 np.array([r.bucket for r in records], dtype=np.int64),
                                 np.array(be, dtype=np.int64), tuple(index))

    @staticmethod
    def concat(batches: Sequence[RecordBatch]) -> RecordBatch:
        """One batch of several (their backend names merged)."""
        if len(batches) == 1:
            return batches[0]
        index: dict[str, int] = {}
        parts = []
        wide = any(b.rows.dtype == RECORD6_DTYPE for b in batches)
        for b in batches:
            remap = np.array([index.setdefault(n, len(index)) for n in b.backends] or [0], dtype=np.int64)
            rows = _wide(b.rows) if wide else b.rows.copy()
            if rows is b.rows:
                rows = rows.copy()
            rows["be"] = remap[rows["be"]]
            parts.append(rows)
        dtype = RECORD6_DTYPE if wide else RECORD_DTYPE
        # dtype=: numpy 2 concatenates structured arrays into native byte order otherwise, and the
        # rows go on the wire as they are.
        rows = np.concatenate(parts, dtype=dtype) if parts else np.empty(0, dtype=RECORD_DTYPE)
        return RecordBatch(rows, tuple(index))

    def encode(self) -> dict[str, Any]:
        """The packed payload: {"n": backend names, "rb": base64 of the rows} ("rb6" when the
        rows are RECORD6_DTYPE: the batch holds an IPv6 flow)."""
        key = "rb6" if self.rows.dtype == RECORD6_DTYPE else "rb"
        return {"n": list(self.backends), key: base64.b64encode(self.rows.tobytes()).decode("ascii")}

    @staticmethod
    def decode(p: Mapping[str, Any]) -> RecordBatch:
        dtype = RECORD6_DTYPE if "rb6" in p else RECORD_DTYPE
        names, raw = p.get("n"), p.get("rb6" if "rb6" in p else "rb")
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                and isinstance(raw, str)):
            raise DecodeError("malformed", "bad packed record batch")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("malformed", f"bad packed records: {exc}") from exc
        if len(data) % dtype.itemsize or len(data) // dtype.itemsize > PACKED_BATCH:
            raise DecodeError("malformed", f"{len(data)} bytes of packed records")
        rows = np.frombuffer(data, dtype=dtype)
        if len(rows) and int(rows["be"].max()) >= len(names):
            raise DecodeError("malformed", "backend index outside the names")
        return RecordBatch(rows, tuple(names))


class PeerHandler(Protocol):
    """What the mux does with authenticated requests (implemented by drivers)."""

    def on_query(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                 hint: str) -> tuple[str, str]: ...

    def on_record(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                  backend: str) -> tuple[str, str]: ...

    def on_replicate(self, sender: str, records: RecordBatch) -> str | None:
        """Store copies; a status other than None/"ok" (e.g. "not_ready") goes back in the ACK."""
        ...

    def on_sync(self, sender: str, view: str, fresh: bool) -> tuple[str, RecordBatch | None]:
        """A member at pool view `view` asks for its records: ("ok", what to send it), or
        ("other_view", None) while this mux runs another member set."""
        ...

    def on_records(self, sender: str, records: RecordBatch) -> None:
        """New flows `sender` pinned, for this mux as their owner (first writer wins)."""
        ...


@dataclass
class PeerCounters:
    sent: int = 0
    received: int = 0
    malformed: int = 0
    bad_mac: int = 0
    stale: int = 0
    replayed: int = 0
    unknown_sender: int = 0
    unexpected: int = 0  # answers to nothing we asked (or from the wrong peer)
    handler_errors: int = 0
    timeouts: int = 0
    backup_retries: int = 0
    answered: int = 0
    # Owner queries this mux answered, by (role it was asked in, where the answer came from):
    # role "backup" when the asker had asked the flow's primary owner first and got no answer
    # (the primary is gone or mute); source "record" when a record held here answered, "table"
    # when none did (the oldest table's backend, now recorded, or the hint when degraded).
    answered_primary_record: int = 0
    answered_primary_table: int = 0
    answered_backup_record: int = 0
    answered_backup_table: int = 0
    handed_over: int = 0  # records sent to a member that now owns them (pool membership change)
    handover_retries: int = 0  # hand-over rounds sent again (a datagram lost, a receiver not ready)

    def owner_answers(self, role: str, source: str) -> int:
        """Owner queries answered as `role` (primary, backup) from `source` (record, table)."""
        return getattr(self, f"answered_{role}_{source}")

    def dropped(self) -> int:
        return (self.malformed + self.bad_mac + self.stale + self.replayed + self.unknown_sender
                + self.unexpected + self.handler_errors)


def _flow(v: Any) -> FlowKey:
    if not (isinstance(v, list) and len(v) == 5 and all(isinstance(x, int) and x >= 0 for x in v)):
        raise DecodeError("malformed", f"bad flow {v!r}")
    return (v[0], v[1], v[2], v[3], v[4])


def _int(p: Mapping[str, Any], k: str) -> int:
    v = p.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DecodeError("malformed", f"field {k!r} must be a non-negative integer, got {v!r}")
    return v


def _str(p: Mapping[str, Any], k: str) -> str:
    v = p.get(k)
    if not isinstance(v, str) or not v:
        raise DecodeError("malformed", f"field {k!r} must be a non-empty string, got {v!r}")
    return v


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, node: PeerNode) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: the timeout handles it
        log.debug("peer socket error: %s", exc)


@dataclass
class _Pending:
    future: asyncio.Future[Message]
    peer: str


@dataclass
class PeerNode:
    """One mux's end of the peer protocol on asyncio UDP."""

    name: str
    key: bytes
    handler: PeerHandler
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)
    timeout_s: float = 0.25
    window_s: float = 30.0
    recv_buffer_bytes: int = 4 << 20  # bursts of queries during a transition (capped by rmem_max)
    clock: Callable[[], float] = time.time
    counters: PeerCounters = field(default_factory=PeerCounters)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("peer key must be at least 16 bytes")
        self._replay = ReplayGuard(self.window_s)
        self._keyed = _keyed(self.key)
        self._pending: dict[int, _Pending] = {}
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._transport: asyncio.DatagramTransport | None = None
        self._sync_tasks: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=(host, port))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.recv_buffer_bytes)
        self._transport = transport
        return transport.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for p in self._pending.values():
            if not p.future.done():
                p.future.cancel()
        self._pending.clear()

    @property
    def address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError(f"peer {self.name} is not started")
        return self._transport.get_extra_info("sockname")[:2]

    # --- client side -------------------------------------------------------------------

    async def query(self, owner: str, backup: str | None, listener_id: int, flow: FlowKey, bucket: int,
                    hint: str) -> PeerAnswer | None:
        """Ask the owner (then the backup) for a flow's backend; None if neither answered."""
        payload = {"l": listener_id, "f": list(flow), "b": bucket, "h": hint}
        return await self._ask_owners(MsgType.QUERY, owner, backup, payload)

    async def record(self, owner: str, backup: str | None, listener_id: int, flow: FlowKey, bucket: int,
                     backend: str) -> PeerAnswer | None:
        """Have the owner record a new flow; the answer carries the winning backend."""
        payload = {"l": listener_id, "f": list(flow), "b": bucket, "be": backend}
        return await self._ask_owners(MsgType.RECORD, owner, backup, payload)

    async def replicate(self, to: str, records: Sequence[ReplicatedRecord] | RecordBatch) -> bool:
        """Send records to a mux (backup copy or hand-over), packed, PACKED_BATCH per datagram,
        the datagrams in parallel; True when every one was acked."""
        batch = RecordBatch.of(records)
        replies = await asyncio.gather(*(
            self._request(to, MsgType.REPLICATE, batch.take(slice(i, i + batch.per_datagram)).encode())
            for i in range(0, len(batch), batch.per_datagram)))
        return all(r is not None and r.payload.get("s", "ok") == "ok" for r in replies)

    async def hand_over(self, to: str, records: RecordBatch, *, attempts: int = 5) -> bool:
        """Records `to` now owns, sent until every datagram is acknowledged "ok" (a lost datagram,
        a receiver not ready yet) or `attempts` rounds fail; receivers keep the first copy, so a
        round sent twice is harmless. True when delivered."""
        for attempt in range(attempts):
            if not len(records) or await self.replicate(to, records):
                return True
            self.counters.handover_retries += 1
            await asyncio.sleep(min(2.0, self.timeout_s * 2 ** attempt))
        return False

    async def sync(self, to: str, view: str, *, fresh: bool, timeout_s: float = 30.0) -> str | None:
        """Ask member `to` for the records this mux owns at pool view `view` (all of them when
        `fresh`); its answer's status once it has delivered them ("ok", "other_view", ...), or
        None if it did not answer within `timeout_s`."""
        reply = await self._request(to, MsgType.SYNC, {"v": view, "fresh": fresh}, timeout_s=timeout_s)
        if reply is None:
            return None
        status = reply.payload.get("s")
        return status if isinstance(status, str) else None

    async def record_batch(self, owner: str, backup: str | None,
                           records: Sequence[ReplicatedRecord] | RecordBatch) -> bool:
        """Have the owner record many new flows (RECORDS, packed, PACKED_BATCH per datagram, the
        datagrams in parallel); a datagram the owner does not acknowledge goes to the backup.
        True when every one was acked."""
        batch = RecordBatch.of(records)
        targets = [owner] + ([backup] if backup and backup != owner else [])

        async def one(payload: dict[str, Any]) -> bool:
            for n, target in enumerate(targets):
                if n:
                    self.counters.backup_retries += 1
                if target == self.name:
                    self._handle_request(MsgType.RECORDS, self.name, payload)
                    return True
                if await self._request(target, MsgType.RECORDS, payload) is not None:
                    return True
            return False

        step = batch.per_datagram
        results = await asyncio.gather(*(one(batch.take(slice(i, i + step)).encode())
                                         for i in range(0, len(batch), step)))
        return all(results)

    async def _ask_owners(self, mtype: MsgType, owner: str, backup: str | None,
                          payload: dict[str, Any]) -> PeerAnswer | None:
        targets = [owner] + ([backup] if backup and backup != owner else [])
        for n, target in enumerate(targets):
            if n:
                self.counters.backup_retries += 1
                # The backup learns it answers in the primary's place (its metric counts that).
                payload = {**payload, "as": "backup"}
            if target == self.name:
                backend, status = self._handle_request(mtype, self.name, payload)
                return PeerAnswer(backend, status, self.name)
            reply = await self._request(target, mtype, payload)
            if reply is not None:
                try:
                    return PeerAnswer(_str(reply.payload, "be"), _str(reply.payload, "s"), target)
                except DecodeError:
                    self.counters.malformed += 1
        return None

    async def _request(self, target: str, mtype: MsgType, payload: dict[str, Any], *,
                       timeout_s: float | None = None) -> Message | None:
        addr = self.peers.get(target)
        if addr is None or self._transport is None:
            self.counters.timeouts += 1
            return None
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        rid = self._next_id
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[rid] = _Pending(fut, target)
        # call_later instead of wait_for: no extra task per request
        timer = loop.call_later(timeout_s or self.timeout_s,
                                lambda: fut.done() or fut.set_exception(TimeoutError()))
        try:
            self._send(addr, mtype, rid, payload)
            return await fut
        except TimeoutError:
            self.counters.timeouts += 1
            return None
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    def _send(self, addr: tuple[str, int], mtype: MsgType, rid: int, payload: Mapping[str, Any]) -> None:
        assert self._transport is not None
        datagram = encode_message(self._keyed, mtype, self.name, rid, payload, now=self.clock())
        self._transport.sendto(datagram, addr)
        self.counters.sent += 1

    # --- server side -------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters.received += 1
        try:
            msg = decode_message(data, self._keyed, now=self.clock(), known_senders=self.peers.__contains__,
                                 replay=self._replay)
        except DecodeError as exc:
            setattr(self.counters, exc.kind, getattr(self.counters, exc.kind) + 1)
            log.debug("dropped datagram from %s: %s", addr, exc)
            return
        except Exception:  # a bug in parsing must not kill the agent: count and log it
            self.counters.malformed += 1
            log.exception("dropped datagram from %s: unexpected decode failure", addr)
            return
        if msg.type in (MsgType.ANSWER, MsgType.ACK):
            pending = self._pending.get(msg.request_id)
            if pending is None or pending.peer != msg.sender or pending.future.done():
                self.counters.unexpected += 1
                return
            pending.future.set_result(msg)
            return
        if msg.type == MsgType.SYNC:
            # answered once its records are delivered: not on the receive path
            task = asyncio.ensure_future(self._answer_sync(msg))
            self._sync_tasks.add(task)  # a reference, or the loop may collect it mid-way
            task.add_done_callback(self._sync_tasks.discard)
            return
        try:
            backend, status = self._handle_request(msg.type, msg.sender, msg.payload)
        except DecodeError as exc:
            setattr(self.counters, exc.kind, getattr(self.counters, exc.kind) + 1)
            return
        except Exception:  # the handler is the mux's code: count, log, keep serving
            self.counters.handler_errors += 1
            log.exception("peer handler failed on %s from %s", msg.type.name, msg.sender)
            return
        reply_type = MsgType.ACK if msg.type in (MsgType.REPLICATE, MsgType.RECORDS) else MsgType.ANSWER
        reply_to = self.peers.get(msg.sender, addr)
        self._send(reply_to, reply_type, msg.request_id, {"be": backend, "s": status})
        self.counters.answered += 1

    async def _answer_sync(self, msg: Message) -> None:
        try:
            view, fresh = _str(msg.payload, "v"), msg.payload.get("fresh") is True
            on_sync = getattr(self.handler, "on_sync", None)
            status, records = on_sync(msg.sender, view, fresh) if on_sync else ("unsupported", None)
            sent = 0
            if status == "ok" and records is not None and len(records):
                if await self.hand_over(msg.sender, records):
                    sent = len(records)
                    self.counters.handed_over += sent
                else:
                    status = "undelivered"
        except DecodeError as exc:
            setattr(self.counters, exc.kind, getattr(self.counters, exc.kind) + 1)
            return
        except Exception:  # the handler is the mux's code: count, log, keep serving
            self.counters.handler_errors += 1
            log.exception("peer handler failed on SYNC from %s", msg.sender)
            return
        addr = self.peers.get(msg.sender)
        if addr is not None and self._transport is not None:
            self._send(addr, MsgType.ANSWER, msg.request_id, {"be": "-", "s": status, "n": sent})
            self.counters.answered += 1

    def _handle_request(self, mtype: MsgType, sender: str, p: Mapping[str, Any]) -> tuple[str, str]:
        if mtype == MsgType.QUERY:
            answer = self.handler.on_query(sender, _int(p, "l"), _flow(p.get("f")), _int(p, "b"),
                                           _str(p, "h"))
            counter = (f"answered_{'backup' if p.get('as') == 'backup' else 'primary'}_"
                       f"{'record' if answer[1] == 'found' else 'table'}")
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            return answer
        if mtype == MsgType.RECORD:
            return self.handler.on_record(sender, _int(p, "l"), _flow(p.get("f")), _int(p, "b"),
                                          _str(p, "be"))
        if mtype in (MsgType.REPLICATE, MsgType.RECORDS):
            batch = (RecordBatch.decode(p) if "rb" in p or "rb6" in p
                     else RecordBatch.of(self._record_list(p)))
            if mtype == MsgType.RECORDS:
                self.handler.on_records(sender, batch)
                return "-", "ok"
            return "-", self.handler.on_replicate(sender, batch) or "ok"
        raise DecodeError("malformed", f"{mtype.name} is not a request")

    @staticmethod
    def _record_list(p: Mapping[str, Any]) -> list[ReplicatedRecord]:
        """The JSON list form of REPLICATE/RECORDS ("r"), as muxes of the previous version send."""
        raw = p.get("r")
        if not isinstance(raw, list) or len(raw) > REPLICATE_BATCH:
            raise DecodeError("malformed", "bad replicate list")
        recs = []
        for item in raw:
            if not (isinstance(item, list) and len(item) == 4):
                raise DecodeError("malformed", f"bad replicated record {item!r}")
            lid, flow, bucket, backend = item
            recs.append(ReplicatedRecord(_int({"l": lid}, "l"), _flow(flow), _int({"b": bucket}, "b"),
                                         _str({"be": backend}, "be")))
        return recs


def peer_key_from_hex(value: str) -> bytes:
    """The cluster's peer key from its hex form in the desired state."""
    try:
        key = bytes.fromhex(value)
    except ValueError as exc:
        raise ValueError("peer_key: not a hex string") from exc
    if len(key) < 16:
        raise ValueError(f"peer_key: {len(key)} bytes is too short (need at least 16)")
    return key



def sync_answer(held: Sequence[tuple[RecordKey, FlowRecord]], ownership: Ownership | None,
                previous: Ownership | None, sender: str, view: str,
                fresh: bool) -> tuple[str, RecordBatch | None]:
    """The answer to a SYNC from `sender` at pool view `view` over the records `held` here:
    ("other_view", None) unless this mux runs that view too, else ("ok", the records of the
    buckets moved to `sender` since `previous`, or all it owns when it starts `fresh`)."""
    if ownership is None or pool_view(ownership.muxes) != view:
        return "other_view", None
    by_key = dict(held)
    keys = records_for_member([(k, r.bucket) for k, r in held], previous, ownership, sender, fresh=fresh)
    if not keys:
        return "ok", None
    return "ok", RecordBatch.of([ReplicatedRecord(k[0], k[1], by_key[k].bucket, by_key[k].backend)
                                 for k in keys])


class FlowOwner:
    """The owner's side of the protocol over the core: a `PeerHandler` any driver can use.

    Answers queries with `owner_answer` (its record, else record the oldest table's backend),
    takes records first-writer-wins, stores replicas, queues every new record for the other owner
    of its bucket (`flush` sends the queue) and hands records over when the live mux set changes.
    """

    def __init__(self, name: str, store: RecordStore, tables: Callable[[int], ListenerTables | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.store = store
        self.tables = tables
        self.clock = clock
        self.ownership: Ownership | None = None
        self.previous_ownership: Ownership | None = None  # before the last membership change
        self._outbox: dict[str, list[ReplicatedRecord]] = {}

    def on_query(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                 hint: str) -> tuple[str, str]:
        res = owner_answer(self.store, self.tables(listener_id), (listener_id, flow), bucket, hint,
                           self.clock())
        if res.stored:
            self._queue(listener_id, flow, bucket, res.backend)
        return res.backend, "found" if res.found else ("stored" if res.stored else "degraded")

    def on_record(self, sender: str, listener_id: int, flow: FlowKey, bucket: int,
                  backend: str) -> tuple[str, str]:
        winner, stored = self.store.put_first((listener_id, flow), backend, bucket, self.clock())
        if stored:
            self._queue(listener_id, flow, bucket, winner)
            return winner, "stored"
        return winner, "found" if self.store.peek((listener_id, flow)) is not None else "degraded"

    def on_replicate(self, sender: str, records: Iterable[ReplicatedRecord]) -> None:
        now = self.clock()
        for r in records:
            replica = self.ownership is None or self.ownership.owners(r.bucket)[0] != self.name
            self.store.put_first((r.listener_id, r.flow), r.backend, r.bucket, now, replica=replica)

    def on_records(self, sender: str, records: Iterable[ReplicatedRecord]) -> None:
        for r in records:
            self.on_record(sender, r.listener_id, r.flow, r.bucket, r.backend)

    def on_sync(self, sender: str, view: str, fresh: bool) -> tuple[str, RecordBatch | None]:
        return sync_answer(list(self.store), self.ownership, self.previous_ownership, sender, view, fresh)

    def record_local(self, listener_id: int, flow: FlowKey, bucket: int, backend: str) -> str:
        """This mux is the owner of a new record: store it (first writer wins), queue its copy."""
        backend_won, _status = self.on_record(self.name, listener_id, flow, bucket, backend)
        return backend_won

    def _queue(self, listener_id: int, flow: FlowKey, bucket: int, backend: str) -> None:
        if self.ownership is None:
            return
        other = self.ownership.replica_peer(bucket, self.name)
        if other is not None:
            self._outbox.setdefault(other, []).append(ReplicatedRecord(listener_id, flow, bucket, backend))

    def take_outbox(self) -> dict[str, list[ReplicatedRecord]]:
        out, self._outbox = self._outbox, {}
        return out

    async def flush(self, node: PeerNode) -> bool:
        """Send queued copies to the other owners; True when every batch was acknowledged."""
        pending = self.take_outbox()
        results = await asyncio.gather(*(node.replicate(to, recs) for to, recs in pending.items()))
        return all(results)

    def hand_over(self, new: Ownership) -> dict[str, list[ReplicatedRecord]]:
        """Switch to a new live-mux ownership; return the records other muxes must now hold.

        Make before break: deliver these (`PeerNode.replicate`) before the router sends traffic
        to a new mux. Records this mux no longer owns or backs up are dropped here.
        """
        self.previous_ownership, self.ownership = self.ownership, new
        held = dict(iter(self.store))
        send, drop = hand_over_plan(((key, rec.bucket) for key, rec in held.items()), new, self.name)
        for rec in held.values():
            rec.replica = new.owners(rec.bucket)[0] != self.name
        if drop:
            gone = set(drop)
            self.store.drop_where(lambda k, _r: k in gone)
        return {to: [ReplicatedRecord(k[0], k[1], held[k].bucket, held[k].backend) for k in keys]
                for to, keys in send.items()}
