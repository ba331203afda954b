"""Reader of the kernel's new-flow notifications (nfnetlink_log) for the owners' records.

During a transition the kernel handles a SYN of an unstable bucket itself (decision rule 3,
compiled into each backend chain by lbagent.dataplane.nft): it pins the flow to the current
table's backend, forwards it, and copies its first `NFLOG_SNAPLEN` bytes to nfnetlink_log group G
with no verdict. This module reads those copies and hands each flow (addresses, ports, bucket from
the mark's low bits: the rules mark `slot << 17 | bucket`, `bucket_of_mark`) to a callback in
batches (numpy arrays); the daemon decides each batch with
`decide_new_flows_batch` (rule 3's SYN case, equal to `decide(...)` flow by flow) and records it
at the owners. Nothing here decides.

Why a raw netlink socket and not a per-packet callback library (libnetfilter_log bindings):
the whole point is rate. The kernel batches up to `qthreshold` messages into one netlink skb
(or flushes after `flush_timeout_cs`); one `recv_into` then returns hundreds of notifications,
nearly always of one layout (same length, same attributes). The attribute offsets are learned
once per layout (a full attribute walk only when it changes) and every run of same-layout
messages in the buffer is parsed at once with numpy, verified by its attribute-type bytes; a lone
message of another layout is parsed on its own with `struct`. A library callback costs a Python
call per packet plus its own parsing, for the same result.

Losing a notification is not fatal and is counted: the flow is pinned and forwarded by the kernel
anyway; only its record at the owner is missing, so if the flow later moves to another mux (mux
failure, ECMP change) that mux asks the owner, which has no record and answers the stateless
fallback (the oldest live table's backend). Losses are seen as gaps in nfnetlink_log's per-group
sequence numbers and as ENOBUFS (the socket overflowed before we read it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lbagent.core.flowhash import MARK_BUCKET_MASK, bucket_of_mark

log = logging.getLogger("lbagent.nflog")

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET, _NFULNL_MSG_CONFIG = 0, 1
_NFULA_CFG_CMD, _NFULA_CFG_MODE, _NFULA_CFG_NLBUFSIZ = 1, 2, 3
_NFULA_CFG_TIMEOUT, _NFULA_CFG_QTHRESH, _NFULA_CFG_FLAGS = 4, 5, 6
_NFULNL_CFG_CMD_BIND, _NFULNL_CFG_CMD_UNBIND = 1, 2
_NFULNL_COPY_PACKET = 2
_NFULNL_CFG_F_SEQ = 0x0001
_NFULA_MARK, _NFULA_PAYLOAD, _NFULA_SEQ = 2, 9, 12
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_SO_RCVBUFFORCE = 33
_PACKET_TYPE = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_PACKET

# A new flow as the kernel saw it: (saddr, daddr, protocol, sport, dport, bucket), addresses as
# integers (the FlowKey of lbagent.core.records plus the bucket).
NewFlow = tuple[int, int, int, int, int, int]


@dataclass
class NflogStats:
    messages: int = 0  # notifications parsed
    batches: int = 0  # recv() calls that returned data
    lost: int = 0  # notifications the kernel numbered but we never read (seq gaps)
    overruns: int = 0  # ENOBUFS: the socket overflowed (the lost ones show up as seq gaps)
    malformed: int = 0  # not an IPv4 TCP/UDP header


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def config_message(group: int, attrs: bytes, seq: int) -> bytes:
    """One NFULNL_MSG_CONFIG request for `group` (AF_UNSPEC, acknowledged)."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    msg_type = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


def _attr_offsets(buf: bytes | memoryview, start: int, end: int) -> tuple[int, int, int]:
    """Offsets (from the message start) of the MARK, SEQ and PAYLOAD attribute values; -1 if absent."""
    mark = seq = payload = -1
    pos = start + 20  # nlmsghdr (16) + nfgenmsg (4)
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, pos)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == _NFULA_MARK:
            mark = pos + 4 - start
        elif kind == _NFULA_SEQ:
            seq = pos + 4 - start
        elif kind == _NFULA_PAYLOAD:
            payload = pos + 4 - start
        pos += (length + 3) & ~3
    return mark, seq, payload


class NflogReader:
    """Reads nfnetlink_log group `group` in a thread and calls `on_batch(flows)` once per receive
    batch (on the reader thread), `flows` an (n, 6) int64 array of NewFlow rows. Must be created
    in the network namespace of the mux."""

    def __init__(self, group: int, on_batch: Callable[[np.ndarray], None], *, snaplen: int = 40,
                 qthreshold: int = 512, flush_timeout_cs: int = 1, nlbufsiz: int = 131072,
                 rcvbuf: int = 64 << 20, copy_range: int | None = None) -> None:
        self.group = group
        self.on_batch = on_batch
        self.snaplen = snaplen  # what an IPv4 report holds (the rule's snaplen)
        # Bytes the kernel may copy per report (the smaller of this and the rule's snaplen): an
        # IPv6 report needs 44 (fixed header + ports).
        self.copy_range = max(snaplen, copy_range or snaplen)
        # A report is about 200 bytes; the kernel sends its skb when `qthreshold` reports are in
        # it, when it is full, or after `flush_timeout_cs` (1/100 s: records follow within 10 ms at
        # low rates). The socket buffer is charged each skb's full size (`nlbufsiz`, which the
        # kernel caps at 128 KiB), so under load full skbs (~600 reports) make the 64 MiB buffer
        # hold ~300,000 reports before any is lost: a burst faster than the reader is absorbed
        # (records lag) rather than lost.
        self.qthreshold = qthreshold
        self.flush_timeout_cs = flush_timeout_cs
        self.nlbufsiz = nlbufsiz
        self.rcvbuf = rcvbuf
        self.stats = NflogStats()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_seq: int | None = None
        self._layouts: dict[int, tuple[int, int, int]] = {}  # message length -> attribute offsets

    def _configure(self, sock: socket.socket, attrs: bytes, seq: int, what: str) -> None:
        sock.send(config_message(self.group, attrs, seq))
        while True:
            data = sock.recv(65536)
            _length, kind, _flags, rseq, _pid = struct.unpack_from("=IHHII", data)
            if kind == _NLMSG_ERROR and rseq == seq:
                (err,) = struct.unpack_from("=i", data, 16)
                if err:
                    name = errno.errorcode.get(-err)
                    raise OSError(-err, f"nfnetlink_log group {self.group}: {what}: {name}")
                return

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            with contextlib.suppress(OSError):  # as root: past net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.rcvbuf)
            # Another process bound to the group (an earlier daemon killed with -9 releases it with
            # its socket, so this only fails while one really runs): the kernel says EPERM.
            self._configure(sock, _nla(_NFULA_CFG_CMD, struct.pack("B", _NFULNL_CFG_CMD_BIND)), 1, "bind")
            mode = struct.pack("!IBB", self.copy_range, _NFULNL_COPY_PACKET, 0)
            self._configure(sock, _nla(_NFULA_CFG_MODE, mode)
                            + _nla(_NFULA_CFG_NLBUFSIZ, struct.pack("!I", self.nlbufsiz))
                            + _nla(_NFULA_CFG_QTHRESH, struct.pack("!I", self.qthreshold))
                            + _nla(_NFULA_CFG_TIMEOUT, struct.pack("!I", self.flush_timeout_cs))
                            + _nla(_NFULA_CFG_FLAGS, struct.pack("!H", _NFULNL_CFG_F_SEQ)), 2, "configure")
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def start(self) -> None:
        if self._sock is None:
            self.open()
        self._thread = threading.Thread(target=self._loop, name="nflog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(config_message(self.group, _nla(_NFULA_CFG_CMD, struct.pack(
                    "B", _NFULNL_CFG_CMD_UNBIND)), 3))
            self._sock.close()
            self._sock = None

    def _loop(self) -> None:
        assert self._sock is not None
        sock = self._sock
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            chunks: list[np.ndarray] = []
            # Drain what is there now (several kernel skbs), then hand over one batch.
            for _ in range(64):
                try:
                    n = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self.stats.overruns += 1  # the missing ones appear as a seq gap next
                        continue
                    # Anything else is unexpected on a bound netlink socket: say so, keep reading
                    # (a dead reader would silently stop every record of the kernel's new flows).
                    log.error("reading nfnetlink_log group %d: %s", self.group, exc)
                    self._stop.wait(0.1)
                    break
                if n == 0:
                    break
                self.stats.batches += 1
                parsed = self.parse(buf, n)
                if len(parsed):
                    # parse returns new arrays: the next recv_into may reuse `buf`
                    chunks.append(parsed)
            if chunks:
                flows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
                try:
                    self.on_batch(flows)
                except Exception:  # a bug in bookkeeping must not stop the reader
                    log.exception("new-flow batch of %d failed", len(flows))

    def parse(self, buf: bytes | bytearray, n: int) -> np.ndarray:
        """The flows of the netlink messages in buf[:n]: an (k, 6) int64 array of saddr, daddr,
        protocol, sport, dport, bucket (the NewFlow fields). With an IPv6 report among them the
        array is of dtype object (Python integers: a 128-bit address does not fit int64)."""
        pos = 0
        unpack = struct.unpack_from
        runs: list[np.ndarray] = []
        singles: list[NewFlow] = []
        singles6: list[NewFlow] = []
        while pos + 16 <= n:
            length, kind = unpack("=IH", buf, pos)
            if length < 16 or pos + length > n:
                break
            stride = (length + 3) & ~3
            if kind != _PACKET_TYPE:
                pos += stride
                continue
            offs = self._layout(buf, pos, length)
            if offs is None:
                self.stats.malformed += 1
                pos += stride
                continue
            if buf[pos + offs[2]] >> 4 == 6:
                # IPv6: one by one in Python (about a microsecond each; the vectorised parser
                # reads IPv4 rows)
                self._parse_one6(buf, pos, length, offs, singles6)
                pos += stride
                continue
            # The kernel fills a receive buffer with hundreds of reports of one layout: parse
            # those with numpy, all at once (a per-message Python parse costs a microsecond or
            # more each); a lone report of another layout is parsed on its own.
            if pos + 2 * stride <= n and buf[pos:pos + 6] == buf[pos + stride:pos + stride + 6]:
                if singles:
                    runs.append(np.array(singles, dtype=np.int64).reshape(-1, 6))
                    singles = []
                count, flows = self._parse_run(buf, pos, n, length, offs)
                runs.append(flows)
                pos += count * stride
            else:
                self._parse_one(buf, pos, offs, singles)
                pos += stride
        if singles:
            runs.append(np.array(singles, dtype=np.int64).reshape(-1, 6))
        if singles6:
            wide = np.empty((len(singles6), 6), dtype=object)
            wide[:] = singles6
            runs = [r.astype(object) for r in runs] + [wide]
        if not runs:
            return np.empty((0, 6), dtype=np.int64)
        return runs[0] if len(runs) == 1 else np.concatenate(runs)

    def _parse_one6(self, buf: bytes | bytearray, pos: int, length: int, offs: tuple[int, int, int],
                    out: list[NewFlow]) -> None:
        """One IPv6 report: the fixed header's addresses and next header, the ports after it (a
        SYN with extension headers gets no record: counted malformed; the kernel pinned it)."""
        unpack = struct.unpack_from
        mark_off, seq_off, p = offs
        if seq_off >= 0:
            (seq,) = unpack("!I", buf, pos + seq_off)
            expected = self._next_seq
            if expected is not None and seq != expected:
                self.stats.lost += (seq - expected) & 0xFFFFFFFF
            self._next_seq = (seq + 1) & 0xFFFFFFFF
        bucket = bucket_of_mark(unpack("!I", buf, pos + mark_off)[0]) if mark_off >= 0 else 0
        start = pos + p
        proto = buf[start + 6]
        if proto not in (6, 17) or p + 44 > length:
            self.stats.malformed += 1
            return
        saddr = int.from_bytes(buf[start + 8:start + 24], "big")
        daddr = int.from_bytes(buf[start + 24:start + 40], "big")
        sport, dport = unpack("!HH", buf, start + 40)
        out.append((saddr, daddr, proto, sport, dport, bucket))
        self.stats.messages += 1

    def _layout(self, buf: bytes | bytearray, pos: int, length: int) -> tuple[int, int, int] | None:
        """Attribute offsets of the message at `pos`: learned once per message length and
        verified by the attribute types (the type sits 2 bytes before each value); a full walk
        only when they do not match. None if it carries no payload."""
        offs = self._layouts.get(length)
        if (offs is None
                or (offs[0] >= 0 and buf[pos + offs[0] - 2] != _NFULA_MARK)
                or (offs[1] >= 0 and buf[pos + offs[1] - 2] != _NFULA_SEQ)
                or buf[pos + offs[2] - 2] != _NFULA_PAYLOAD):
            offs = _attr_offsets(buf, pos, pos + length)
            if offs[2] < 0:
                return None
            self._layouts[length] = offs
        return offs

    def _count_seq(self, seqs: np.ndarray) -> None:
        """Count the gaps in nfnetlink_log's sequence numbers (int64 array, in order)."""
        expected = np.empty_like(seqs)
        expected[0] = seqs[0] if self._next_seq is None else self._next_seq
        expected[1:] = (seqs[:-1] + 1) & 0xFFFFFFFF
        self.stats.lost += int(((seqs - expected) & 0xFFFFFFFF).sum())
        self._next_seq = int(seqs[-1] + 1) & 0xFFFFFFFF

    def _parse_run(self, buf: bytes | bytearray, pos: int, n: int, length: int,
                   offs: tuple[int, int, int]) -> tuple[int, np.ndarray]:
        """Parse the consecutive messages from `pos` that share the first one's length, type and
        attribute layout: (how many, their flows)."""
        stride = (length + 3) & ~3
        rows = np.ndarray(((n - pos) // stride, stride), dtype=np.uint8, buffer=buf, offset=pos,
                          strides=(stride, 1))
        same = np.all(rows[:, :6] == rows[0, :6], axis=1)  # length and message type
        mark_off, seq_off, p = offs
        for off, kind in ((mark_off, _NFULA_MARK), (seq_off, _NFULA_SEQ), (p, _NFULA_PAYLOAD)):
            if off >= 0:
                same &= rows[:, off - 2] == kind
        count = len(same) if same.all() else int(np.argmin(same))  # row 0 is known good
        rows = rows[:count]

        def be32(off: int) -> np.ndarray:
            r = rows[:, off:off + 4].astype(np.int64)
            return (r[:, 0] << 24) | (r[:, 1] << 16) | (r[:, 2] << 8) | r[:, 3]

        if seq_off >= 0:
            self._count_seq(be32(seq_off))
        vihl, proto = rows[:, p], rows[:, p + 9]
        ihl = (vihl & 0x0F).astype(np.int64) * 4
        # Headers with IP options long enough to push the ports past the snapshot: no record (the
        # kernel pinned the flow anyway), counted.
        good = ((vihl >> 4) == 4) & ((proto == 6) | (proto == 17)) & (ihl + 4 <= self.snaplen) \
            & (p + ihl + 4 <= length)
        ports_at = np.where(good, p + ihl, p)  # stay inside the row for the bad ones
        at = np.arange(count)

        def be16(off: np.ndarray) -> np.ndarray:
            return (rows[at, off].astype(np.int64) << 8) | rows[at, off + 1]

        flows = np.stack([be32(p + 12), be32(p + 16), proto.astype(np.int64), be16(ports_at),
                          be16(ports_at + 2),
                          be32(mark_off) & MARK_BUCKET_MASK if mark_off >= 0
                          else np.zeros(count, dtype=np.int64)], axis=1)
        n_good = int(np.count_nonzero(good))
        self.stats.messages += n_good
        self.stats.malformed += count - n_good
        return count, (flows if n_good == count else flows[good])

    def _parse_one(self, buf: bytes | bytearray, pos: int, offs: tuple[int, int, int],
                   out: list[NewFlow]) -> None:
        unpack = struct.unpack_from
        stats = self.stats
        mark_off, seq_off, p = offs
        if seq_off >= 0:
            (seq,) = unpack("!I", buf, pos + seq_off)
            expected = self._next_seq
            if expected is not None and seq != expected:
                stats.lost += (seq - expected) & 0xFFFFFFFF
            self._next_seq = (seq + 1) & 0xFFFFFFFF
        bucket = bucket_of_mark(unpack("!I", buf, pos + mark_off)[0]) if mark_off >= 0 else 0  # no mark: 0
        p += pos
        vihl = buf[p]
        proto = buf[p + 9]
        if vihl >> 4 != 4 or proto not in (6, 17) or (vihl & 0x0F) * 4 + 4 > self.snaplen:
            stats.malformed += 1
            return
        saddr, daddr = unpack("!II", buf, p + 12)
        sport, dport = unpack("!HH", buf, p + (vihl & 0x0F) * 4)
        out.append((saddr, daddr, proto, sport, dport, bucket))
        stats.messages += 1
