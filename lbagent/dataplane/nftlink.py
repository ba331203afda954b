"""nf_tables changes written as raw netlink messages: set elements, named counters and the
deletion of a listener's objects, in one batch (one kernel transaction: all or nothing).

Why not libnftables for these: libnftables 1.0.6 fetches every chain, set and object of the
ruleset before a transaction (its cache, made stale by each of our own commits), so a change
made through it costs about 0.1-0.45 ms per listener on the mux. These messages name their table
and object, so the kernel needs nothing else: a change costs what changed. Rules are still
written by libnftables (`nft.py`): encoding nft expressions by hand would be a second compiler.

A change is a list of `Op`s. Each renders as libnftables text too (`Op.text`), for drivers
that send everything through libnftables (tests, the `nft` binary fallback): one rendering of
what changes, two ways to send it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_NETDEV = 5
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000

_BATCH_BEGIN, _BATCH_END = 0x10, 0x11
_MSG_DELCHAIN, _MSG_DELRULE, _MSG_DELSET = 5, 8, 11
_MSG_NEWSETELEM, _MSG_DELSETELEM = 12, 14
_MSG_NEWOBJ, _MSG_DELOBJ = 18, 20
_CHAIN_TABLE, _CHAIN_NAME = 1, 3
_RULE_TABLE, _RULE_CHAIN = 1, 2
_SET_TABLE, _SET_NAME = 1, 2
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS = 1, 2, 3
_LIST_ELEM = 1
_ELEM_KEY, _ELEM_DATA, _ELEM_OBJREF = 1, 2, 9
_DATA_VALUE, _DATA_VERDICT = 1, 2
_VERDICT_CODE, _VERDICT_CHAIN = 1, 2
_NF_DROP, _NFT_JUMP = 0, -3
_OBJ_TABLE, _OBJ_NAME, _OBJ_TYPE, _OBJ_DATA = 1, 2, 3, 4
_OBJECT_COUNTER = 1
_COUNTER_BYTES, _COUNTER_PACKETS = 1, 2
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
# A nested attribute's length is 16 bits: 2,000 elements of at most 32 bytes stay under 64 KiB.
ELEMENTS_PER_MESSAGE = 2000
# Longer encodings (a dispatch element with an IPv6 key and a verdict is about 70 bytes) are cut
# by size: the elements of one message stay under this many bytes.
MESSAGE_ELEMENT_BYTES = 60_000
_NO_BACKEND = -1


class NetlinkError(RuntimeError):
    """nf_tables refused a batch (or the socket failed); names the message it refused."""


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _string(kind: int, text: str) -> bytes:
    return nla(kind, text.encode() + b"\0")


def mac_to_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def int_to_mac(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


# ---------------------------------------------------------------------------------------------
# Element encodings. Mark keys are in host byte order (as `meta mark` loads them); MACs and
# addresses in network order, each concatenated field padded to 4 bytes.

_scratch = threading.local()


def _rows_buffer(n: int, width: int) -> np.ndarray:
    """An (n, width) uint8 work area kept per thread: a fresh 200 KB array per listener costs
    its page faults again every time (about 1 ms here), which dominated a large load."""
    buf = getattr(_scratch, "rows", None)
    if buf is None or buf.size < n * 32:
        buf = np.empty(max(n * 32, 1 << 18), dtype=np.uint8)
        _scratch.rows = buf
    return buf[:n * width].reshape(n, width)


def _mark_rows(keys: np.ndarray, with_mac: np.ndarray | None) -> bytes:
    """n NFTA_LIST_ELEMs of 16 or 32 bytes (one per key) built at once: a full listener's 6,421
    buckets in tens of microseconds, not a struct.pack each."""
    n = len(keys)
    width = 16 if with_mac is None else 32
    head = struct.pack("=HHHHHH", width, _LIST_ELEM | NLA_F_NESTED, 12, _ELEM_KEY | NLA_F_NESTED,
                       8, _DATA_VALUE)
    rows = _rows_buffer(n, width)
    rows[:, :12] = np.frombuffer(head, dtype=np.uint8)
    rows[:, 12:16] = np.ascontiguousarray(keys, dtype=np.uint32).view(np.uint8).reshape(n, 4)
    if with_mac is not None:
        rows[:, 16:24] = np.frombuffer(struct.pack("=HHHH", 16, _ELEM_DATA | NLA_F_NESTED, 10, _DATA_VALUE),
                                       dtype=np.uint8)
        macs = np.ascontiguousarray(with_mac, dtype=">u8").view(np.uint8).reshape(n, 8)
        rows[:, 24:30] = macs[:, 2:]
        rows[:, 30:32] = 0
    return rows.tobytes()


def _mac_key(mac: str) -> bytes:
    return nla(_ELEM_KEY | NLA_F_NESTED, nla(_DATA_VALUE, bytes.fromhex(mac.replace(":", ""))))


def _slot_mac_key(key: tuple[int, str]) -> bytes:
    """mark . ether_addr: the mark in host order (as `meta mark` loads it), the MAC padded to 8
    bytes: 12 bytes."""
    mark, mac = key
    raw = struct.pack("=I", int(mark)) + bytes.fromhex(mac.replace(":", "")) + b"\0\0"
    return nla(_ELEM_KEY | NLA_F_NESTED, nla(_DATA_VALUE, raw))


def _dispatch_key(key: tuple[str, str, int]) -> bytes:
    """VIP . protocol . port, each field padded to 4 bytes: 12 bytes for an IPv4 VIP (`dispatch`),
    24 for an IPv6 one (`dispatch6`)."""
    vip, protocol, port = key
    address = socket.inet_pton(socket.AF_INET6 if ":" in vip else socket.AF_INET, vip)
    raw = address + struct.pack("B3x", PROTOCOL_NUMBERS[protocol]) + struct.pack("!H2x", port)
    return nla(_ELEM_KEY | NLA_F_NESTED, nla(_DATA_VALUE, raw))


def _verdict(text: str) -> bytes:
    if text == "drop":
        verdict = nla(_VERDICT_CODE, struct.pack("!i", _NF_DROP))
    elif text.startswith("jump "):
        verdict = nla(_VERDICT_CODE, struct.pack("!i", _NFT_JUMP)) + _string(_VERDICT_CHAIN, text[5:])
    else:
        raise ValueError(f"verdict {text!r} is not one this writer knows")
    return nla(_ELEM_DATA | NLA_F_NESTED, nla(_DATA_VERDICT | NLA_F_NESTED, verdict))


def _list_elem(body: bytes) -> bytes:
    return nla(_LIST_ELEM | NLA_F_NESTED, body)


# ---------------------------------------------------------------------------------------------
# What a change is made of


@dataclass(frozen=True)
class Op:
    """One change to one object of the table.

    verb: "add" / "delete" (elements), "flush" (a set or map), "add counter" / "delete counter",
    "flush chain" (its rules), "delete chain", "delete set" (a set or map).
    key_type says what `keys` are: "mark" (marks, an int array: a listener's `slot << 17 |
    bucket`), "mac" (strings), "slotmac" ((mark, MAC string) tuples: a listener's `slot << 17`
    and a backend's MAC, the shared `pinok` and `cnt` keys), "dispatch" ((vip, protocol, port)
    tuples, an IPv4 or IPv6 VIP). value_type says what
    `values` are (one per key): "mac" (48-bit ints, an int array: a bucket's backend), "objref"
    (counter names), "verdict" (text such as "jump l7"); None for a set."""

    verb: str
    name: str
    keys: Sequence | np.ndarray = ()
    values: Sequence | np.ndarray | None = None
    key_type: str = "mark"
    value_type: str | None = None
    is_map: bool = False  # for "flush"/"delete set": a map, not a set (libnftables names the kind)

    def __len__(self) -> int:
        return len(self.keys)

    def text(self, family_table: str) -> str:
        """The same change in libnftables' language."""
        t = family_table
        if self.verb in ("add counter", "delete counter", "flush chain", "delete chain"):
            return f"{self.verb} {t} {self.name}"
        kind = "map" if self.is_map or self.value_type is not None else "set"
        if self.verb == "flush":
            return f"flush {kind} {t} {self.name}"
        if self.verb == "delete set":
            return f"delete {kind} {t} {self.name}"
        keys = [self._key_text(k) for k in self.keys]
        if not keys:
            return ""  # nothing to change (`{ }` is a syntax error): a blank line
        if self.verb == "add" and self.values is not None:
            items = ", ".join(f"{k} : {self._value_text(v)}" for k, v in zip(keys, self.values, strict=True))
        else:
            items = ", ".join(keys)
        return f"{self.verb} element {t} {self.name} {{ {items} }}"

    def _key_text(self, key) -> str:
        if self.key_type == "mark":
            return str(int(key))
        if self.key_type == "dispatch":
            vip, protocol, port = key
            return f"{vip} . {protocol} . {port}"
        if self.key_type == "slotmac":
            mark, mac = key
            return f"{int(mark)} . {mac}"
        return str(key)

    def _value_text(self, value) -> str:
        if self.value_type == "mac":
            return int_to_mac(int(value))
        if self.value_type == "objref":
            return f'"{value}"'
        return str(value)

    def messages(self, table: str) -> list[tuple[int, str, bytes, bool]]:
        """[(message type, what it changes, attributes, needs NLM_F_CREATE)]."""
        head = _string(_LIST_TABLE, table) + _string(_LIST_SET, self.name)
        if self.verb == "flush":
            return [(_MSG_DELSETELEM, f"flush of {self.name}", head, False)]
        if self.verb == "add counter":
            zero = nla(_COUNTER_PACKETS, bytes(8)) + nla(_COUNTER_BYTES, bytes(8))
            data = nla(_OBJ_DATA | NLA_F_NESTED, zero)
            return [(_MSG_NEWOBJ, f"counter {self.name}", _string(_OBJ_TABLE, table)
                     + _string(_OBJ_NAME, self.name) + nla(_OBJ_TYPE, struct.pack("!I", _OBJECT_COUNTER))
                     + data, True)]
        if self.verb == "delete counter":
            return [(_MSG_DELOBJ, f"deletion of counter {self.name}", _string(_OBJ_TABLE, table)
                     + _string(_OBJ_NAME, self.name) + nla(_OBJ_TYPE, struct.pack("!I", _OBJECT_COUNTER)),
                     False)]
        if self.verb == "flush chain":
            return [(_MSG_DELRULE, f"flush of chain {self.name}",
                     _string(_RULE_TABLE, table) + _string(_RULE_CHAIN, self.name), False)]
        if self.verb == "delete chain":
            return [(_MSG_DELCHAIN, f"deletion of chain {self.name}",
                     _string(_CHAIN_TABLE, table) + _string(_CHAIN_NAME, self.name), False)]
        if self.verb == "delete set":
            return [(_MSG_DELSET, f"deletion of {self.name}",
                     _string(_SET_TABLE, table) + _string(_SET_NAME, self.name), False)]
        add = self.verb == "add"
        kind = _MSG_NEWSETELEM if add else _MSG_DELSETELEM
        what = f"{'add' if add else 'delete'} elements of {self.name}"
        out = []
        for chunk in self._element_chunks(with_values=add):
            out.append((kind, what, head + nla(_LIST_ELEMENTS | NLA_F_NESTED, chunk), add))
        return out

    def _element_chunks(self, *, with_values: bool) -> list[bytes]:
        n = len(self.keys)
        if n == 0:
            return []
        if self.key_type == "mark" and (not with_values or self.value_type in (None, "mac")):
            rows = _mark_rows(np.asarray(self.keys), np.asarray(self.values)
                              if with_values and self.value_type == "mac" else None)
            step = ELEMENTS_PER_MESSAGE * len(rows) // n
            return [rows[i:i + step] for i in range(0, len(rows), step)]
        items = []
        for i, key in enumerate(self.keys):
            if self.key_type == "mark":
                body = nla(_ELEM_KEY | NLA_F_NESTED, nla(_DATA_VALUE, struct.pack("=I", int(key))))
            elif self.key_type == "mac":
                body = _mac_key(key)
            elif self.key_type == "slotmac":
                body = _slot_mac_key(key)
            elif self.key_type == "dispatch":
                body = _dispatch_key(key)
            else:
                raise ValueError(f"key type {self.key_type!r} is not one this writer knows")
            if with_values and self.values is not None:
                value = self.values[i]
                if self.value_type == "objref":
                    body += _string(_ELEM_OBJREF, value)
                elif self.value_type == "verdict":
                    body += _verdict(value)
                elif self.value_type == "mac":
                    body += nla(_ELEM_DATA | NLA_F_NESTED,
                                nla(_DATA_VALUE, int(value).to_bytes(6, "big")))
                else:
                    raise ValueError(f"value type {self.value_type!r} is not one this writer knows")
            items.append(_list_elem(body))
        chunks: list[bytes] = []
        start, size = 0, 0
        for i, item in enumerate(items):
            if i > start and (size + len(item) > MESSAGE_ELEMENT_BYTES or i - start >= ELEMENTS_PER_MESSAGE):
                chunks.append(b"".join(items[start:i]))
                start, size = i, 0
            size += len(item)
        chunks.append(b"".join(items[start:]))
        return chunks


@dataclass(frozen=True)
class FillOp:
    """All of a listener's `cur` elements (its `base` + bucket -> backend MAC; `base` is the
    listener's slot << 17), encoded only when sent: a whole-document load holds references to
    the plans' tables, not 100 KB of encoded or expanded arrays per listener waiting for their
    batch."""

    name: str
    backends: tuple[tuple[str, str], ...]
    table: np.ndarray
    base: int = 0

    def __len__(self) -> int:
        return len(self.table)

    def _op(self) -> Op:
        macs = mac_values(self.backends, self.table)
        buckets = np.flatnonzero(macs >= 0)
        return Op("add", self.name, buckets + self.base, macs[buckets], "mark", "mac")

    def text(self, family_table: str) -> str:
        return self._op().text(family_table)

    def messages(self, table: str) -> list[tuple[int, str, bytes, bool]]:
        return self._op().messages(table)


Change = Op | FillOp


def op_elements(ops: Sequence[Change]) -> int:
    return sum(len(op) for op in ops)


class NetlinkElements:
    """Sends a list of `Op`s as one nf_tables batch (one transaction) and waits for its answer.

    The socket is kept between batches: closing a socket after a batch that deleted elements
    waits for the kernel's deferred release of the transaction (an RCU grace period, 8-16 ms
    here), which one change among thousands of listeners paid every time. Sequence numbers
    keep growing across batches, so an answer left from an earlier batch is never taken for
    one of this batch's; after any failure the socket is dropped and the next batch opens one."""

    def __init__(self, family: int = NFPROTO_NETDEV) -> None:
        self.family = family
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()  # one batch at a time on the kept socket

    def _socket(self, payload_bytes: int) -> socket.socket:
        sock = self._sock
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (33): room for the error reports
                sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)
            # Generous: the kernel answers in milliseconds to seconds; this only keeps a lost
            # ack from hanging the daemon forever.
            sock.settimeout(120)
            self._sock = sock
        with contextlib.suppress(OSError):  # SO_SNDBUFFORCE (32): root may exceed wmem_max
            sock.setsockopt(socket.SOL_SOCKET, 32, max(1 << 20, 2 * payload_bytes))
        return sock

    def close(self) -> None:
        with self._lock:
            self.close_unlocked()

    def close_unlocked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._seq = 0

    def run(self, table: str, ops: Sequence[Change]) -> None:
        """All or nothing: a refused message (a missing element, a set in use) rolls back the
        whole batch and raises NetlinkError naming that message."""
        messages = [m for op in ops for m in op.messages(table)]
        if not messages:
            return
        with self._lock:
            self._run(messages)

    def _run(self, messages: list[tuple[int, str, bytes, bool]]) -> None:
        res = struct.pack("!H", NFNL_SUBSYS_NFTABLES)
        if self._seq > 1 << 30:
            self.close_unlocked()  # a fresh socket before the 32-bit sequence numbers wrap
        seq = first_seq = self._seq + 1
        batch_tail = struct.pack("=BB", 0, 0) + res
        parts = [struct.pack("=IHHII", 20, _BATCH_BEGIN, NLM_F_REQUEST, seq, 0) + batch_tail]
        names: dict[int, str] = {}
        for index, (kind, what, attrs, create) in enumerate(messages):
            seq += 1
            names[seq] = what
            # An ack only for the last message (an error is reported for any message anyway):
            # one ack per message overflowed the socket's receive buffer on a 65,537-bucket
            # transition, and errors come in message order.
            last = index == len(messages) - 1
            flags = NLM_F_REQUEST | (NLM_F_ACK if last else 0) | (NLM_F_CREATE if create else 0)
            body = struct.pack("=BBH", self.family, 0, 0) + attrs
            parts.append(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind,
                                     flags, seq, 0) + body)
        seq += 1
        parts.append(struct.pack("=IHHII", 20, _BATCH_END, NLM_F_REQUEST, seq, 0) + batch_tail)
        self._seq = seq
        payload = b"".join(parts)
        ok = False
        try:
            sock = self._socket(len(payload))
            sock.send(payload)
            pending = {seq - 1}  # the last message's ack ends the transaction's answer
            while pending:
                data = sock.recv(1 << 16)
                pos = 0
                while pos + 16 <= len(data):
                    length, kind, _flags, msg_seq, _pid = struct.unpack_from("=IHHII", data, pos)
                    if kind == NLMSG_ERROR and msg_seq >= first_seq:  # not an earlier batch's
                        (err,) = struct.unpack_from("=i", data, pos + 16)
                        if err != 0:
                            what = names.get(msg_seq, f"message {msg_seq}")
                            raise NetlinkError(f"nf_tables refused the transaction at {what}: "
                                               f"{os.strerror(-err)}")
                        pending.discard(msg_seq)
                    pos += (length + 3) & ~3
            ok = True
        except OSError as exc:
            raise NetlinkError(f"nf_tables batch: {exc}") from exc
        finally:
            if not ok and self._sock is not None:  # refused or failed: start the next one afresh
                self._sock.close()
                self._sock = None


def mac_values(backends: Sequence[tuple[str, str]], table: np.ndarray) -> np.ndarray:
    """Each bucket's backend MAC as a 48-bit int (-1: no backend)."""
    macs = np.array([mac_to_int(mac) for _, mac in backends] + [_NO_BACKEND], dtype=np.int64)
    return macs[table]  # index -1 picks the trailing "no backend"
