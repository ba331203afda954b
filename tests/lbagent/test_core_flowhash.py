"""flow_bucket must pick the same bucket as nft's `jhash ... mod M seed S` (kernel check in
test_core_flowhash_kernel.py); here it is compared with an independent, literal transcription of
the kernel's C code, and the numpy version with the scalar one."""

import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbagent.core.flowhash import flow_bucket, flow_buckets, flow_hash, flow_hashes, ipv4_to_int


def _rol(x, r):
    x &= 0xFFFFFFFF
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def reference_jhash(k: bytes, initval: int) -> int:
    """include/linux/jhash.h jhash(), statement by statement, bytes read little-endian."""
    length = len(k)
    a = b = c = (0xDEADBEEF + length + initval) & 0xFFFFFFFF
    i = 0
    while length > 12:
        a = (a + (k[i] | k[i + 1] << 8 | k[i + 2] << 16 | k[i + 3] << 24)) & 0xFFFFFFFF
        b = (b + (k[i + 4] | k[i + 5] << 8 | k[i + 6] << 16 | k[i + 7] << 24)) & 0xFFFFFFFF
        c = (c + (k[i + 8] | k[i + 9] << 8 | k[i + 10] << 16 | k[i + 11] << 24)) & 0xFFFFFFFF
        # __jhash_mix
        a = (a - c) & 0xFFFFFFFF; a ^= _rol(c, 4); c = (c + b) & 0xFFFFFFFF  # noqa: E702
        b = (b - a) & 0xFFFFFFFF; b ^= _rol(a, 6); a = (a + c) & 0xFFFFFFFF  # noqa: E702
        c = (c - b) & 0xFFFFFFFF; c ^= _rol(b, 8); b = (b + a) & 0xFFFFFFFF  # noqa: E702
        a = (a - c) & 0xFFFFFFFF; a ^= _rol(c, 16); c = (c + b) & 0xFFFFFFFF  # noqa: E702
        b = (b - a) & 0xFFFFFFFF; b ^= _rol(a, 19); a = (a + c) & 0xFFFFFFFF  # noqa: E702
        c = (c - b) & 0xFFFFFFFF; c ^= _rol(b, 4); b = (b + a) & 0xFFFFFFFF  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    # the switch with fallthrough
    if length >= 12: c += k[i + 11] << 24  # noqa: E701
    if length >= 11: c += k[i + 10] << 16  # noqa: E701
    if length >= 10: c += k[i + 9] << 8  # noqa: E701
    if length >= 9: c += k[i + 8]  # noqa: E701
    if length >= 8: b += k[i + 7] << 24  # noqa: E701
    if length >= 7: b += k[i + 6] << 16  # noqa: E701
    if length >= 6: b += k[i + 5] << 8  # noqa: E701
    if length >= 5: b += k[i + 4]  # noqa: E701
    if length >= 4: a += k[i + 3] << 24  # noqa: E701
    if length >= 3: a += k[i + 2] << 16  # noqa: E701
    if length >= 2: a += k[i + 1] << 8  # noqa: E701
    a += k[i]
    a &= 0xFFFFFFFF; b &= 0xFFFFFFFF; c &= 0xFFFFFFFF  # noqa: E702
    # __jhash_final
    c ^= b; c = (c - _rol(b, 14)) & 0xFFFFFFFF  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & 0xFFFFFFFF  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & 0xFFFFFFFF  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & 0xFFFFFFFF  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & 0xFFFFFFFF  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & 0xFFFFFFFF  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & 0xFFFFFFFF  # noqa: E702
    return c


def reference_bucket(src: str, dst: str, proto: int, sport: int, dport: int, seed: int, m: int) -> int:
    # nft registers: saddr(4) daddr(4) proto(1)+pad(3) sport(2)+pad(2) dport(2)+pad(2)
    key = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
           + bytes([proto, 0, 0, 0]) + struct.pack("!H", sport) + b"\0\0"
           + struct.pack("!H", dport) + b"\0\0")
    return (reference_jhash(key, seed) * m) >> 32  # reciprocal_scale


ipv4 = st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
ports = st.integers(0, 65535)
seeds = st.integers(0, 2**32 - 1)
sizes = st.sampled_from([1, 2, 251, 4099, 65537, 131071, 2**32 - 1])


@settings(max_examples=200, deadline=None)
@given(ipv4, ipv4, st.integers(0, 255), ports, ports, seeds, sizes)
def test_flow_bucket_matches_reference_jhash(src, dst, proto, sport, dport, seed, m):
    assert flow_bucket(src, dst, proto, sport, dport, seed=seed, table_size=m) == reference_bucket(
        src, dst, proto, sport, dport, seed, m)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(ipv4, ipv4, st.sampled_from([6, 17]), ports, ports), min_size=1, max_size=50),
       seeds)
def test_vectorised_matches_scalar(flows, seed):
    src = np.array([ipv4_to_int(f[0]) for f in flows])
    dst = np.array([ipv4_to_int(f[1]) for f in flows])
    proto = np.array([f[2] for f in flows])
    sport = np.array([f[3] for f in flows])
    dport = np.array([f[4] for f in flows])
    hashes = flow_hashes(src, dst, proto, sport, dport, seed=seed)
    buckets = flow_buckets(src, dst, proto, sport, dport, seed=seed, table_size=65537)
    for f, h, b in zip(flows, hashes.tolist(), buckets.tolist(), strict=True):
        assert h == flow_hash(*f, seed=seed)
        assert b == flow_bucket(*f, seed=seed, table_size=65537)


def test_mod_is_reciprocal_scale_not_remainder():
    h = flow_hash("10.0.0.1", "203.0.113.10", 6, 40000, 80, seed=0x5EED)
    bucket = flow_bucket("10.0.0.1", "203.0.113.10", 6, 40000, 80, seed=0x5EED, table_size=65537)
    assert bucket == (h * 65537) >> 32


def test_address_forms_agree():
    as_str = flow_bucket("10.0.0.1", "203.0.113.10", 6, 1234, 80, seed=1, table_size=65537)
    as_int = flow_bucket(0x0A000001, ipv4_to_int("203.0.113.10"), 6, 1234, 80, seed=1, table_size=65537)
    as_obj = flow_bucket(ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("203.0.113.10"), 6,
                         1234, 80, seed=1, table_size=65537)
    assert as_str == as_int == as_obj


@pytest.mark.parametrize(("args", "message"), [
    (("10.0.0.300", "10.0.0.1", 6, 1, 2), "src_ip"),
    (("10.0.0.1", "::1", 6, 1, 2), "different IP versions"),
    (("10.0.0.1", "10.0.0.2", 256, 1, 2), "proto"),
    (("10.0.0.1", "10.0.0.2", 6, 70000, 2), "sport"),
    (("10.0.0.1", "10.0.0.2", 6, 1, -1), "dport"),
])
def test_bad_input_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        flow_bucket(*args, seed=1, table_size=65537)


def test_bad_seed_and_size():
    with pytest.raises(ValueError, match="seed"):
        flow_hash("10.0.0.1", "10.0.0.2", 6, 1, 2, seed=-1)
    with pytest.raises(ValueError, match="table_size"):
        flow_bucket("10.0.0.1", "10.0.0.2", 6, 1, 2, seed=1, table_size=0)
