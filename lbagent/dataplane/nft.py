"""Kernel data plane: renders listeners into one nftables netdev table on the mux's interface.
Rules go through libnftables; every element, counter and deletion as raw netlink messages
(`nftlink`), each change one transaction.

Every listener has a slot (0..32767, allocated by the driver, the lowest free one, reused after
the listener is removed): its rules hash a flow into the mark `slot << 17 | bucket` (nft's
`jhash ... mod N seed S offset slot<<17`; `lbagent.core.flowhash.bucket_of_mark` gives the bucket
back, so a table has at most 2^17 buckets), and every set a backend change writes is SHARED by
all listeners, keyed by the slot. nf_tables finds a set by name by walking the table's list of
sets in creation order (docs/bench-mux-scale.md): these few sets are created first, so a change
to listener 4,000 costs what a change to listener 1 costs. The shared sets, generation `<g>`
("a" or "b", see below):
  * `cur_<g>`: `slot << 17 | bucket` -> the backend's MAC (a data map, one element per bucket
    with a backend); `unstable_<g>`: `slot << 17 | bucket` of the buckets where any live old
    table differs from the current one (empty in steady state);
  * `pinok_<g>`: `slot << 17 . MAC` of the backends whose connections may still live;
    `cnt_<g>`: `slot << 17 . MAC` -> the backend's named counter `cb<id>_<address>`.
One shared chain reads `cur_<g>`: `bucket_<g>`, whose one rule sets the destination MAC from
the mark (`ether daddr set meta mark map @cur_<g>`). nf_tables checks each new element of a map
against every rule that uses the map, so a `cur` used by every listener's rules would make each
insert cost O(listeners) (measured: 12 us per element with 1,000 such rules); `unstable` and
`pinok` are sets and `cnt` an object map, which the kernel does not check that way.
Per listener `<id>`: chain `l<id>`, counters `l<id>`, `pinned<id>`, `slow<id>`, `newflows<id>`,
the backend counters, and (learning only: tests, debugging) the map `learn<id>`, which only the
kernel writes. Chain `l<id>`: per-flow pins first (a miss ends that rule and evaluation goes
on), then the flow hash into the mark; packets of unstable buckets that are not a TCP SYN are
`accept`ed up to the stack (where iptables-nft hands them to NFQUEUE, the slow path, which masks
the bucket out of the mark); then `jump bucket_<g>` (the current table's MAC; a bucket with no
backend has no element, the MAC stays the mux's and the next rule drops); a SYN of an unstable
bucket (decision rule 3) is reported to nfnetlink_log group `nflog_group`, pinned to that MAC
and counted in `newflows<id>`; every packet is then counted by slot and MAC (`counter name meta
mark & 0xfffe0000 . ether daddr map @cnt_<g>`) and forwarded (L2 direct server return: the
backend answers the client itself).
No rule names a backend and no map holds a verdict but `dispatch` and `dispatch6` (VIP .
protocol . port -> jump l<id>): adding, draining or removing a backend writes elements and
counters only, and the kernel has no jump graph to re-validate when `cur_<g>` changes.
Pins live in one map per protocol and address family for the whole table (`pins_tcp`,
`pins_udp`: a 4-field key, because nft 1.0.6 aborts on 5-field dynamic keys; `pins6_tcp`,
`pins6_udp` for IPv6 flows, keyed by a 64-bit fingerprint of the address pair and the ports,
because nft 1.0.6 cannot add a dynamic key longer than 16 bytes), value = the backend's MAC, with the
listener's idle timeout, which every packet of the flow renews in the kernel (`update`). A pin
forwards only to a MAC in `pinok_<g>` under the listener's slot (the pin rule puts `slot << 17`
in the mark for that lookup: nft 1.0.6 takes no constant in a concatenation): at a drain
deadline the ended backend's element leaves the set, so its flows fall through to the current
table (whose backend answers them with a reset) at their next packet. The kernel adds pins itself
in chain `inject` (on the injection veth) from the packets the slow path re-injects. Counters are
read over netlink (`read_counters`): `nft list` would load every map element first.

Generations: a driver that starts on a table an earlier process left (a restarted daemon, or
after a failed apply) cannot know which shared elements belong to which slot without listing
millions of them, so it builds the other generation's shared sets (`cur_b` when the kernel holds
`cur_a`, and back), fills them for every listener, then points each listener's rules at them,
and deletes the old generation last: no listener is ever without its tables (restart loads send
the rules after the elements). Pins, the dispatch maps and the counters are kept.

IPv6 listeners have the same objects and rules; what differs per family is the dispatch map
(`dispatch6`: IPv6 VIP . protocol . port), the pin maps, the hash input (`ip6 saddr . ip6 daddr .
meta l4proto . th sport . th dport`, the same registers `lbagent.core.flowhash` hashes) and the
fingerprint statements that load an IPv6 pin's key into the mark and the priority
(`_fingerprint`; the priority is put back to 0 before a packet leaves; the pin rule loads the
first half again after its `pinok` lookup, for the renewal).

The steady state is stateless: no pins, empty unstable sets, no packet leaves the kernel.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import heapq
import json
import os
import queue
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lbagent.core.flowhash import MARK_BUCKET_BITS, MARK_BUCKET_MASK, MARK_SLOT_MASK, ipv6_fingerprint_seeds
from lbagent.dataplane.nftlink import (
    Change,
    FillOp,
    NetlinkElements,
    NetlinkError,
    Op,
    int_to_mac,
    mac_to_int,
    mac_values,
    op_elements,
)

TABLE = "lbagent"
PROTOCOLS = {"tcp": 6, "udp": 17}
PIN_MAP_SIZE = 1 << 20
# Bytes of each new-flow SYN copied to nfnetlink_log: the IPv4 header and the TCP ports are all
# the owner's record needs (the bucket travels in the mark).
NFLOG_SNAPLEN = 40
# IPv6: the 40-byte fixed header and the ports right after it (a SYN with extension headers is
# still pinned and forwarded; its report is counted malformed and the flow gets no record).
NFLOG_SNAPLEN6 = 44
MAP_SIZE = 1 << 17  # room for a 65537-bucket table (learn maps)
MAX_BUCKETS = 1 << MARK_BUCKET_BITS  # a listener's table size: the bucket is the mark's low 17 bits
MAX_SLOTS = 1 << (32 - MARK_BUCKET_BITS)  # listeners on one mux: the slot is the mark's high 15 bits
GENERATIONS = ("a", "b")
SHARED = ("cur", "unstable", "pinok", "cnt")
_LEARN_IP6 = -6  # `_existing_objects`' mark of a learn map keyed for an IPv6 listener
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")


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


def read_counters(table: str, family: int = _NFPROTO_NETDEV,
                  prefixes: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
    """Named counters of one nftables table: name -> (packets, bytes). With `prefixes`, only
    the counters whose names start with one of them (the others are skipped before their data
    is decoded: at 4,000 listeners the table has 48,000 counters, and decoding all of them is
    most of the read's CPU)."""
    wanted = tuple(p.encode() for p in prefixes) if prefixes is not None else None
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
            data = sock.recv(1 << 20)  # a large buffer: fewer rounds of the kernel's dump
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
                if wanted is not None:
                    # The kernel writes the table's name, then the object's: look at the name
                    # before decoding anything else.
                    (table_len,) = struct.unpack_from("=H", data, pos + 20)
                    at = pos + 20 + ((table_len + 3) & ~3)
                    name_len, name_type = struct.unpack_from("=HH", data, at)
                    if (name_type & _NLA_TYPE_MASK == _NFTA_OBJ_NAME
                            and not data[at + 4:at + name_len].startswith(wanted)):
                        pos += (length + 3) & ~3
                        continue
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
# What a listener looks like in the kernel


@dataclass(frozen=True)
class ListenerPlan:
    """Everything the kernel needs for one listener. `backends` are (address, mac) in a fixed
    order; `current`/`old` are per-bucket indexes into `backends` (-1: no backend). During a
    transition `old` is the oldest live generation's table (what an owner answers for a flow it
    never saw: the slow path's business, not the kernel's) and `unstable` the buckets where any
    live old table differs from the current one."""

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
        try:  # inet_pton, not ipaddress: a twentieth of the cost, paid per plan of every apply
            socket.inet_pton(socket.AF_INET6 if ":" in self.vip else socket.AF_INET, self.vip)
        except (OSError, TypeError):
            raise ValueError(f"listener {self.listener_id}: VIP {self.vip!r} is not an IPv4 or IPv6 "
                             "address") from None
        if not 1 <= len(self.current) <= MAX_BUCKETS:
            raise ValueError(f"listener {self.listener_id}: a table of {len(self.current)} buckets "
                             f"(1..{MAX_BUCKETS}: the bucket is the mark's low {MARK_BUCKET_BITS} bits)")
        if self.old is not None and len(self.old) != len(self.current):
            raise ValueError(f"listener {self.listener_id}: old table has {len(self.old)} buckets, "
                             f"current {len(self.current)}")
        if (self.old is None) != (self.unstable is None):
            raise ValueError(f"listener {self.listener_id}: old table and unstable buckets go together")
        for address, mac in self.backends:
            if not _MAC_RE.match(mac):
                raise ValueError(f"listener {self.listener_id}: backend {address} has MAC {mac!r}, "
                                 "expected six lower-case hex pairs")

    @property
    def in_transition(self) -> bool:
        return self.old is not None

    @functools.cached_property
    def dispatch_key(self) -> tuple[str, str, int]:
        """(VIP, protocol, port): the listener's `dispatch` (or `dispatch6`) element."""
        return (self.vip, self.protocol, int(self.port))

    @property
    def family(self) -> str:
        """nft's family keyword of the VIP: "ip" or "ip6"."""
        return family_of(self.vip)


def backend_counter(listener_id: int, address: str) -> str:
    """Name of a backend's packet counter (the daemon's metrics parse it back: `cb<id>_<addr>`)."""
    return f"cb{listener_id}_{address.replace('.', '_').replace(':', '_')}"


def _counters_by_mac(plan: ListenerPlan) -> dict[int, str]:
    """The listener's backend counters keyed by MAC (what `cnt` holds under its slot). Backends sharing a
    MAC (one host, two addresses) share the first one's counter: the kernel only sees the MAC."""
    out: dict[int, str] = {}
    for address, mac in plan.backends:
        out.setdefault(mac_to_int(mac), backend_counter(plan.listener_id, address))
    return out


@dataclass
class _Applied:
    plan: ListenerPlan  # its int tables, not rendered elements: 8 B per bucket less per listener
    unstable: set[int]
    rules_key: tuple  # what the listener's rules are rendered from: same key, rules untouched
    pin_macs: tuple[str, ...]
    counters: dict[int, str]  # cnt: backend MAC -> counter name
    slot: int  # the listener's slot in the shared sets: its keys are `slot << 17 | ...`

    @property
    def base(self) -> int:
        return slot_base(self.slot)


def slot_base(slot: int) -> int:
    """A slot's part of the mark (and of every shared key): `slot << 17`."""
    return slot << MARK_BUCKET_BITS


def shared_name(kind: str, generation: str) -> str:
    """A shared set's name: `cur_a`, `unstable_b`, ... (kind in SHARED, generation in GENERATIONS)."""
    return f"{kind}_{generation}"


def slot_mac_keys(slot: int, macs: Iterable[str | int]) -> list[tuple[int, str]]:
    """`pinok`/`cnt` keys of a listener's backends: (slot << 17, MAC), MACs as strings or ints."""
    base = slot_base(slot)
    return [(base, mac if isinstance(mac, str) else int_to_mac(mac)) for mac in macs]


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is b:
        return True
    return a is not None and b is not None and np.array_equal(a, b)


def _rules_key(plan: ListenerPlan) -> tuple:
    """What the listener's rules are rendered from: no backend is named in them (backends are
    map elements), so adding, draining or removing one never writes a rule."""
    return (plan.protocol, int(plan.pin_timeout_s), len(plan.current), plan.family)


def _dispatch_key(plan: ListenerPlan) -> tuple[str, str, int]:
    return plan.dispatch_key


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


def dispatch_map(family: str) -> str:
    """The dispatch map of a family: `dispatch` (IPv4 VIPs) or `dispatch6`."""
    return "dispatch6" if family == "ip6" else "dispatch"


def _flow_tuple(family: str) -> str:
    """The pin key. IPv4: saddr . daddr . sport . dport. IPv6: the address pair's 64-bit
    fingerprint (two jhashes, loaded by `_fingerprint` into the mark and the priority) . sport .
    dport, because nft 1.0.6 cannot add or update a dynamic key longer than 16 bytes (a 40-byte
    IPv6 4-tuple aborts it, as a 5-field IPv4 key does). Two live flows with the same ports whose
    address pairs collide in 64 bits would share a pin: accepted (docs/dataplane.md)."""
    if family == "ip6":
        return "meta mark . meta priority . th sport . th dport"
    return "ip saddr . ip daddr . th sport . th dport"


def _pin_key_type(family: str) -> str:
    if family == "ip6":
        return "mark . classid . inet_service . inet_service"
    return "ipv4_addr . ipv4_addr . inet_service . inet_service"


def _learn_key(family: str) -> tuple[str, str]:
    """(key type, key expression) of the `learn<id>` map (tests, debugging). IPv6: the second
    half of the fingerprint (still in the priority when the hash has overwritten the mark) and the
    ports: a 16-byte key is the most nft 1.0.6 can add from the packet path."""
    if family == "ip6":
        return "classid . inet_service . inet_service", "meta priority . th sport . th dport"
    return "ipv4_addr . ipv4_addr . inet_service . inet_service", _flow_tuple(family)


def _fingerprint(family: str, seed: int) -> str:
    """Statements loading an IPv6 flow's address fingerprint into the mark and the priority
    (nothing for IPv4). The mark is overwritten by the bucket afterwards; the priority is put
    back to 0 before a packet leaves (`_clear_priority`)."""
    if family != "ip6":
        return ""
    a, b = ipv6_fingerprint_seeds(seed)  # lbagent.core.flowhash.ipv6_fingerprint computes the same
    return (f"meta mark set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {a:#x} "
            f"meta priority set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {b:#x} ")


def _fingerprint_mark(family: str, seed: int) -> str:
    """The first half of the fingerprint into the mark again (IPv6; nothing for IPv4): the pin
    rule's `pinok` lookup put the slot there."""
    if family != "ip6":
        return ""
    a, _ = ipv6_fingerprint_seeds(seed)
    return f"meta mark set jhash ip6 saddr . ip6 daddr mod 4294967295 seed {a:#x} "


def _clear_priority(family: str) -> str:
    return "meta priority set 0 " if family == "ip6" else ""


def _flow_hash(family: str) -> str:
    """The 5-tuple hashed into a bucket (lbagent.core.flowhash lays out the same registers)."""
    if family == "ip6":
        return "ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport"
    return "ip saddr . ip daddr . ip protocol . th sport . th dport"


def _family_match(family: str, protocol: str) -> str:
    if family == "ip6":
        return f"meta protocol ip6 meta l4proto {protocol}"
    return f"meta protocol ip ip protocol {protocol}"


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


def _dispatch_ops(verb: str, plans: Sequence[ListenerPlan]) -> list[Op]:
    """`add`/`delete` of the listeners' dispatch entries, one `Op` per family's map."""
    out = []
    for family in FAMILIES:
        mine = [p for p in plans if p.family == family]
        if mine:
            values = [f"jump l{p.listener_id}" for p in mine] if verb == "add" else None
            out.append(Op(verb, dispatch_map(family), [_dispatch_key(p) for p in mine], values,
                          "dispatch", "verdict"))
    return out


class _ElementSender:
    """Writes element batches in order, on a thread of its own once an apply has more than one
    chunk (a whole-document load), so the kernel takes one batch while libnftables compiles the
    next chunk's rules. A failed batch stops the rest; `finish` raises its error."""

    def __init__(self, send) -> None:
        self._send = send
        self._queue: queue.Queue = queue.Queue()
        self._held: list[list[Change]] = []  # batches of an apply that never needed the thread
        self._thread: threading.Thread | None = None
        self._error: NftError | None = None
        self._cancelled = False
        self.batches = 0

    def put(self, batch: list[Change], *, start: bool) -> None:
        if self._error is not None:
            raise self._error
        self.batches += 1
        if self._thread is None and not start:
            self._held.append(batch)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nft-elements", daemon=True)
            self._thread.start()
            for held in self._held:
                self._queue.put(held)
            self._held = []
        self._queue.put(batch)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None and not self._cancelled:
                try:
                    self._send(batch)
                except NftError as exc:
                    self._error = exc

    def finish(self) -> None:
        """Wait for every batch (sent here when no thread was needed)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        else:
            for batch in self._held:
                self._send(batch)
            self._held = []
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancelled = True
        self._held = []
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class NftDataplane:
    """The kernel driver for one mux interface. Not thread-safe: one caller applies.

    Each listener has its own table size (the length of its plan's tables: its `jhash ... mod`)
    and slot (its `offset`, and the high bits of all its keys in the shared sets; `slot_of`).
    No rule names a backend: slot . bucket -> backend MAC is a shared data map (`cur_<g>`), the
    backend's counter a shared object map (`cnt_<g>`, slot . MAC -> named counter), so every
    change but a new listener, a changed idle timeout or table size is elements and counters
    only, written as netlink messages (`nftlink`) to sets at the head of the kernel's list: its
    cost is what changed, not the number of listeners on the mux, and no verdict map means the
    kernel has no jump graph to re-validate at commit. Rules go through libnftables.

    An apply touches only what changed since the last one. A large apply (a whole document)
    sends the rules of all new listeners first (libnftables, at most `batch_listeners`
    listeners per transaction), then the elements in netlink transactions of at most
    `batch_elements` elements each, then the dispatch changes and deletions: a listener
    becomes reachable only once all its objects are in. A first apply on a table an earlier
    process left (a restart) fills a new generation of the shared sets and sends every rule
    after every element (module docstring). The libnftables context is then recreated so the
    daemon gives the memory back.

    Without a netlink writer (`elements=None` with a caller's `nft`: tests that capture the
    text, the `nft` binary fallback) everything goes through libnftables as text, each
    listener's change in one transaction."""

    def __init__(self, iface: str, mux_mac: str, *, seed: int, table_size: int | None = None,
                 table: str = TABLE, learn: bool = False, inject_iface: str | None = None,
                 nft: Nft | None = None, nflog_group: int | None = None,
                 batch_elements: int = 200_000, batch_listeners: int = 1000,
                 elements: NetlinkElements | None = None) -> None:
        if not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"seed {seed} is not a 32-bit value")
        if batch_elements < 1:
            raise ValueError(f"batch_elements {batch_elements} must be positive")
        if batch_listeners < 1:
            raise ValueError(f"batch_listeners {batch_listeners} must be positive")
        self.iface = iface
        self.mux_mac = mux_mac
        self.seed = seed
        self.table_size = table_size  # unused by the rendering: kept for callers that name it
        self.table = table
        self.learn = learn  # learn each flow's bucket in the kernel (tests, debugging): costs a dynset
        self.inject_iface = inject_iface  # where the slow path re-injects decided packets
        # Netlink for elements (the default with our own libnftables context; a caller passing its
        # own `nft` sees every transaction as text unless it passes a writer too).
        self.elements = elements if elements is not None else (NetlinkElements() if nft is None else None)
        self.nft = nft or Nft()
        # None: SYNs of unstable buckets go to NFQUEUE like every other unknown packet (the
        # pre-kernel-SYN behaviour, kept for drivers without an NFLOG reader).
        if nflog_group is not None and not 0 <= nflog_group <= 0xFFFF:
            raise ValueError(f"nflog group {nflog_group} is not 0..65535")
        self.nflog_group = nflog_group
        self.batch_elements = batch_elements
        self.batch_listeners = batch_listeners
        self._applied: dict[int, _Applied] | None = None  # None: the kernel's content is unknown
        self.generation = GENERATIONS[0]  # of the shared sets in use (chosen at each first apply)
        self._slots: dict[int, int] = {}  # listener id -> its slot in the shared sets
        self._free_slots: list[int] = []  # a heap of the slots below _next_slot no listener holds
        self._next_slot = 0
        self._inject_timeouts: dict[str, int] | None = None
        self.transactions = 0  # transactions sent (the bench and tests read it)
        self.netlink_transactions = 0  # of which written as netlink messages
        self.last_changed_listeners = 0  # listeners the last apply wrote (the others were left alone)

    # -- rendering --------------------------------------------------------------------------
    def _t(self) -> str:
        return f"netdev {self.table}"

    def _name(self, kind: str) -> str:
        """The shared set of this kind (cur, unstable, pinok, cnt) of the generation in use."""
        return shared_name(kind, self.generation)

    def _base(self, flush_shared: bool = False) -> list[str]:
        """Objects every listener uses. `add` of an existing object is a no-op: pins survive a
        daemon restart, and the ingress chain keeps dispatching until the apply's last batch.
        The shared sets come first: on an empty table they head the list of sets the kernel
        walks to find one by name. None has a size: a resizable hash that grows with the
        listeners (a declared size is also a limit on the elements)."""
        t = self._t()
        out = [f"add table {t}",
               f"add map {t} {self._name('cur')} {{ type mark : ether_addr; }}",
               f"add set {t} {self._name('unstable')} {{ type mark; }}",
               f"add map {t} {self._name('cnt')} {{ type mark . ether_addr : counter; }}",
               f"add set {t} {self._name('pinok')} {{ type mark . ether_addr; }}"]
        # The one rule that reads `cur`: every listener jumps here after its hash.
        bucket = self._name("bucket")
        out += [f"add chain {t} {bucket}", f"flush chain {t} {bucket}",
                f"add rule {t} {bucket} ether daddr set meta mark map @{self._name('cur')}"]
        if flush_shared:  # both generations in the kernel: this one's content is unknown
            out += [f"flush {'map' if kind in ('cur', 'cnt') else 'set'} {t} {self._name(kind)}"
                    for kind in SHARED]
        for family in FAMILIES:
            for proto in PROTOCOLS:
                out.append(f"add map {t} {pin_map(proto, family)} {{ type {_pin_key_type(family)} "
                           f": ether_addr; size {PIN_MAP_SIZE}; flags timeout; }}")
        out.append(f"add counter {t} slowpath_reinjected")
        # No size: a hash that grows with the listeners (one element each).
        for family in FAMILIES:
            out.append(f"add map {t} {dispatch_map(family)} {{ type {_addr_type(family)} . inet_proto . "
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

    def _listener_rules(self, plan: ListenerPlan, slot: int) -> list[str]:
        t, lid, proto, family = self._t(), plan.listener_id, plan.protocol, plan.family
        chain = f"l{lid}"
        key = _flow_tuple(family)
        pins = pin_map(proto, family)
        _, unstable, pinok, cnt = (self._name(kind) for kind in SHARED)
        base = slot_base(slot)
        fingerprint, clear = _fingerprint(family, self.seed), _clear_priority(family)
        timeout = max(1, int(plan.pin_timeout_s))
        renew = f"update @{pins} {{ {key} timeout {timeout}s : ether daddr }}"
        forward = f'ether saddr set {self.mux_mac} fwd to "{self.iface}"'
        # The backend's counter: the slot (the mark's high bits) and the MAC.
        count = f"counter name meta mark & {MARK_SLOT_MASK:#x} . ether daddr map @{cnt}"
        rules = [
            f"add chain {t} {chain}",
            f"flush chain {t} {chain}",
            f"add rule {t} {chain} counter name l{lid}",
            # Rule 1: a pin to a backend still alive forwards and renews the pin's idle timeout
            # (the flow's packets keep its state alive, however long it lives). A pin to an
            # ended backend (drain deadline passed) rewrote the MAC but does not match the set:
            # the next rule puts the mux's MAC back and the packet goes on like an unpinned one.
            # The slot goes into the mark for the `pinok` lookup (nft 1.0.6 takes no constant in
            # a concatenation). IPv6: the pin key's address fingerprint is loaded first (see
            # _flow_tuple), and its first half again after the lookup, for the renewal.
            f"add rule {t} {chain} {fingerprint}ether daddr set {key} map @{pins} "
            f"meta mark set {base:#x} meta mark . ether daddr @{pinok} {_fingerprint_mark(family, self.seed)}"
            f"{renew} counter name pinned{lid} {clear}{forward}",
            f"add rule {t} {chain} ether daddr set {self.mux_mac}",
            # The listener's own table size: the hash picks one of its len(current) buckets, the
            # offset puts the slot above it (mark = slot << 17 | bucket).
            # (IPv6 without learning: the priority goes back to 0 here.)
            f"add rule {t} {chain} meta mark set jhash {_flow_hash(family)} "
            f"mod {len(plan.current)} seed {self.seed:#x} offset {base:#x}"
            + ("" if self.learn else f" {clear}".rstrip()),
        ]
        if self.learn:
            _, learn_key = _learn_key(family)
            rules.append(f"add rule {t} {chain} add @learn{lid} {{ {learn_key} : meta mark & "
                         f"{MARK_BUCKET_MASK:#x} }} {clear}".rstrip())
        if self.nflog_group is not None and proto == "tcp":
            # Unstable bucket, no pin, not a SYN: up to the stack, where iptables-nft queues it to
            # the slow path (rule 4 needs the owner's answer).
            unknown = f"meta mark @{unstable} tcp flags & (syn | ack) != syn"
        else:
            # UDP has no SYN: every unknown flow of an unstable bucket goes to the slow path.
            unknown = f"meta mark @{unstable}"
        rules += [
            f"add rule {t} {chain} {unknown} counter name slow{lid} accept",
            # The bucket's backend from the current table: the shared chain's one rule, so the
            # `cur` map has one user whatever the number of listeners (the kernel checks every
            # new element of a map against each rule that uses it). A bucket without a backend
            # has no element: the MAC stays the mux's and the next rule drops.
            f"add rule {t} {chain} jump {self._name('bucket')}",
            f"add rule {t} {chain} ether daddr {self.mux_mac} drop",
        ]
        if self.nflog_group is not None and proto == "tcp":
            # Rule 3's SYN case, compiled: a SYN of an unstable bucket has the current table's
            # backend (from `cur`, above), is reported to nfnetlink_log for the owner's record
            # (no verdict: the packet goes on; the mark, slot and bucket, goes with it), pinned
            # to that MAC (first writer wins: `add` never overwrites) and counted. `log` comes
            # before `add`: if the pin map is full the `add` fails and ends this rule; the report
            # is out by then, so the flow still gets its record. In steady state the listener
            # has no `unstable` element and this rule never matches.
            syn = f"add rule {t} {chain} meta mark @{unstable} tcp flags & (syn | ack) == syn "
            if family == "ip6":
                # The fingerprint overwrites the mark (slot and bucket), which the forwarding
                # rule below reads: an IPv6 SYN is counted and forwarded by this rule itself. Its
                # source MAC is the mux's from before the fingerprint: if the `add` fails, the
                # next rule (only such a SYN has the mux's source MAC there) forwards it to the
                # backend it was given.
                rules.append(syn + f"{count} log group {self.nflog_group} snaplen {NFLOG_SNAPLEN6} "
                             f"ether saddr set {self.mux_mac} {fingerprint}"
                             f"add @{pins} {{ {key} timeout {timeout}s : ether daddr }} {clear}"
                             f'counter name newflows{lid} fwd to "{self.iface}"')
                rules.append(f'add rule {t} {chain} ether saddr {self.mux_mac} {clear}fwd to "{self.iface}"')
            else:
                # The forwarding rule below sends it (its bucket is still in the mark), also when
                # the `add` failed.
                rules.append(syn + f"log group {self.nflog_group} snaplen {NFLOG_SNAPLEN} "
                             f"add @{pins} {{ {key} timeout {timeout}s : ether daddr }} "
                             f"counter name newflows{lid}")
        rules += [
            # Rule 2 (and the SYN of rule 3): forwarded to the bucket's backend, counted by slot
            # and MAC.
            f"add rule {t} {chain} {count} {forward}",
            f"add rule {t} {chain} drop",
        ]
        return rules

    def _create_objects(self, plan: ListenerPlan) -> list[str]:
        """The listener's own objects: its counters and (learning) its learn map. Its elements go
        into the shared sets."""
        t, lid = self._t(), plan.listener_id
        out = [f"add counter {t} l{lid}", f"add counter {t} pinned{lid}", f"add counter {t} slow{lid}",
               f"add counter {t} newflows{lid}"]
        if self.learn:
            key_type, _ = _learn_key(plan.family)
            out.append(f"add map {t} learn{lid} {{ type {key_type} : mark; size {MAP_SIZE}; "
                       "flags dynamic; }")
        return out

    def _element_deletions(self, applied: _Applied) -> list[Op]:
        """Deletes of everything a listener holds in the shared sets (its elements are known:
        what this process applied)."""
        plan, slot = applied.plan, applied.slot
        macs = mac_values(plan.backends, plan.current)
        buckets = np.flatnonzero(macs >= 0)
        out: list[Op] = []
        if len(buckets):
            out.append(Op("delete", self._name("cur"), buckets + applied.base, None, "mark", "mac"))
        if applied.unstable:
            out.append(Op("delete", self._name("unstable"),
                          np.array(sorted(applied.unstable), dtype=np.int64) + applied.base))
        if applied.pin_macs:
            out.append(Op("delete", self._name("pinok"), slot_mac_keys(slot, applied.pin_macs), None,
                          "slotmac"))
        if applied.counters:
            out.append(Op("delete", self._name("cnt"), slot_mac_keys(slot, applied.counters), None,
                          "slotmac", "objref"))
        return out

    def _delete_listener(self, applied: _Applied) -> list[Op]:
        lid = applied.plan.listener_id
        # References decide the order: the rules use the sets and counters, the counter map's
        # elements the backend counters. Empty the chain, drop it, the listener's elements, its
        # learn map, the counters.
        return [Op("flush chain", f"l{lid}"), Op("delete chain", f"l{lid}"),
                *self._element_deletions(applied),
                *([Op("delete set", f"learn{lid}", is_map=True)] if self.learn else []),
                *(Op("delete counter", name) for name in applied.counters.values()),
                *(Op("delete counter", f"{prefix}{lid}") for prefix in ("l", "pinned", "slow", "newflows"))]

    # -- applying ---------------------------------------------------------------------------
    def apply(self, plans: Sequence[ListenerPlan], *, changed: Sequence[ListenerPlan] | None = None,
              removed: Collection[int] | None = None) -> None:
        """Make the kernel hold exactly these listeners. Pins live their listener's
        `pin_timeout_s` without a packet; each packet of the flow renews it.

        A change of one listener is one transaction (two when it needs a rule: the rules, then
        its elements). A large apply goes in bounded transactions (see the class).

        A plan that is the very object applied before is skipped without a look: an apply of
        one change among 4,000 listeners walks the plans once (an identity check each) and
        renders, validates and sends only the changed ones. A caller that knows what changed
        (the daemon: the plans of the VIPs it planned again, and the listeners that went) says
        so with `changed` and `removed`, and then not even that walk is made: every plan not in
        `changed` must be the very object of the last apply. Hints whose counts do not add up
        are ignored (every plan is looked at). `last_changed_listeners` says how many listeners
        the last apply wrote to the kernel."""
        plans = list(plans)
        first = self._applied is None
        applied = self._applied if self._applied is not None else {}
        hinted = self._hinted(plans, applied, changed, removed) if not first else None
        if hinted is not None:
            fresh, gone_ids = hinted
            count = len(plans)
        else:
            # The plans that are not the very objects applied before (all of them the first time).
            fresh = plans if first else [p for p in plans if (a := applied.get(p.listener_id)) is None
                                         or a.plan is not p]
            ids = {p.listener_id for p in plans}
            if len(ids) != len(plans):
                self._validate(plans)  # names the duplicate
            gone_ids = applied.keys() - ids
            count = len(ids)
        if count > MAX_SLOTS:
            raise ValueError(f"{count} listeners: a mux holds at most {MAX_SLOTS} (the slot is the "
                             f"mark's high {32 - MARK_BUCKET_BITS} bits)")
        # Dispatch keys and idle timeouts of unchanged plans were checked when they were applied:
        # look at all of them again only when a changed plan could collide or move a maximum.
        rekeyed = any((a := applied.get(p.listener_id)) is None or a.plan.dispatch_key != p.dispatch_key
                      or a.plan.pin_timeout_s != p.pin_timeout_s or a.plan.protocol != p.protocol
                      for p in fresh)
        if first or rekeyed or gone_ids or self._inject_timeouts is None:
            timeouts = self._validate(plans)
        else:
            timeouts = self._inject_timeouts
        existing: dict[tuple[str, str], int | None] | None = None
        flush_shared = False
        if first:
            # Unknown kernel content (first apply of this process, or after an error): fill every
            # planned listener into a new generation of the shared sets and delete what no plan
            # needs, so a restarted daemon never leaves a moment without tables (and keeps the
            # pins).
            existing = self._existing_objects()
            held = [g for g in GENERATIONS if ("map", shared_name("cur", g)) in existing]
            self.generation = GENERATIONS[1] if held == [GENERATIONS[0]] else GENERATIONS[0]
            flush_shared = len(held) == len(GENERATIONS)  # an earlier restart was cut short
            self._applied = {}
            self._slots, self._free_slots, self._next_slot = {}, [], 0
        applied = self._applied
        assert applied is not None
        # A restart: every listener's rules move to the new generation's sets, so they go after
        # all its elements (the new sets are created by the first, base transaction).
        restart = bool(existing)
        self.last_changed_listeners = 0
        # Slots for new listeners: the lowest free ones, never one a listener removed by this
        # same apply still holds (its elements are deleted at the end).
        for p in fresh:
            if p.listener_id not in applied:
                self._take_slot(p.listener_id)

        # What the kernel holds afterwards: the unchanged listeners as they are (a C-level copy),
        # the changed ones as rendered below, the gone ones removed.
        new_applied: dict[int, _Applied] = {} if first else dict(applied)
        for lid in gone_ids:
            new_applied.pop(lid, None)
        # The removed listeners in the order they were applied (walking all only when one went).
        gone = [a for lid, a in applied.items() if lid in gone_ids] if gone_ids and not first else []
        rules: list[str] = self._base(flush_shared) if first else []  # libnftables text, whole listeners
        sent_text = 0
        if restart and self.elements is not None:
            self._send_text(rules)  # the new generation's sets, before any element
            sent_text, rules = 1, []
        deferred: list[list[str]] = []  # a restart's rules, sent after every element
        rules_listeners = 0
        pending: list[list[Change]] = []  # netlink, one list per listener, after `rules`
        ops_elements = 0
        sender = _ElementSender(self._send_ops)
        try:
            for plan in fresh:
                cmds, changes, state = self._listener_changes(plan, applied.get(plan.listener_id), existing)
                new_applied[plan.listener_id] = state
                if not cmds and not changes:
                    continue
                self.last_changed_listeners += 1
                n = op_elements(changes)
                if self.elements is None:
                    # Everything as text, each listener's change whole in one transaction.
                    if rules_listeners and (ops_elements + n > self.batch_elements
                                            or rules_listeners >= self.batch_listeners):
                        self._send_text(rules)
                        sent_text += 1
                        rules, rules_listeners, ops_elements = [], 0, 0
                    rules += [op.text(self._t()) for op in changes] + cmds if restart else \
                        cmds + [op.text(self._t()) for op in changes]
                    rules_listeners += 1
                    ops_elements += n
                    continue
                if cmds:
                    rules += cmds
                    rules_listeners += 1
                if changes:
                    pending.append(changes)
                if rules_listeners >= self.batch_listeners:
                    # A chunk: its rules now, its elements to the sender thread, which writes them
                    # while libnftables compiles the next chunk's rules (two cores, and ctypes
                    # and socket calls release the GIL). A restart keeps the rules for the end.
                    if restart:
                        deferred.append(rules)
                        rules = []
                    sent_text += self._flush_chunk(rules, pending, sender, final=False)
                    rules, rules_listeners, pending = [], 0, []
            if self.elements is None:
                last = self._last_commands(plans, fresh, gone, applied, new_applied, existing, timeouts,
                                           first)
                rules += [op.text(self._t()) if isinstance(op, Op) else op for op in last]
                if rules:
                    self._send_text(rules)
                    sent_text += 1
            else:
                # Rules first (libnftables compiles a chunk's rules while the sender thread
                # writes the previous chunk's elements; a new listener is unreachable until its
                # dispatch entry anyway), then its elements, then the dispatch and deletions.
                # A restart: every element, then the rules that move listeners to them.
                if restart:
                    deferred.append(rules)
                    rules = []
                sent_text += self._flush_chunk(rules, pending, sender, final=True)
                sender.finish()
                for chunk in deferred:
                    if chunk:
                        self._send_text(chunk)
                        sent_text += 1
                last = self._last_commands(plans, fresh, gone, applied, new_applied, existing, timeouts,
                                           first)
                last_ops = [c for c in last if isinstance(c, Op)]
                last_text = [c for c in last if isinstance(c, str)]
                if last_ops:
                    self._send_ops(last_ops)
                if last_text:
                    self._send_text(last_text)
                    sent_text += 1
            if sent_text > 1 or sender.batches > 1:
                self._fresh_context()
        except NftError:
            sender.cancel()
            self._applied = None  # unknown again: the next apply rebuilds from the kernel's listing
            self._inject_timeouts = None
            raise
        for lid in self._slots.keys() - new_applied.keys():
            # Gone listeners' elements are deleted: their slots may serve new listeners.
            self._release_slot(self._slots.pop(lid))
        self._applied = new_applied
        self._inject_timeouts = timeouts

    @staticmethod
    def _hinted(plans: list[ListenerPlan], applied: dict[int, _Applied],
                changed: Sequence[ListenerPlan] | None,
                removed: Collection[int] | None) -> tuple[list[ListenerPlan], set[int]] | None:
        """(the fresh plans, the gone listener ids) from the caller's hints, or None when there
        are none or they do not add up: the plans must then be what was applied, minus the
        removed listeners, plus the new ones, each listener once."""
        if changed is None or removed is None:
            return None
        fresh = [p for p in changed if (a := applied.get(p.listener_id)) is None or a.plan is not p]
        fresh_ids = {p.listener_id for p in fresh}
        gone_ids = applied.keys() & set(removed)
        added = len(fresh_ids - applied.keys())
        if len(fresh_ids) != len(fresh) or fresh_ids & gone_ids \
                or len(plans) != len(applied) - len(gone_ids) + added:
            return None
        return fresh, gone_ids

    def _take_slot(self, listener_id: int) -> int:
        if listener_id in self._slots:  # taken by an apply that failed before sending anything
            return self._slots[listener_id]
        slot = heapq.heappop(self._free_slots) if self._free_slots else self._next_slot
        if slot == self._next_slot:
            self._next_slot += 1
        self._slots[listener_id] = slot
        return slot

    def _release_slot(self, slot: int) -> None:
        heapq.heappush(self._free_slots, slot)

    def slot_of(self, listener_id: int) -> int:
        """The listener's slot in the shared sets (its keys are `slot << 17 | ...`)."""
        applied = self._applied.get(listener_id) if self._applied is not None else None
        if applied is None:
            raise KeyError(f"listener {listener_id} is not applied")
        return applied.slot

    @staticmethod
    def _validate(plans: Sequence[ListenerPlan]) -> dict[str, int]:
        """Raise ValueError for a listener id or a dispatch key (VIP, protocol, port) that appears
        twice; return each protocol's longest pin timeout (the injection rules')."""
        ids: set[int] = set()
        keys: set[tuple[str, str, int]] = set()
        longest: dict[str, float] = {}
        for p in plans:
            if p.listener_id in ids:
                raise ValueError(f"listener id {p.listener_id} appears twice")
            ids.add(p.listener_id)
            key = p.dispatch_key
            if key in keys:
                vip, protocol, port = key
                raise ValueError(f"two listeners share address, protocol and port {vip} {protocol} {port}")
            keys.add(key)
            if p.pin_timeout_s > longest.get(p.protocol, 0):
                longest[p.protocol] = p.pin_timeout_s
        timeouts: dict[str, int] = {proto: 60 for proto in PROTOCOLS}
        timeouts.update({proto: max(1, int(v)) for proto, v in longest.items()})
        return timeouts

    def _flush_chunk(self, rules: list[str], pending: list[list[Change]], sender: _ElementSender,
                     *, final: bool) -> int:
        """Send a chunk's rules (libnftables, here) and hand its elements to `sender` in batches
        of at most `batch_elements` (whole listeners). Returns the text transactions sent."""
        sent = 0
        if rules:
            self._send_text(rules)
            sent = 1
        batch: list[Change] = []
        size = 0
        for changes in pending:
            n = op_elements(changes)
            if batch and size + n > self.batch_elements:
                sender.put(batch, start=not final or sender.batches > 0)
                batch, size = [], 0
            batch += changes
            size += n
        if batch:
            sender.put(batch, start=not final)
        return sent

    def _send_text(self, lines: list[str]) -> None:
        self.nft.run("\n".join(lines) + "\n")
        self.transactions += 1

    def _send_ops(self, ops: list[Change]) -> None:
        assert self.elements is not None
        try:
            self.elements.run(self.table, ops)
        except NetlinkError as exc:
            raise NftError(str(exc)) from exc
        self.transactions += 1
        self.netlink_transactions += 1

    def _last_commands(self, plans: Sequence[ListenerPlan], fresh: Sequence[ListenerPlan],
                       gone: Sequence[_Applied], applied: dict[int, _Applied],
                       new_applied: dict[int, _Applied],
                       existing: dict[tuple[str, str], int | None] | None,
                       timeouts: dict[str, int], first: bool) -> list[str | Op]:
        """The apply's last transaction(s): the dispatch map (a listener becomes reachable once all
        its objects are in), the injection rules, then whatever no plan needs any more."""
        t = self._t()
        last: list[str | Op] = []
        if first:
            last.append(f"flush chain {t} ingress")
            last += [f"add rule {t} ingress {f} daddr . meta l4proto . th dport vmap @{dispatch_map(f)}"
                     for f in FAMILIES]
            last += [f"flush map {t} {dispatch_map(f)}" for f in FAMILIES]
            last += [op.text(t) for op in _dispatch_ops("add", plans)]
        else:
            # Only listeners whose plan is not the very object applied before can have moved
            # (a same-object plan is skipped without a look: a change costs what changed).
            moved = [p.listener_id for p in fresh]
            rekeyed = {lid for lid in moved if lid in applied
                       and _dispatch_key(applied[lid].plan) != _dispatch_key(new_applied[lid].plan)}
            last += _dispatch_ops("delete", [a.plan for a in gone]
                                  + [applied[lid].plan for lid in moved if lid in rekeyed])
            last += _dispatch_ops("add", [new_applied[lid].plan for lid in moved
                                          if lid not in applied or lid in rekeyed])
        if first or timeouts != self._inject_timeouts:
            last += self._inject(timeouts)
        for a in gone:
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
                          ) -> tuple[list[str], list[Change], _Applied]:
        """(rule commands, element changes, what the kernel holds after them) for one listener.
        Rule commands are libnftables text; element changes netlink (or text) `Op`s."""
        if prev is not None and prev.plan is plan:
            return [], [], prev  # the very plan applied before: nothing can have changed
        t, lid, size = self._t(), plan.listener_id, len(plan.current)
        slot = self._slots[lid]
        base = slot_base(slot)
        pin_macs = tuple(sorted(set(plan.pin_macs)))
        key = _rules_key(plan)
        unstable_arr = plan.unstable
        if (prev is not None and prev.rules_key == key and prev.pin_macs == pin_macs
                and prev.plan.backends == plan.backends and prev.plan.vip == plan.vip
                and prev.plan.port == plan.port
                and _same(plan.current, prev.plan.current) and _same(unstable_arr, prev.plan.unstable)):
            # The same tables (usually the very same arrays: the daemon caches generations):
            # nothing to send and nothing to recompute.
            return [], [], _Applied(plan, prev.unstable, key, pin_macs, prev.counters, slot)
        counters = _counters_by_mac(plan)
        unstable = set(unstable_arr.tolist()) if unstable_arr is not None else set()
        state = _Applied(plan, unstable, key, pin_macs, counters, slot)
        cmds: list[str] = []
        if prev is None:
            if existing is not None and self.learn:
                # A learn map left by a listener of the other address family: its key type
                # differs, recreate it (the chain's rules reference it: empty the chain first).
                learned = existing.get(("map", f"learn{lid}"), -1)
                if learned != -1 and (learned == _LEARN_IP6) != (plan.family == "ip6"):
                    cmds += [f"flush chain {t} l{lid}", f"delete map {t} learn{lid}"]
            cmds += self._create_objects(plan) + self._listener_rules(plan, slot)
            return cmds, self._fill(plan, slot, pin_macs, counters, unstable), state
        ops: list[Change] = []
        resize = len(prev.plan.current) != size
        if self.learn and prev.plan.family != plan.family:
            # The learn map's key type follows the family: recreate it with the rules.
            cmds += [f"flush chain {t} l{lid}", f"delete map {t} learn{lid}"]
            cmds += self._create_objects(plan)
        if prev.rules_key != key:
            cmds += self._listener_rules(plan, slot)
        # Counters of new backends before the elements that reference them; removed backends'
        # counters after (an element holds a reference).
        added_counters = {m: n for m, n in counters.items() if prev.counters.get(m) != n}
        gone_counters = {m: n for m, n in prev.counters.items() if counters.get(m) != n}
        ops += [Op("add counter", name) for name in added_counters.values()]
        cnt, pinok, unstable_set = self._name("cnt"), self._name("pinok"), self._name("unstable")
        if gone_counters:
            ops.append(Op("delete", cnt, slot_mac_keys(slot, gone_counters), None, "slotmac", "objref"))
        if added_counters:
            ops.append(Op("add", cnt, slot_mac_keys(slot, added_counters), list(added_counters.values()),
                          "slotmac", "objref"))
        if prev.pin_macs != pin_macs:
            # The set is shared: the listener's own elements out and in, not a flush.
            gone_macs = sorted(set(prev.pin_macs) - set(pin_macs))
            new_macs = sorted(set(pin_macs) - set(prev.pin_macs))
            if gone_macs:
                ops.append(Op("delete", pinok, slot_mac_keys(slot, gone_macs), None, "slotmac"))
            if new_macs:
                ops.append(Op("add", pinok, slot_mac_keys(slot, new_macs), None, "slotmac"))
        ops += self._diff_cur(lid, base, mac_values(prev.plan.backends, prev.plan.current),
                              mac_values(plan.backends, plan.current))
        gone, added = prev.unstable - unstable, unstable - prev.unstable
        if gone:
            ops.append(Op("delete", unstable_set, np.array(sorted(gone), dtype=np.int64) + base))
        if added:
            ops.append(Op("add", unstable_set, np.array(sorted(added), dtype=np.int64) + base))
        still_used = set(counters.values())
        ops += [Op("delete counter", name) for name in gone_counters.values() if name not in still_used]
        if resize:
            # Another table size: the new hash and the new table in one libnftables transaction
            # (the listener is never without its table, nor hashed over another size's).
            cmds += [op.text(t) for op in ops]
            ops = []
        return cmds, ops, state

    def _fill(self, plan: ListenerPlan, slot: int, pin_macs: tuple[str, ...], counters: dict[int, str],
              unstable: set[int]) -> list[Change]:
        """A listener's whole content in the shared sets (a new listener, or every listener into
        a new generation)."""
        base = slot_base(slot)
        ops: list[Change] = [Op("add counter", name) for name in counters.values()]
        if counters:
            ops.append(Op("add", self._name("cnt"), slot_mac_keys(slot, counters), list(counters.values()),
                          "slotmac", "objref"))
        if pin_macs:
            ops.append(Op("add", self._name("pinok"), slot_mac_keys(slot, pin_macs), None, "slotmac"))
        ops.append(FillOp(self._name("cur"), plan.backends, plan.current, base))
        if unstable:
            ops.append(Op("add", self._name("unstable"), np.array(sorted(unstable), dtype=np.int64) + base))
        return ops

    def _diff_cur(self, lid: int, base: int, before: np.ndarray, after: np.ndarray) -> list[Op]:
        """The listener's `cur` elements from `before` to `after` (each bucket's backend MAC, -1:
        none; another table size compares bucket by bucket): only the buckets whose MAC changed.
        An element cannot be re-added with another value: delete and add in the same
        transaction."""
        if len(before) != len(after):
            n = max(len(before), len(after))
            before = np.concatenate([before, np.full(n - len(before), -1, dtype=np.int64)])
            after = np.concatenate([after, np.full(n - len(after), -1, dtype=np.int64)])
        changed = np.flatnonzero(before != after)
        if len(changed) == 0:
            return []
        out = []
        cur = self._name("cur")
        drop = changed[before[changed] >= 0]
        if len(drop):
            out.append(Op("delete", cur, drop + base, None, "mark", "mac"))
        put = changed[after[changed] >= 0]
        if len(put):
            out.append(Op("add", cur, put + base, after[put], "mark", "mac"))
        return out

    def _existing_objects(self) -> dict[tuple[str, str], int | None]:
        """(kind, name) of the chains, maps, sets and counters the kernel holds in our table,
        each with its declared size (maps and sets; None for the rest; for a `learn` map
        `_LEARN_IP6` when its key is an IPv6 listener's).

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
                    size = obj.get("size")
                    if kind == "map" and obj["name"].startswith("learn") and "classid" in obj.get("type", ()):
                        size = _LEARN_IP6
                    found[(kind, obj["name"])] = size
        if found:
            with contextlib.suppress(NftError):  # the table went away meanwhile: nothing to keep
                found.update({("counter", name): None for name in read_counters(self.table)})
        return found

    def _delete_stale(self, existing: set[tuple[str, str]], plans: Sequence[ListenerPlan]) -> list[str]:
        """Commands deleting objects left by an earlier process that no plan uses (pins stay):
        the other generation's shared sets, an older format's per-listener sets and chains, gone
        listeners' chains and counters."""
        keep = {("chain", "ingress"), ("chain", "inject"), ("counter", "slowpath_reinjected")}
        keep |= {("map", dispatch_map(f)) for f in FAMILIES}
        keep |= {("map", pin_map(p, f)) for p in PROTOCOLS for f in FAMILIES}
        keep |= {("map" if kind in ("cur", "cnt") else "set", self._name(kind)) for kind in SHARED}
        keep.add(("chain", self._name("bucket")))
        for plan in plans:
            lid = plan.listener_id
            keep |= {("chain", f"l{lid}"), ("map", f"learn{lid}"),
                     ("counter", f"l{lid}"), ("counter", f"pinned{lid}"), ("counter", f"slow{lid}"),
                     ("counter", f"newflows{lid}")}
            keep |= {("counter", name) for name in _counters_by_mac(plan).values()}
        stale = existing - keep
        t = self._t()
        chains = sorted(n for k, n in stale if k == "chain")
        # Rules reference maps and maps (of an older format) chains: empty chains, drop maps,
        # then chains, then counters (no map element references them any more).
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
    def counters(self, prefixes: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
        """Every named counter of the table (or those whose names start with one of `prefixes`):
        name -> (packets, bytes). Read over netlink: any `nft list` loads every map element
        first (seconds with 65537-bucket maps)."""
        return read_counters(self.table, prefixes=prefixes)

    def pin_count(self, protocol: str, family: str = "ip") -> int:
        """Pins of a protocol's IPv4 (or, family "ip6", IPv6) flows."""
        out = self.nft.run(f"list map {self._t()} {pin_map(protocol, family)}", json_output=True)
        for item in json.loads(out)["nftables"]:
            if "map" in item:
                return len(item["map"].get("elem", []))
        return 0

    def pins_with_idle(self, protocol: str,
                       nft: Nft | None = None) -> list[tuple[int, int, int, int, str, int]]:
        """Every IPv4 pin of a protocol: (saddr, daddr, sport, dport as integers, MAC, seconds since
        the flow's last packet renewed it). Costs an `nft list` of the map (about 1.6 s per 65,000
        pins): the keep-alive thread does it once per round, only while listeners are in transition,
        with its own context (`nft`) so the main loop's applies never wait for it. (IPv6 pins are
        keyed by a fingerprint of the addresses, not the addresses: `pins6_with_idle`.)"""
        out = (nft or self.nft).run(f"list map {self._t()} {pin_map(protocol, 'ip')}", json_output=True)
        result: list[tuple[int, int, int, int, str, int]] = []
        for item in json.loads(out)["nftables"]:
            for elem in item.get("map", {}).get("elem", []):
                key, mac = elem
                meta = key.get("elem", {}) if isinstance(key, dict) else {}
                parts = meta.get("val", key)["concat"] if isinstance(key, dict) else key
                idle = int(meta.get("timeout", 0)) - int(meta.get("expires", meta.get("timeout", 0)))
                result.append((int.from_bytes(socket.inet_aton(parts[0]), "big"),
                               int.from_bytes(socket.inet_aton(parts[1]), "big"),
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
