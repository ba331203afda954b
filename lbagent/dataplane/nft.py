"""Kernel data plane: renders listeners into one nftables netdev table on the mux's interface and
applies every change as one atomic transaction through libnftables.

Per listener `<id>` the table holds
  * `cur_<id>` (bucket -> `jump b<id>_<backend>`), `old_<id>` (during a transition the oldest
    live generation's table, same shape) and `unstable_<id>` (buckets where any live old table
    differs from the current one);
  * one chain `b<id>_<backend>` per backend: count, rewrite the MACs, `fwd` (L2 direct server
    return: the backend answers the client itself);
  * chain `l<id>`: per-flow pins first (a miss ends that rule and evaluation goes on), then the
    flow hash into the mark; packets of unstable buckets that are not a TCP SYN (syn set, ack
    clear) `accept`ed up to the stack (where iptables-nft hands them to NFQUEUE, the slow path);
    everything else, SYNs of unstable buckets included, through `cur_<id>`;
  * in each backend chain of a TCP listener, before the forwarding rule, decision rule 3's SYN
    case compiled like rule 2 is: a SYN of an unstable bucket is pinned here to this (the current
    table's) backend, its headers go to nfnetlink_log group `nflog_group` (the daemon records
    the flow at its owner from there, asynchronously) and it is counted in `newflows<id>`.
Pins live in one map per protocol for the whole table (`pins_tcp`, `pins_udp`: a 4-field key,
because nft 1.0.6 aborts on 5-field dynamic keys), value = the backend's MAC, with the
listener's idle timeout, which every packet of the flow renews in the kernel (`update`). A pin
forwards only to a MAC in the listener's `pinok_<id>` set (backends whose connections may
still live): at a drain deadline the ended backend's MAC leaves the set, so its flows fall
through to the current table (whose backend answers them with a reset) at their next packet.
The kernel adds them itself in chain `inject` (on the injection veth) from the packets the slow
path re-injects. Counters are read over netlink (`read_counters`): `nft list` would load every
map element first.

The steady state is stateless: no pins, empty unstable sets, no packet leaves the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lbagent.core.flowhash import ipv6_fingerprint_seeds

TABLE = "lbagent"
PROTOCOLS = {"tcp": 6, "udp": 17}
PIN_MAP_SIZE = 1 << 20
# Bytes of each new-flow SYN copied to nfnetlink_log: the IPv4 header and the TCP ports are all
# the owner's record needs (the bucket travels in the mark).
NFLOG_SNAPLEN = 40
# IPv6: the 40-byte fixed header and the ports right after it (a SYN with extension headers is
# still pinned and forwarded; its report is counted malformed and the flow gets no record).
NFLOG_SNAPLEN6 = 44
MAP_SIZE = 1 << 17  # room for a 65537-bucket table


class NftError(RuntimeError):
    """nft refused a transaction; carries nft's message and the start of what was sent."""


# ---------------------------------------------------------------------------------------------
# libnftables (ctypes), falling back to the `nft` binary

_OUTPUT_JSON = 1 << 4
_OUTPUT_TERSE = 1 << 11


class Nft:
    """One libnftables context in the calling process's network namespace."""

    def reset(self) -> None:
        """Free this context and make a new one, then hand the C heap's free pages back to the
        kernel: libnftables keeps its cache (every object of a large load) for the context's life."""
        if self._lib is None:
            return
        with self._lock:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = self._lib.nft_ctx_new(0)
            self._lib.nft_ctx_buffer_output(self._ctx)
            self._lib.nft_ctx_buffer_error(self._ctx)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed arenas (no-op elsewhere)

    def __init__(self) -> None:
        self._lib = None
        self._lock = threading.Lock()  # a context is not thread-safe (concurrent use segfaults)
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1")
        except OSError:
            return  # no library: use the nft binary
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, text: str, *, json_output: bool = False, terse: bool = False) -> str:
        """Run nft commands (one transaction) and return nft's output."""
        flags = (_OUTPUT_JSON if json_output else 0) | (_OUTPUT_TERSE if terse else 0)
        if self._lib is None:
            argv = ["nft", *(["-j"] if json_output else []), *(["-t"] if terse else []), "-f", "-"]
            proc = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise NftError(f"nft: {proc.stderr.strip()[:2000]} (input starts {text[:300]!r})")
            return proc.stdout
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(f"nft: {err.strip()[:2000]} (input starts {text[:300]!r})")
        return out


# ---------------------------------------------------------------------------------------------
# Counters straight from nf_tables over netlink (NFT_MSG_GETOBJ dump of one table's counters)

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETOBJ = 19
_NFPROTO_NETDEV = 5
_NFTA_OBJ_TABLE, _NFTA_OBJ_NAME, _NFTA_OBJ_TYPE, _NFTA_OBJ_DATA = 1, 2, 3, 4
_NFT_OBJECT_COUNTER = 1
_NFTA_COUNTER_BYTES, _NFTA_COUNTER_PACKETS = 1, 2
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLA_TYPE_MASK = 0x3FFF


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _parse_nlas(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        out[kind & _NLA_TYPE_MASK] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def read_counters(table: str, family: int = _NFPROTO_NETDEV) -> dict[str, tuple[int, int]]:
    """Named counters of one nftables table: name -> (packets, bytes)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        attrs = _nla(_NFTA_OBJ_TABLE, table.encode() + b"\0") + _nla(_NFTA_OBJ_TYPE,
                                                                     struct.pack("!I", _NFT_OBJECT_COUNTER))
        body = struct.pack("=BBH", family, 0, 0) + attrs
        msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETOBJ
        sock.send(struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        result: dict[str, tuple[int, int]] = {}
        while True:
            data = sock.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, pos)
                if kind == _NLMSG_DONE:
                    return result
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, pos + 16)
                    if err == 0:
                        return result
                    raise NftError(f"reading counters of table {table!r}: {os.strerror(-err)}")
                nlas = _parse_nlas(data[pos + 20:pos + length])  # after nlmsghdr + nfgenmsg
                name = nlas.get(_NFTA_OBJ_NAME, b"").rstrip(b"\0").decode()
                counter = _parse_nlas(nlas.get(_NFTA_OBJ_DATA, b""))
                packets = counter.get(_NFTA_COUNTER_PACKETS, bytes(8))
                nbytes = counter.get(_NFTA_COUNTER_BYTES, bytes(8))
                result[name] = (struct.unpack("!Q", packets)[0], struct.unpack("!Q", nbytes)[0])
                pos += (length + 3) & ~3
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# Element-only transactions written as nf_tables netlink messages (one batch = one transaction)

_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFT_MSG_NEWSETELEM, _NFT_MSG_DELSETELEM = 12, 14
_NLM_F_ACK, _NLM_F_CREATE = 0x4, 0x400
_NLA_F_NESTED = 0x8000
_NFTA_SET_ELEM_LIST_TABLE, _NFTA_SET_ELEM_LIST_SET, _NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
_NFTA_LIST_ELEM = 1
_NFTA_SET_ELEM_KEY, _NFTA_SET_ELEM_DATA = 1, 2
_NFTA_DATA_VALUE, _NFTA_DATA_VERDICT = 1, 2
_NFTA_VERDICT_CODE, _NFTA_VERDICT_CHAIN = 1, 2
_NF_DROP, _NFT_JUMP = 0, -3
_ELEMENTS_PER_MESSAGE = 400  # a nested attribute's length is 16 bits: keep each list under 64 KiB
_ELEMENT_LINE = re.compile(r"^(add|delete) element netdev (\S+) (\S+) \{ (.*) \}$")
_FLUSH_LINE = re.compile(r"^flush (?:map|set) netdev (\S+) (\S+)$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


def _element(key_text: str, data: bytes) -> bytes:
    """One NFTA_LIST_ELEM: the key (a MAC, or a mark in host byte order like `meta mark` loads
    it) and the already encoded data (b"" for a set)."""
    if _MAC_RE.match(key_text):
        key = _nla(_NFTA_SET_ELEM_KEY | _NLA_F_NESTED,
                   _nla(_NFTA_DATA_VALUE, bytes.fromhex(key_text.replace(":", ""))))
    else:
        # Fixed layout for a 4-byte key, packed at once: the hot path of a change.
        key = struct.pack("=HHHHI", 12, _NFTA_SET_ELEM_KEY | _NLA_F_NESTED, 8, _NFTA_DATA_VALUE,
                          int(key_text))
    return struct.pack("=HH", 4 + len(key) + len(data), _NFTA_LIST_ELEM | _NLA_F_NESTED) + key + data


@functools.lru_cache(maxsize=4096)
def _element_data(text: str) -> bytes:
    if text == "drop":
        verdict = _nla(_NFTA_VERDICT_CODE, struct.pack("!i", _NF_DROP))
    elif text.startswith("jump "):
        verdict = (_nla(_NFTA_VERDICT_CODE, struct.pack("!i", _NFT_JUMP))
                   + _nla(_NFTA_VERDICT_CHAIN, text[5:].encode() + b"\0"))
    else:
        raise ValueError(f"element value {text!r} is not a verdict this writer knows")
    return _nla(_NFTA_SET_ELEM_DATA | _NLA_F_NESTED, _nla(_NFTA_DATA_VERDICT | _NLA_F_NESTED, verdict))


class NetlinkElements:
    """Writes element-only transactions (add/delete elements, flush a set) straight to nf_tables.

    Why: libnftables 1.0.6 fetches every set of the ruleset before any element command (its
    cache, refreshed after each of our commits), so a one-bucket change through it costs about
    0.1 ms per listener on the mux. These messages name their table and set, so the kernel needs
    nothing else: the cost is what changed. The same text the driver renders for libnftables is
    translated line by line; anything else is refused (`parse` returns None) and goes through
    libnftables."""

    @staticmethod
    def parse(text: str) -> list[tuple[int, str, str, list[bytes]]] | None:
        """[(message type, table, set, [encoded element])] or None if a line is not element-only."""
        ops: list[tuple[int, str, str, list[bytes]]] = []
        for line in text.splitlines():
            if not line:
                continue
            m = _FLUSH_LINE.match(line)
            if m:
                ops.append((_NFT_MSG_DELSETELEM, m.group(1), m.group(2), []))
                continue
            m = _ELEMENT_LINE.match(line)
            if m is None:
                return None
            items = []
            try:
                for item in m.group(4).split(", "):
                    key, _, value = item.partition(" : ")
                    items.append(_element(key, _element_data(value) if value else b""))
            except ValueError:
                return None
            kind = _NFT_MSG_NEWSETELEM if m.group(1) == "add" else _NFT_MSG_DELSETELEM
            for start in range(0, len(items), _ELEMENTS_PER_MESSAGE):
                ops.append((kind, m.group(2), m.group(3), items[start:start + _ELEMENTS_PER_MESSAGE]))
        return ops

    def run(self, ops: list[tuple[int, str, str, list[bytes]]]) -> None:
        """Send one batch (one nf_tables transaction: all or nothing) and wait for every ack."""
        res = struct.pack("!H", _NFNL_SUBSYS_NFTABLES)
        seq = 1
        parts = [struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, seq, 0)
                 + struct.pack("=BB", 0, 0) + res]
        names: dict[int, str] = {}
        for kind, table, set_name, items in ops:
            seq += 1
            names[seq] = f"{'add' if kind == _NFT_MSG_NEWSETELEM else 'delete'} elements of {set_name}"
            attrs = _nla(_NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            attrs += _nla(_NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
            if items:
                attrs += _nla(_NFTA_SET_ELEM_LIST_ELEMENTS | _NLA_F_NESTED, b"".join(items))
            # An ack only for the last message (an error is reported for any message anyway):
            # one ack per message overflowed the socket's receive buffer on a 65,537-bucket
            # transition (hundreds of messages), and the errors come in message order.
            last = seq == len(ops) + 1
            flags = (_NLM_F_REQUEST | (_NLM_F_ACK if last else 0)
                     | (_NLM_F_CREATE if kind == _NFT_MSG_NEWSETELEM else 0))
            body = struct.pack("=BBH", _NFPROTO_NETDEV, 0, 0) + attrs
            parts.append(struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_NFTABLES << 8) | kind,
                                     flags, seq, 0) + body)
        seq += 1
        parts.append(struct.pack("=IHHII", 20, _NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq, 0)
                     + struct.pack("=BB", 0, 0) + res)
        payload = b"".join(parts)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            with contextlib.suppress(OSError):  # SO_SNDBUFFORCE (32): root may exceed wmem_max
                sock.setsockopt(socket.SOL_SOCKET, 32, max(1 << 20, 2 * len(payload)))
            # Generous: the kernel answers in milliseconds; this only keeps a lost ack from
            # hanging the daemon forever.
            sock.settimeout(60)
            sock.send(payload)
            with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (33): room for the error reports
                sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 20)
            pending = {seq - 1}  # the last element message's ack ends the transaction's answer
            while pending:
                data = sock.recv(1 << 16)
                pos = 0
                while pos + 16 <= len(data):
                    length, kind, _flags, msg_seq, _pid = struct.unpack_from("=IHHII", data, pos)
                    if kind == _NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, pos + 16)
                        if err != 0:
                            raise NftError(f"nf_tables refused the transaction at "
                                           f"{names.get(msg_seq, f'message {msg_seq}')}: {os.strerror(-err)}")
                        pending.discard(msg_seq)
                    pos += (length + 3) & ~3
        except OSError as exc:
            # The daemon handles NftError (state unknown, rebuilt at the next apply); a socket
            # error must not end it.
            raise NftError(f"nf_tables element batch: {exc}") from exc
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
# What a listener looks like in the kernel


@dataclass(frozen=True)
class ListenerPlan:
    """Everything the kernel needs for one listener. `backends` are (address, mac) in a fixed
    order; `current`/`old` are per-bucket indexes into `backends` (-1: no backend). During a
    transition `old` is the oldest live generation's table (what an owner answers for a flow it
    never saw) and `unstable` the buckets where any live old table differs from the current one."""

    listener_id: int
    vip: str
    protocol: str
    port: int
    backends: tuple[tuple[str, str], ...]
    current: np.ndarray = field(compare=False)
    old: np.ndarray | None = field(default=None, compare=False)
    unstable: np.ndarray | None = field(default=None, compare=False)  # bucket numbers
    pin_timeout_s: int = 60  # the listener's flow idle timeout: pins live this long without a packet
    pin_macs: tuple[str, ...] = ()  # MACs this listener's pins may forward to (alive backends)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"listener {self.listener_id}: protocol {self.protocol!r} is not tcp or udp")
        if self.old is not None and len(self.old) != len(self.current):
            raise ValueError(f"listener {self.listener_id}: old table has {len(self.old)} buckets, "
                             f"current {len(self.current)}")
        if (self.old is None) != (self.unstable is None):
            raise ValueError(f"listener {self.listener_id}: old table and unstable buckets go together")

    @property
    def in_transition(self) -> bool:
        return self.old is not None


def backend_chain(listener_id: int, address: str) -> str:
    return f"b{listener_id}_{address.replace('.', '_').replace(':', '_')}"


def _verdicts(plan: ListenerPlan, table: np.ndarray) -> np.ndarray:
    names = np.array([f"jump {backend_chain(plan.listener_id, a)}" for a, _ in plan.backends] + ["drop"],
                     dtype=object)
    return names[table]  # index -1 picks the trailing "drop"


def _elements(buckets: Iterable[int], verdicts: np.ndarray | None = None) -> str:
    if verdicts is None:
        return ", ".join(str(int(b)) for b in buckets)
    return ", ".join(f"{int(b)} : {verdicts[int(b)]}" for b in buckets)


def _pinok_size(table_size: int) -> int:
    """Room in `pinok_<id>` for the alive backends: a table has more than 100 buckets per
    backend of its cap (docs/dataplane.md) and a transition at most doubles the backends."""
    return max(64, table_size // 25)


@dataclass
class _Applied:
    plan: ListenerPlan  # its int tables, not rendered verdicts: 8 B per bucket less per listener
    unstable: set[int]
    chains_key: tuple  # what the listener's chains are rendered from: same key, chains untouched
    pin_macs: tuple[str, ...]


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is b:
        return True
    return a is not None and b is not None and np.array_equal(a, b)


def _chains_key(plan: ListenerPlan) -> tuple:
    """What the listener's chains are rendered from, backends aside (each backend's chain depends
    on its own address and MAC only): same key, only new backends' chains are written."""
    return (plan.protocol, int(plan.pin_timeout_s), len(plan.current))


def _dispatch_key(plan: ListenerPlan) -> str:
    return f"{plan.vip} . {plan.protocol} . {plan.port}"


# -- address family: everything that differs between an IPv4 and an IPv6 listener -------------

FAMILIES = ("ip", "ip6")


def family_of(address: str) -> str:
    """nft's family keyword of an address: "ip" (IPv4) or "ip6"."""
    return "ip6" if ":" in address else "ip"


def _addr_type(family: str) -> str:
    return "ipv6_addr" if family == "ip6" else "ipv4_addr"


def pin_map(protocol: str, family: str) -> str:
    """The pin map of a protocol and family: pins_tcp, pins6_tcp, ... (keys differ in size)."""
    return f"pins{'6' if family == 'ip6' else ''}_{protocol}"


def _dispatch_map(family: str) -> str:
    return "dispatch6" if family == "ip6" else "dispatch"


def _flow_tuple(family: str) -> str:
    """The pin key. IPv4: saddr . daddr . sport . dport. IPv6: the address pair's 64-bit
    fingerprint (two jhashes, loaded by `_fingerprint` into the mark and the priority) . sport .
    dport, because nft 1.0.6 cannot add or update a dynamic key longer than 16 bytes (a 40-byte
    IPv6 4-tuple aborts it, as a 5-field IPv4 key does). Two live flows with the same ports whose
    address pairs collide in 64 bits would share a pin: accepted (docs/dataplane.md)."""
    if family == "ip6":
        return "meta mark . meta priority . th sport . th dport"
    return f"{family} saddr . {family} daddr . th sport . th dport"


def _pin_key_type(family: str) -> str:
    if family == "ip6":
        return "mark . classid . inet_service . inet_service"
    return "ipv4_addr . ipv4_addr . inet_service . inet_service"


def _fingerprint(family: str, seed: int) -> str:
    """Statements loading an IPv6 flow's address fingerprint into the mark and the priority
    (nothing for IPv4). The mark is overwritten by the bucket afterwards; the priority is put
    back to 0 before a packet leaves (`_clear_priority`)."""
    if family != "ip6":
        return ""
    a, b = ipv6_fingerprint_seeds(seed)  # lbagent.core.flowhash.ipv6_fingerprint computes the same
    return (f"meta mark set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {a:#x} "
            f"meta priority set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {b:#x} ")


def _clear_priority(family: str) -> str:
    return "meta priority set 0 " if family == "ip6" else ""


def _hash_input(family: str) -> str:
    """The 5-tuple jhash reads (lbagent.core.flowhash lays out the same registers)."""
    proto = "ip protocol" if family == "ip" else "meta l4proto"
    return f"{family} saddr . {family} daddr . {proto} . th sport . th dport"


def _family_match(family: str, protocol: str) -> str:
    if family == "ip6":
        return f"meta protocol ip6 meta l4proto {protocol}"
    return f"meta protocol ip ip protocol {protocol}"


def _dispatch_elements(t: str, verb: str, plans: Sequence[ListenerPlan]) -> list[str]:
    """`add`/`delete element` commands of the listeners' dispatch entries, one per family map."""
    out = []
    for family in FAMILIES:
        mine = [p for p in plans if family_of(p.vip) == family]
        if mine:
            items = (f"{_dispatch_key(p)} : jump l{p.listener_id}" if verb == "add" else _dispatch_key(p)
                     for p in mine)
            out.append(f"{verb} element {t} {_dispatch_map(family)} {{ {', '.join(items)} }}")
    return out


def _classid(value: int | str) -> int:
    """A `classid` (`meta priority`) as nft's JSON writes it ("major:minor" in hex, or a name)."""
    if isinstance(value, int):
        return value
    if value == "none":
        return 0
    if value == "root":
        return 0xFFFFFFFF
    major, _, minor = value.partition(":")
    return (int(major or "0", 16) << 16) | int(minor or "0", 16)


class NftDataplane:
    """The kernel driver for one mux interface. Not thread-safe: one caller applies.

    Each listener has its own table size (the length of its plan's tables): its `jhash ... mod`
    and its maps' sizes follow it. An apply touches only what changed since the last one (the
    changed buckets, unstable set and pin set of a listener; its chains only when its backends,
    address or idle timeout changed; the dispatch map's element of an added or removed
    listener), so its cost does not grow with the number of listeners the mux holds. A large
    apply (a whole document, a restart) goes in transactions of at most `batch_elements` map
    elements (each listener's own changes stay in one transaction), so neither libnftables nor
    the command text grows with the document; the libnftables context is then recreated so the
    daemon gives the memory back."""

    def __init__(self, iface: str, mux_mac: str, *, seed: int, table_size: int | None = None,
                 table: str = TABLE, learn: bool = False, inject_iface: str | None = None,
                 nft: Nft | None = None, nflog_group: int | None = None,
                 batch_elements: int = 200_000, elements: NetlinkElements | None = None) -> None:
        if not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"seed {seed} is not a 32-bit value")
        if batch_elements < 1:
            raise ValueError(f"batch_elements {batch_elements} must be positive")
        self.iface = iface
        self.mux_mac = mux_mac
        self.seed = seed
        self.table_size = table_size  # unused by the rendering: kept for callers that name it
        self.table = table
        self.learn = learn  # learn each flow's bucket in the kernel (tests, debugging): costs a dynset
        self.inject_iface = inject_iface  # where the slow path re-injects decided packets
        # Element-only transactions straight to nf_tables (the default with our own libnftables
        # context; a caller passing its own `nft` sees every transaction as text unless it asks).
        self.elements = elements if elements is not None else (NetlinkElements() if nft is None else None)
        self.nft = nft or Nft()
        # None: SYNs of unstable buckets go to NFQUEUE like every other unknown packet (the
        # pre-kernel-SYN behaviour, kept for drivers without an NFLOG reader).
        if nflog_group is not None and not 0 <= nflog_group <= 0xFFFF:
            raise ValueError(f"nflog group {nflog_group} is not 0..65535")
        self.nflog_group = nflog_group
        self.batch_elements = batch_elements
        self._applied: dict[int, _Applied] | None = None  # None: the kernel's content is unknown
        self._inject_timeouts: dict[str, int] | None = None
        self.transactions = 0  # nft transactions sent (the bench and tests read it)
        self.netlink_transactions = 0  # of which element-only, written as netlink messages

    # -- rendering --------------------------------------------------------------------------
    def _t(self) -> str:
        return f"netdev {self.table}"

    def _base(self) -> list[str]:
        """Objects every listener uses. `add` of an existing object is a no-op: pins survive a
        daemon restart, and the ingress chain keeps dispatching until the apply's last batch."""
        t = self._t()
        out = [f"add table {t}"]
        for family in FAMILIES:
            for proto in PROTOCOLS:
                out.append(f"add map {t} {pin_map(proto, family)} {{ type {_pin_key_type(family)} "
                           f": ether_addr; size {PIN_MAP_SIZE}; flags timeout; }}")
        out.append(f"add counter {t} slowpath_reinjected")
        # No size: a hash that grows with the listeners (one element each).
        for family in FAMILIES:
            out.append(f"add map {t} {_dispatch_map(family)} {{ type {_addr_type(family)} . inet_proto . "
                       f"inet_service : verdict; }}")
        out.append(f'add chain {t} ingress {{ type filter hook ingress device "{self.iface}" priority 0; '
                   f"policy accept; }}")
        return out

    def _inject(self, timeouts: dict[str, int]) -> list[str]:
        if not self.inject_iface:
            return []
        t = self._t()
        # The slow path writes each decided packet, MACs already rewritten, into the injection
        # veth; arriving here, the kernel itself pins the flow (first writer wins: `add` never
        # overwrites) and forwards the packet to the backend. No nft call per flow.
        out = [f'add chain {t} inject {{ type filter hook ingress device "{self.inject_iface}" '
               f"priority 0; policy drop; }}", f"flush chain {t} inject"]
        for family in FAMILIES:
            for proto in PROTOCOLS:
                # The longest idle timeout of the protocol's listeners; the flow's next packet
                # sets its own listener's timeout (rule 1's `update`).
                out.append(f"add rule {t} inject {_family_match(family, proto)} "
                           f"{_fingerprint(family, self.seed)}add @{pin_map(proto, family)} "
                           f"{{ {_flow_tuple(family)} timeout {timeouts[proto]}s : ether daddr }} "
                           f'{_clear_priority(family)}counter name slowpath_reinjected fwd to "{self.iface}"')
        return out

    def _listener_rules(self, plan: ListenerPlan) -> list[str]:
        t, lid, proto = self._t(), plan.listener_id, plan.protocol
        chain = f"l{lid}"
        family = family_of(plan.vip)
        tuple4 = _flow_tuple(family)
        pins = pin_map(proto, family)
        renew = " ".join(("update", f"@{pins} {{ {tuple4} timeout {max(1, int(plan.pin_timeout_s))}s "
                                    ": ether daddr }"))
        rules = [
            f"add chain {t} {chain}",
            f"flush chain {t} {chain}",
            f"add rule {t} {chain} counter name l{lid}",
            # Rule 1: a pin to a backend still alive forwards and renews the pin's idle timeout
            # (the flow's packets keep its state alive, however long it lives). A pin to an
            # ended backend (drain deadline passed) rewrote the MAC but does not match the set:
            # the next rule puts the mux's MAC back and the packet goes on like an unpinned one.
            # (IPv6: the pin key's address fingerprint is loaded first, see _flow_tuple.)
            f"add rule {t} {chain} {_fingerprint(family, self.seed)}ether daddr set {tuple4} map @{pins} "
            f"ether daddr @pinok_{lid} {renew} counter name pinned{lid} {_clear_priority(family)}"
            f'ether saddr set {self.mux_mac} fwd to "{self.iface}"',
            f"add rule {t} {chain} ether daddr set {self.mux_mac}",
            # The listener's own table size: the hash picks one of its len(current) buckets.
            f"add rule {t} {chain} meta mark set jhash {_hash_input(family)} "
            f"mod {len(plan.current)} seed {self.seed:#x}"
            + ("" if self.learn else f" {_clear_priority(family)}".rstrip()),
        ]
        if self.learn:
            # IPv6: keyed by the fingerprint's second half (still in the priority) and the ports
            learn_key = "meta priority . th sport . th dport" if family == "ip6" else tuple4
            rules.append(f"add rule {t} {chain} add @learn{lid} {{ {learn_key} : meta mark }} "
                         f"{_clear_priority(family)}".rstrip())
        if self.nflog_group is not None and proto == "tcp":
            # Unstable bucket, no pin, not a SYN: up to the stack, where iptables-nft queues it to
            # the slow path (rule 4 needs the owner's answer). A SYN (rule 3) goes on through
            # `cur_<id>`: its backend chain pins, logs and forwards it in the kernel.
            unknown = f"meta mark @unstable_{lid} tcp flags & (syn | ack) != syn"
        else:
            # UDP has no SYN: every unknown flow of an unstable bucket goes to the slow path.
            unknown = f"meta mark @unstable_{lid}"
        rules += [
            f"add rule {t} {chain} {unknown} counter name slow{lid} accept",
            f"add rule {t} {chain} meta mark vmap @cur_{lid}",
            f"add rule {t} {chain} drop",
        ]
        return rules

    def _backend_chain_rules(self, plan: ListenerPlan, address: str, mac: str) -> list[str]:
        t, lid, name = self._t(), plan.listener_id, backend_chain(plan.listener_id, address)
        out = [f"add counter {t} c{name}", f"add chain {t} {name}", f"flush chain {t} {name}"]
        if self.nflog_group is not None and plan.protocol == "tcp":
            family = family_of(plan.vip)
            snaplen = NFLOG_SNAPLEN6 if family == "ip6" else NFLOG_SNAPLEN
            # Rule 3's SYN case, compiled: this chain is reached through `cur_<id>`, so this
            # backend IS the current table's for the bucket (still in the mark). Pin the flow
            # (first writer wins: `add` never overwrites), copy its headers to nfnetlink_log for
            # the owner's record (no verdict: the packet goes on), count it, then forward below.
            # In steady state `unstable_<id>` is empty and this rule never matches.
            # `log` comes before `add`: if the pin map is full the `add` fails and ends the rule
            # (the forwarding rule below still sends the SYN to this backend); the report is
            # out by then, so the flow still gets its record, and its next packets (no pin, not a
            # SYN) find that record through NFQUEUE instead of the old table's guess.
            out.append(f"add rule {t} {name} meta mark @unstable_{lid} tcp flags & (syn | ack) == syn "
                       f"log group {self.nflog_group} snaplen {snaplen} {_fingerprint(family, self.seed)}"
                       f"add @{pin_map('tcp', family)} {{ {_flow_tuple(family)} timeout "
                       f"{max(1, int(plan.pin_timeout_s))}s : {mac} }} {_clear_priority(family)}"
                       f"counter name newflows{lid}")
        out.append(f"add rule {t} {name} counter name c{name} ether saddr set {self.mux_mac} "
                   f'ether daddr set {mac} fwd to "{self.iface}"')
        return out

    def _create_objects(self, plan: ListenerPlan) -> list[str]:
        t, lid, size = self._t(), plan.listener_id, len(plan.current)
        # Each map holds at most one element per bucket: sized to the listener's table, so an
        # empty or small map costs the kernel what its table needs, not a 65,537-bucket worth.
        out = [
            f"add counter {t} l{lid}", f"add counter {t} pinned{lid}", f"add counter {t} slow{lid}",
            f"add counter {t} newflows{lid}",
            f"add map {t} cur_{lid} {{ type mark : verdict; size {size}; }}",
            f"add map {t} old_{lid} {{ type mark : verdict; size {size}; }}",
            f"add set {t} unstable_{lid} {{ type mark; size {size}; }}",
            f"add set {t} pinok_{lid} {{ type ether_addr; size {_pinok_size(size)}; }}",
        ]
        if self.learn:
            family = family_of(plan.vip)
            key = ("ipv4_addr . ipv4_addr . inet_service . inet_service" if family == "ip"
                   else "classid . inet_service . inet_service")
            out.append(f"add map {t} learn{lid} {{ type {key} "
                       f": mark; size {MAP_SIZE}; flags dynamic; }}")
        return out

    def _delete_maps(self, lid: int) -> list[str]:
        t = self._t()
        out = [f"delete map {t} cur_{lid}", f"delete map {t} old_{lid}", f"delete set {t} unstable_{lid}",
               f"delete set {t} pinok_{lid}"]
        if self.learn:
            out.append(f"delete map {t} learn{lid}")
        return out

    def _delete_listener(self, applied: _Applied) -> list[str]:
        t, lid = self._t(), applied.plan.listener_id
        chains = [backend_chain(lid, address) for address, _ in applied.plan.backends]
        # References decide the order: rules use the maps, the set and the counters; the maps'
        # verdicts jump to the backend chains. Empty the chains, drop the maps, then the chains.
        return [f"flush chain {t} l{lid}", *(f"flush chain {t} {c}" for c in chains),
                f"delete chain {t} l{lid}", *self._delete_maps(lid),
                *(f"delete chain {t} {c}" for c in chains), *(f"delete counter {t} c{c}" for c in chains),
                f"delete counter {t} l{lid}", f"delete counter {t} pinned{lid}",
                f"delete counter {t} slow{lid}", f"delete counter {t} newflows{lid}"]

    # -- applying ---------------------------------------------------------------------------
    def apply(self, plans: Sequence[ListenerPlan]) -> None:
        """Make the kernel hold exactly these listeners. Pins live their listener's
        `pin_timeout_s` without a packet; each packet of the flow renews it.

        One transaction unless the changes hold more than `batch_elements` map elements; then
        each batch is one transaction holding whole listeners, and the last one the dispatch
        changes and deletions (a listener is reachable only once all its objects are in)."""
        ids = [p.listener_id for p in plans]
        if len(set(ids)) != len(ids):
            raise ValueError(f"listener ids must be unique, got {ids}")
        keys = [_dispatch_key(p) for p in plans]
        if len(set(keys)) != len(keys):
            raise ValueError("two listeners share one address, protocol and port")
        first = self._applied is None
        existing: dict[tuple[str, str], int | None] | None = None
        if first:
            # Unknown kernel content (first apply of this process, or after an error): refill every
            # planned listener and delete what no plan needs, so a restarted daemon never leaves a
            # moment without tables (and keeps the pins).
            existing = self._existing_objects()
            self._applied = {}
        applied = self._applied
        assert applied is not None
        timeouts: dict[str, int] = {proto: 60 for proto in PROTOCOLS}
        longest: dict[str, float] = {}
        for p in plans:
            longest[p.protocol] = max(longest.get(p.protocol, 0), p.pin_timeout_s)
        timeouts.update({proto: max(1, int(v)) for proto, v in longest.items()})

        # Batches are sent as they fill, so neither the command text nor libnftables' parse of it
        # ever holds more than one batch (a whole document's text would be ~200 B per bucket).
        new_applied: dict[int, _Applied] = {}
        current: list[str] = self._base() if first else []
        size = 0
        sent = 0
        try:
            for plan in plans:
                cmds, elements, state = self._listener_changes(plan, applied.get(plan.listener_id), existing)
                new_applied[plan.listener_id] = state
                if not cmds:
                    continue
                if size > 0 and size + elements > self.batch_elements:
                    self._send(current, first)
                    sent += 1
                    # Each batch's parse tree and cache stay in the context until freed: without
                    # this the daemon's RSS grows with the document instead of one batch.
                    self._fresh_context()
                    current, size = [], 0
                current += cmds
                size += elements
            current += self._last_commands(plans, applied, new_applied, existing, timeouts, first)
            if current:
                self._send(current, first)
                if sent:
                    self._fresh_context()
        except NftError:
            self._applied = None  # unknown again: the next apply rebuilds from the kernel's listing
            self._inject_timeouts = None
            raise
        self._applied = new_applied
        self._inject_timeouts = timeouts

    def _send(self, batch: list[str], first: bool) -> None:
        text = "\n".join(batch) + "\n"
        ops = NetlinkElements.parse(text) if self.elements is not None and not first else None
        if ops is not None:
            self.elements.run(ops)  # type: ignore[union-attr]
            self.netlink_transactions += 1
        else:
            self.nft.run(text)
        self.transactions += 1

    def _last_commands(self, plans: Sequence[ListenerPlan], applied: dict[int, _Applied],
                       new_applied: dict[int, _Applied], existing: dict[tuple[str, str], int | None] | None,
                       timeouts: dict[str, int], first: bool) -> list[str]:
        """The apply's last transaction: the dispatch map (a listener becomes reachable once all its
        objects are in), the injection rules, then whatever no plan needs any more."""
        t = self._t()
        last: list[str] = []
        if first:
            last.append(f"flush chain {t} ingress")
            last += [f"add rule {t} ingress {f} daddr . meta l4proto . th dport vmap @{_dispatch_map(f)}"
                     for f in FAMILIES]
            last += [f"flush map {t} {_dispatch_map(f)}" for f in FAMILIES]
            last += _dispatch_elements(t, "add", plans)
        else:
            gone = [a.plan for lid, a in applied.items() if lid not in new_applied
                    or _dispatch_key(a.plan) != _dispatch_key(new_applied[lid].plan)]
            last += _dispatch_elements(t, "delete", gone)
            added = [p for p in plans if p.listener_id not in applied
                     or _dispatch_key(applied[p.listener_id].plan) != _dispatch_key(p)]
            last += _dispatch_elements(t, "add", added)
        if first or timeouts != self._inject_timeouts:
            last += self._inject(timeouts)
        for lid, a in applied.items():
            if lid not in new_applied:
                last += self._delete_listener(a)
        if existing:
            last += self._delete_stale(set(existing), plans)
        return last

    def _fresh_context(self) -> None:
        """A whole-document load leaves libnftables' caches and the C heap full: a new context
        and malloc_trim hand that memory back (the daemon's RSS drops to its steady size)."""
        reset = getattr(self.nft, "reset", None)
        if reset is not None:
            reset()

    def _listener_changes(self, plan: ListenerPlan, prev: _Applied | None,
                          existing: dict[tuple[str, str], int | None] | None
                          ) -> tuple[list[str], int, _Applied]:
        """(commands, map elements they carry, what the kernel holds after them) for one listener."""
        t, lid, size = self._t(), plan.listener_id, len(plan.current)
        pin_macs = tuple(sorted(set(plan.pin_macs)))
        key = _chains_key(plan)
        unstable_arr = plan.unstable
        if (prev is not None and prev.chains_key == key and prev.pin_macs == pin_macs
                and prev.plan.backends == plan.backends
                and _same(plan.current, prev.plan.current) and _same(plan.old, prev.plan.old)
                and _same(unstable_arr, prev.plan.unstable)):
            # The same tables (usually the very same arrays: the daemon caches generations):
            # nothing to send and nothing to recompute.
            return [], 0, _Applied(plan, prev.unstable, key, pin_macs)
        unstable = set(unstable_arr.tolist()) if unstable_arr is not None else set()
        state = _Applied(plan, unstable, key, pin_macs)
        cmds: list[str] = []
        elements = 0
        resize = prev is not None and len(prev.plan.current) != size
        if existing is not None and prev is None:
            held = existing.get(("map", f"cur_{lid}"), -1)
            resize = held != -1 and held != size  # an earlier process made it with another size
        if resize:
            # Map sizes are fixed at creation: empty what references the maps, drop and recreate
            # them (same transaction: the listener is never without its tables).
            old_backends = prev.plan.backends if prev is not None else plan.backends
            cmds += [f"flush chain {t} l{lid}",
                     *(f"flush chain {t} {backend_chain(lid, a)}" for a, _ in old_backends
                       if existing is None or ("chain", backend_chain(lid, a)) in existing),
                     *(cmd for cmd in self._delete_maps(lid)
                       if existing is None or (cmd.split()[1], cmd.split()[-1]) in existing)]
            in_use = {a for a, _ in plan.backends}
            for address, _ in (prev.plan.backends if prev is not None else ()):
                if address not in in_use:  # unreferenced now that the maps are gone
                    name = backend_chain(lid, address)
                    cmds += [f"delete chain {t} {name}", f"delete counter {t} c{name}"]
            prev = None
        if prev is None:
            cmds += self._create_objects(plan)
        rerender = prev is None or prev.chains_key != key
        had = set() if prev is None else set(prev.plan.backends)
        for address, mac in plan.backends:
            # A drain, a removal or a weight change writes no rule: only elements (rule commands
            # make libnftables fetch every chain and object of the ruleset first).
            if rerender or (address, mac) not in had:
                cmds += self._backend_chain_rules(plan, address, mac)
        if rerender:
            cmds += self._listener_rules(plan)
        if prev is None or prev.pin_macs != pin_macs:
            cmds.append(f"flush set {t} pinok_{lid}")
            if pin_macs:
                cmds.append(f"add element {t} pinok_{lid} {{ {', '.join(pin_macs)} }}")
        if prev is None:
            cmds += [f"flush map {t} cur_{lid}", f"flush map {t} old_{lid}", f"flush set {t} unstable_{lid}"]
            cur_v = _verdicts(plan, plan.current)
            cmds.append(f"add element {t} cur_{lid} {{ {_elements(range(len(cur_v)), cur_v)} }}")
            elements += len(cur_v)
            if plan.old is not None:
                old_v = _verdicts(plan, plan.old)
                cmds.append(f"add element {t} old_{lid} {{ {_elements(range(len(old_v)), old_v)} }}")
                elements += len(old_v)
            if unstable:
                cmds.append(f"add element {t} unstable_{lid} {{ {_elements(sorted(unstable))} }}")
                elements += len(unstable)
        else:
            diff = self._diff_map(f"cur_{lid}", prev.plan, prev.plan.current, plan, plan.current)
            diff += self._diff_map(f"old_{lid}", prev.plan, prev.plan.old, plan, plan.old)
            cmds += diff
            elements += sum(line.count(",") + 1 for line in diff if "element" in line)
            gone, added = prev.unstable - unstable, unstable - prev.unstable
            if gone:
                cmds.append(f"delete element {t} unstable_{lid} {{ {_elements(sorted(gone))} }}")
            if added:
                cmds.append(f"add element {t} unstable_{lid} {{ {_elements(sorted(added))} }}")
            elements += len(gone) + len(added)
            in_use = {a for a, _ in plan.backends}
            for address, _ in prev.plan.backends:
                if address not in in_use:
                    name = backend_chain(lid, address)
                    cmds += [f"flush chain {t} {name}", f"delete chain {t} {name}",
                             f"delete counter {t} c{name}"]
        return cmds, elements, state

    def _diff_map(self, name: str, before_plan: ListenerPlan, before: np.ndarray | None,
                  plan: ListenerPlan, after: np.ndarray | None) -> list[str]:
        """Commands turning map `name` from `before` (indexes into before_plan's backends) into
        `after` (indexes into plan's): only the buckets whose backend chain differs."""
        t = self._t()
        if after is None:
            return [f"flush map {t} {name}"] if before is not None else []
        if before is None:
            verdicts = _verdicts(plan, after)
            return [f"flush map {t} {name}",
                    f"add element {t} {name} {{ {_elements(range(len(after)), verdicts)} }}"]
        # A bucket's verdict is its backend's chain, named by the address: map the old indexes to
        # the new ones (-2: a backend the plan no longer has; the trailing -1 stays "drop").
        where = {address: i for i, (address, _) in enumerate(plan.backends)}
        remap = np.array([where.get(address, -2) for address, _ in before_plan.backends] + [-1],
                         dtype=np.int64)
        changed = np.flatnonzero(remap[before] != after)
        if len(changed) == 0:
            return []
        verdicts = _verdicts(plan, after)
        # An element cannot be re-added with another value: delete and add in the same transaction.
        return [f"delete element {t} {name} {{ {_elements(changed)} }}",
                f"add element {t} {name} {{ {_elements(changed, verdicts)} }}"]

    def _existing_objects(self) -> dict[tuple[str, str], int | None]:
        """(kind, name) of the chains, maps, sets and counters the kernel holds in our table,
        each with its declared size (maps and sets; None for the rest).

        Listed per kind (`list chains|maps|sets`, terse) and counters over netlink: `list table`,
        `list tables` and `list counters` make nft 1.0.6 load every element of every map first,
        which takes ~25 s with 400,000 pins (a restarted or stopping daemon during a busy
        transition); these listings take ~10 ms whatever the maps hold."""
        found: dict[tuple[str, str], int | None] = {}
        for what, kind in (("chains", "chain"), ("maps", "map"), ("sets", "set")):
            out = self.nft.run(f"list {what} netdev", json_output=True, terse=True)
            for item in json.loads(out)["nftables"]:
                obj = item.get(kind)
                if obj is not None and obj.get("table") == self.table:
                    found[(kind, obj["name"])] = obj.get("size")
        if found:
            with contextlib.suppress(NftError):  # the table went away meanwhile: nothing to keep
                found.update({("counter", name): None for name in read_counters(self.table)})
        return found

    def _delete_stale(self, existing: set[tuple[str, str]], plans: Sequence[ListenerPlan]) -> list[str]:
        """Commands deleting objects left by an earlier process that no plan uses (pins stay)."""
        keep = {("chain", "ingress"), ("chain", "inject"), ("counter", "slowpath_reinjected"),
                ("map", "dispatch"), ("map", "dispatch6")}
        keep |= {("map", pin_map(p, f)) for p in PROTOCOLS for f in FAMILIES}
        for plan in plans:
            lid = plan.listener_id
            keep |= {("chain", f"l{lid}"), ("map", f"cur_{lid}"), ("map", f"old_{lid}"),
                     ("set", f"pinok_{lid}"),
                     ("map", f"learn{lid}"), ("set", f"unstable_{lid}"), ("counter", f"l{lid}"),
                     ("counter", f"pinned{lid}"), ("counter", f"slow{lid}"), ("counter", f"newflows{lid}")}
            for address, _ in plan.backends:
                name = backend_chain(lid, address)
                keep |= {("chain", name), ("counter", f"c{name}")}
        stale = existing - keep
        t = self._t()
        chains = sorted(n for k, n in stale if k == "chain")
        # Rules reference maps and maps reference chains: empty chains, drop maps, then chains.
        return ([f"flush chain {t} {c}" for c in chains]
                + [f"delete {k} {t} {n}" for k, n in sorted(stale) if k in ("map", "set")]
                + [f"delete chain {t} {c}" for c in chains]
                + [f"delete counter {t} {n}" for k, n in sorted(stale) if k == "counter"])

    def _table_exists(self) -> bool:
        return bool(self._existing_objects())  # a table of ours always holds its pin maps

    def remove(self) -> None:
        """Delete the whole table (shutdown)."""
        if self._table_exists():
            self.nft.run(f"delete table {self._t()}\n")
        self._applied = None

    # -- reading back ---------------------------------------------------------------------------
    def counters(self) -> dict[str, tuple[int, int]]:
        """Every named counter of the table: name -> (packets, bytes). Read over netlink: any
        `nft list` loads every map element first (seconds with 65537-bucket maps)."""
        return read_counters(self.table)

    def pin_count(self, protocol: str) -> int:
        out = self.nft.run(f"list map {self._t()} pins_{protocol}", json_output=True)
        for item in json.loads(out)["nftables"]:
            if "map" in item:
                return len(item["map"].get("elem", []))
        return 0

    def pins_with_idle(self, protocol: str,
                       nft: Nft | None = None) -> list[tuple[int, int, int, int, str, int]]:
        """Every pin of a protocol: (saddr, daddr, sport, dport as integers, MAC, seconds since the
        flow's last packet renewed it). Costs an `nft list` of the map (about 1.6 s per 65,000
        pins): the keep-alive thread does it once per round, only while listeners are in transition,
        with its own context (`nft`) so the main loop's applies never wait for it."""
        # IPv4 pins only: an IPv6 pin's key holds a fingerprint of the addresses, not the addresses
        out = (nft or self.nft).run(f"list map {self._t()} {pin_map(protocol, 'ip')}", json_output=True)
        result: list[tuple[int, int, int, int, str, int]] = []
        for item in json.loads(out)["nftables"]:
            for elem in item.get("map", {}).get("elem", []):
                key, mac = elem
                meta = key.get("elem", {}) if isinstance(key, dict) else {}
                parts = meta.get("val", key)["concat"] if isinstance(key, dict) else key
                idle = int(meta.get("timeout", 0)) - int(meta.get("expires", meta.get("timeout", 0)))
                result.append((int(ipaddress.ip_address(parts[0])), int(ipaddress.ip_address(parts[1])),
                               int(parts[2]), int(parts[3]), str(mac), max(0, idle)))
        return result

    def pins6_with_idle(self, protocol: str,
                        nft: Nft | None = None) -> list[tuple[int, int, int, int, str, int]]:
        """Every IPv6 pin of a protocol: (F1, F2, sport, dport, MAC, seconds since the flow's last
        packet renewed it), F1 . F2 being the address fingerprint the pin is keyed by
        (lbagent.core.flowhash.ipv6_fingerprint); same cost as `pins_with_idle`."""
        out = (nft or self.nft).run(f"list map {self._t()} {pin_map(protocol, 'ip6')}", json_output=True)
        result: list[tuple[int, int, int, int, str, int]] = []
        for item in json.loads(out)["nftables"]:
            for key, mac in item.get("map", {}).get("elem", []):
                meta = key.get("elem", {}) if isinstance(key, dict) and "elem" in key else {}
                f1, f2, sport, dport = (meta.get("val", key) if meta else key)["concat"]
                idle = int(meta.get("timeout", 0)) - int(meta.get("expires", meta.get("timeout", 0)))
                result.append((int(f1), _classid(f2), int(sport), int(dport), str(mac), max(0, idle)))
        return result

    def learned(self, listener_id: int) -> dict[tuple[str, str, int, int], int]:
        """Buckets the kernel computed per flow (only with learn=True)."""
        if not self.learn:
            raise RuntimeError("learned(): this data plane was made without learn=True")
        out = self.nft.run(f"list map {self._t()} learn{listener_id}", json_output=True)
        result: dict[tuple[str, str, int, int], int] = {}
        for item in json.loads(out)["nftables"]:
            for elem in item.get("map", {}).get("elem", []):
                key, value = elem
                parts = key["concat"]
                result[(parts[0], parts[1], int(parts[2]), int(parts[3]))] = int(value)
        return result
