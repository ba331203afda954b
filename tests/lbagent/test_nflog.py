"""Parsing of nfnetlink_log new-flow reports (no root): the messages are laid out as the kernel
sends them from a netdev `log group` rule (attributes seen on kernel 6.18); the lab test
tests/lab/test_kernel_syn.py reads the real thing."""

from __future__ import annotations

import socket
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.dataplane.nflog import _PACKET_TYPE, NflogReader, _nla


def _report(saddr: str, sport: int, seq: int, mark: int | None, *, with_uid: bool = False) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 0, 0x4000, 64, 6, 0, socket.inet_aton(saddr),
                     socket.inet_aton("203.0.113.14"))
    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    attrs = _nla(1, b"\x08\x00\x00\x00") + _nla(10, b"\0") + _nla(4, struct.pack("!I", 2))
    if mark is not None:
        attrs += _nla(2, struct.pack("!I", mark))
    attrs += _nla(8, bytes(12)) + _nla(15, b"\x00\x01") + _nla(17, b"\x00\x0e") + _nla(16, bytes(14))
    attrs += _nla(3, bytes(16))
    if with_uid:
        attrs += _nla(11, bytes(4)) + _nla(14, bytes(4))
    attrs += _nla(12, struct.pack("!I", seq)) + _nla(21, bytes(14)) + _nla(9, (ip + tcp)[:40])
    body = struct.pack("=BBH", 2, 0, socket.htons(7)) + attrs
    return struct.pack("=IHHII", 16 + len(body), _PACKET_TYPE, 0, 0, 0) + body


def _ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def test_reports_become_flows_with_their_bucket_and_gaps_are_counted():
    reader = NflogReader(7, lambda flows: None)
    batch = (_report("198.18.0.1", 1000, 5, 1234) + _report("198.18.0.2", 1001, 6, 99)
             + _report("198.18.0.3", 1002, 7, None)  # bucket 0: the kernel sends no mark
             + _report("198.18.0.4", 1003, 10, 7, with_uid=True)  # another layout; 8, 9 lost
             + struct.pack("=IHHII", 16, 3, 0, 0, 0))  # NLMSG_DONE ends the kernel's batch
    flows = reader.parse(batch, len(batch)).tolist()
    assert [(_ip(f[0]), _ip(f[1]), f[2], f[3], f[4], f[5]) for f in flows] == [
        ("198.18.0.1", "203.0.113.14", 6, 1000, 80, 1234),
        ("198.18.0.2", "203.0.113.14", 6, 1001, 80, 99),
        ("198.18.0.3", "203.0.113.14", 6, 1002, 80, 0),
        ("198.18.0.4", "203.0.113.14", 6, 1003, 80, 7),
    ]
    assert reader.stats.lost == 2
    assert reader.stats.messages == 4
    assert reader.stats.malformed == 0


def test_a_truncated_or_foreign_report_is_counted_not_parsed():
    reader = NflogReader(7, lambda flows: None)
    good = _report("198.18.0.1", 1000, 1, 5)
    ipv6ish = bytearray(good)
    ipv6ish[-40] = 0x60  # version 6 in the payload's first byte
    data = bytes(ipv6ish) + good[:-8]  # and a message cut short: ignored, not read past the end
    flows = reader.parse(data, len(data)).tolist()
    assert flows == []
    assert reader.stats.malformed == 1


def _one_by_one(data: bytes) -> tuple[list, NflogReader]:
    """The per-message parse (struct, one message at a time) over the same buffer."""
    reader = NflogReader(7, lambda flows: None)
    out: list = []
    pos = 0
    while pos + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, pos)
        if kind == _PACKET_TYPE:
            offs = reader._layout(data, pos, length)
            reader._parse_one(data, pos, offs, out)
        pos += (length + 3) & ~3
    return out, reader


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 250), st.integers(0, 65535), st.integers(0, 3),
                          st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.booleans(),
                          st.sampled_from([0x45, 0x45, 0x45, 0x46, 0x65, 0x4F])),
                max_size=60))
def test_the_vectorised_parse_equals_the_per_message_parse(reports):
    """Runs of one layout (parsed with numpy) and lone reports of another (parsed with struct),
    sequence gaps, missing marks, IP options and foreign headers, in any mix."""
    seq, parts = 100, []
    for host, sport, gap, mark, with_uid, vihl in reports:
        seq += gap
        raw = bytearray(_report(f"198.18.0.{host}", sport, seq, mark, with_uid=with_uid))
        raw[-40] = vihl  # the IP header's first byte (version, header length)
        parts.append(bytes(raw))
        seq += 1
    data = b"".join(parts) + struct.pack("=IHHII", 16, 3, 0, 0, 0)
    want, ref = _one_by_one(data)
    reader = NflogReader(7, lambda flows: None)
    got = reader.parse(bytearray(data), len(data))
    assert got.dtype == np.int64
    assert got.shape == (len(want), 6)
    assert [tuple(f) for f in got.tolist()] == want
    assert reader.stats == ref.stats


def test_the_bucket_is_the_marks_low_bits_under_the_listeners_slot():
    """The mux marks `slot << 17 | bucket` (the listener's slot in the shared sets): a report
    carries the bucket alone, in a run of one layout (numpy) and on its own (struct)."""
    marks = [(3 << 17) | 1234, (32767 << 17) | 131070, (1 << 17), 77]
    run = b"".join(_report(f"198.18.0.{i + 1}", 1000 + i, 20 + i, m) for i, m in enumerate(marks))
    lone = _report("198.18.0.9", 2000, 24, (9 << 17) | 5, with_uid=True)
    data = run + lone + struct.pack("=IHHII", 16, 3, 0, 0, 0)
    flows = NflogReader(7, lambda flows: None).parse(bytearray(data), len(data)).tolist()
    assert [f[5] for f in flows] == [1234, 131070, 0, 77, 5]
    want, _ = _one_by_one(data)
    assert [f[5] for f in want] == [1234, 131070, 0, 77, 5]
