"""Flow hashing identical to the kernel's, so Python and nftables pick the same bucket for a flow.

The kernel rule is
    ``jhash ip saddr . ip daddr . ip protocol . th sport . th dport mod M seed S``.
How nftables evaluates it (nft 1.0.6, net/netfilter/nft_hash.c):

* Each field of the concatenation is loaded into its own 32-bit register, in network byte
  order at the start of the register, padded with zero bytes to 4 bytes (nft_payload zeroes the
  tail of a partly written register). For IPv4 that is 5 registers, 20 bytes:
  ``saddr[4] daddr[4] proto[1]+0[3] sport[2]+0[2] dport[2]+0[2]``.
* ``jhash(data, 20, seed)`` is the kernel's Bob Jenkins lookup3 hash, which reads the bytes as
  CPU-endian (little-endian on x86 and arm64) 32-bit words.
* ``mod M`` is ``reciprocal_scale(hash, M) = (hash * M) >> 32`` (not ``hash % M``), then the
  optional offset is added. The mux's rules add ``slot << MARK_BUCKET_BITS`` (the listener's slot
  in the shared sets, lbagent.dataplane.nft): the mark is ``slot << 17 | bucket``, and
  `bucket_of_mark` gives the bucket back (tables have at most ``1 << MARK_BUCKET_BITS`` buckets).

`flow_hash`/`flow_bucket` work on one flow; `flow_hashes`/`flow_buckets` on numpy arrays of
many flows (the simulator and benchmarks). IPv6 follows the same register layout
(``ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport``: 16+16+4+4+4 bytes).
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np

__all__ = [
    "JHASH_INITVAL",
    "MARK_BUCKET_BITS",
    "MARK_BUCKET_MASK",
    "MARK_SLOT_MASK",
    "bucket_of_mark",
    "flow_bucket",
    "flow_buckets",
    "flow_hash",
    "flow_hashes",
    "flow_key_bytes",
    "ipv4_to_int",
    "ipv6_fingerprint",
    "ipv6_fingerprint_seeds",
    "jhash_bytes",
    "reciprocal_scale",
]

JHASH_INITVAL = 0xDEADBEEF
_MASK32 = 0xFFFFFFFF
# The packet mark the mux's rules write: the listener's slot in the high 15 bits, the bucket in
# the low 17 (a table of at most 131,072 buckets: the largest prime below is 131,071).
MARK_BUCKET_BITS = 17
MARK_BUCKET_MASK = (1 << MARK_BUCKET_BITS) - 1
MARK_SLOT_MASK = _MASK32 ^ MARK_BUCKET_MASK


def bucket_of_mark(mark: int) -> int:
    """The bucket a mux rule hashed a packet into, from its mark (``slot << 17 | bucket``)."""
    return mark & MARK_BUCKET_MASK

IpLike = str | int | ipaddress.IPv4Address | ipaddress.IPv6Address


def _rol32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _MASK32; a ^= _rol32(c, 4); c = (c + b) & _MASK32  # noqa: E702
    b = (b - a) & _MASK32; b ^= _rol32(a, 6); a = (a + c) & _MASK32  # noqa: E702
    c = (c - b) & _MASK32; c ^= _rol32(b, 8); b = (b + a) & _MASK32  # noqa: E702
    a = (a - c) & _MASK32; a ^= _rol32(c, 16); c = (c + b) & _MASK32  # noqa: E702
    b = (b - a) & _MASK32; b ^= _rol32(a, 19); a = (a + c) & _MASK32  # noqa: E702
    c = (c - b) & _MASK32; c ^= _rol32(b, 4); b = (b + a) & _MASK32  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol32(b, 14)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 11)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & _MASK32  # noqa: E702
    return c


def jhash_bytes(data: bytes, seed: int) -> int:
    """The kernel's ``jhash(key, length, initval)`` (include/linux/jhash.h), little-endian CPU."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + (seed & _MASK32)) & _MASK32
    pos = 0
    while length > 12:
        wa, wb, wc = struct.unpack_from("<III", data, pos)
        a = (a + wa) & _MASK32
        b = (b + wb) & _MASK32
        c = (c + wc) & _MASK32
        a, b, c = _mix(a, b, c)
        length -= 12
        pos += 12
    if length == 0:
        return c
    tail = data[pos:] + bytes(12 - length)
    wa, wb, wc = struct.unpack("<III", tail)
    a = (a + wa) & _MASK32
    b = (b + wb) & _MASK32
    c = (c + wc) & _MASK32
    return _final(a, b, c)


def reciprocal_scale(value: int, table_size: int) -> int:
    """nft's ``mod N``: ``(value * N) >> 32`` for a 32-bit value."""
    return ((value & _MASK32) * table_size) >> 32


def _ip_bytes(ip: IpLike, what: str) -> bytes:
    if isinstance(ip, int) and not isinstance(ip, bool):
        if not 0 <= ip <= _MASK32:
            raise ValueError(f"{what}: integer address {ip} is not a 32-bit IPv4 address")
        return ip.to_bytes(4, "big")
    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ip.packed
    if isinstance(ip, str):
        try:
            return ipaddress.ip_address(ip).packed
        except ValueError as exc:
            raise ValueError(f"{what}: {ip!r} is not an IP address") from exc
    raise TypeError(f"{what}: expected an IP address (str, int or ipaddress), got {type(ip).__name__}")


def _check_port(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what}: {value!r} is not a port number (0..65535)")
    return value


def flow_key_bytes(src_ip: IpLike, dst_ip: IpLike, proto: int, sport: int, dport: int) -> bytes:
    """The bytes nftables hashes for the 5-tuple: each field padded to a 4-byte register."""
    src = _ip_bytes(src_ip, "src_ip")
    dst = _ip_bytes(dst_ip, "dst_ip")
    if len(src) != len(dst):
        raise ValueError(f"src_ip {src_ip!r} and dst_ip {dst_ip!r} are of different IP versions")
    if not isinstance(proto, int) or isinstance(proto, bool) or not 0 <= proto <= 255:
        raise ValueError(f"proto: {proto!r} is not an IP protocol number (0..255)")
    _check_port(sport, "sport")
    _check_port(dport, "dport")
    return src + dst + bytes((proto, 0, 0, 0)) + struct.pack(">HxxHxx", sport, dport)


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MASK32:
        raise ValueError(f"seed: {seed!r} is not a 32-bit unsigned integer")
    return seed


def _check_table_size(table_size: int) -> int:
    if not isinstance(table_size, int) or isinstance(table_size, bool) or not 1 <= table_size <= _MASK32:
        raise ValueError(f"table_size: {table_size!r} must be an integer in 1..2**32-1")
    return table_size


def flow_hash(src_ip: IpLike, dst_ip: IpLike, proto: int, sport: int, dport: int, *, seed: int) -> int:
    """The 32-bit jhash nftables computes for this flow with this seed."""
    return jhash_bytes(flow_key_bytes(src_ip, dst_ip, proto, sport, dport), _check_seed(seed))


def flow_bucket(
    src_ip: IpLike, dst_ip: IpLike, proto: int, sport: int, dport: int, *, seed: int, table_size: int
) -> int:
    """The bucket nft's ``jhash ... mod <table_size> seed <seed>`` gives this flow."""
    return reciprocal_scale(flow_hash(src_ip, dst_ip, proto, sport, dport, seed=seed),
                            _check_table_size(table_size))


def ipv6_fingerprint_seeds(seed: int) -> tuple[int, int]:
    """The two seeds of an IPv6 address pair's fingerprint, derived from the cluster's hash seed."""
    _check_seed(seed)
    return (seed ^ 0x5BD1E995) & _MASK32, (seed ^ 0x27D4EB2F) & _MASK32


def ipv6_fingerprint(src_ip: IpLike, dst_ip: IpLike, *, seed: int) -> tuple[int, int]:
    """The 64-bit fingerprint the kernel keys an IPv6 flow's pin with (with the ports): nft's
    ``jhash ip6 saddr . ip6 daddr mod 4294967295 seed A`` and the same with seed B
    (`ipv6_fingerprint_seeds`). nft 1.0.6 cannot add a dynamic key longer than 16 bytes, so an
    IPv6 pin cannot hold the addresses themselves (lbagent.dataplane.nft)."""
    src = _ip_bytes(src_ip, "src_ip")
    dst = _ip_bytes(dst_ip, "dst_ip")
    if len(src) != 16 or len(dst) != 16:
        raise ValueError(f"ipv6_fingerprint: {src_ip!r} and {dst_ip!r} must both be IPv6 addresses")
    a, b = ipv6_fingerprint_seeds(seed)
    return (reciprocal_scale(jhash_bytes(src + dst, a), _MASK32),
            reciprocal_scale(jhash_bytes(src + dst, b), _MASK32))


def ipv4_to_int(ip: IpLike) -> int:
    """An IPv4 address as the integer whose big-endian bytes are the address."""
    raw = _ip_bytes(ip, "address")
    if len(raw) != 4:
        raise ValueError(f"{ip!r} is not an IPv4 address")
    return int.from_bytes(raw, "big")


# --- vectorised (numpy, IPv4) -------------------------------------------------------------------

def _vrol(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _bswap32(x: np.ndarray) -> np.ndarray:
    return x.byteswap()


def flow_hashes(
    src: np.ndarray, dst: np.ndarray, proto: np.ndarray | int, sport: np.ndarray, dport: np.ndarray,
    *, seed: int,
) -> np.ndarray:
    """`flow_hash` for many IPv4 flows at once.

    `src`/`dst` are IPv4 addresses as integers (see `ipv4_to_int`), `proto`/`sport`/`dport`
    integers; all broadcast together. Returns uint32 hashes.
    """
    _check_seed(seed)
    src_a = np.asarray(src, dtype=np.uint32)
    dst_a = np.asarray(dst, dtype=np.uint32)
    proto_a = np.asarray(proto, dtype=np.uint32)
    sport_a = np.asarray(sport, dtype=np.uint32)
    dport_a = np.asarray(dport, dtype=np.uint32)
    if proto_a.size and int(proto_a.max()) > 255:
        raise ValueError("proto: values must be 0..255")
    if (sport_a.size and int(sport_a.max()) > 0xFFFF) or (dport_a.size and int(dport_a.max()) > 0xFFFF):
        raise ValueError("sport/dport: values must be 0..65535")
    shape = np.broadcast_shapes(src_a.shape, dst_a.shape, proto_a.shape, sport_a.shape, dport_a.shape)
    # Little-endian words of the 20-byte key: address bytes are big-endian, so byte-swap;
    # a port's two network-order bytes read little-endian are its byte-swapped 16-bit value.
    w0 = np.broadcast_to(_bswap32(src_a), shape)
    w1 = np.broadcast_to(_bswap32(dst_a), shape)
    w2 = np.broadcast_to(proto_a, shape)
    w3 = np.broadcast_to(((sport_a >> 8) | ((sport_a & 0xFF) << 8)).astype(np.uint32), shape)
    w4 = np.broadcast_to(((dport_a >> 8) | ((dport_a & 0xFF) << 8)).astype(np.uint32), shape)
    init = np.uint32((JHASH_INITVAL + 20 + seed) & _MASK32)
    with np.errstate(over="ignore"):
        a = init + w0
        b = init + w1
        c = init + w2
        # __jhash_mix
        a = a - c; a ^= _vrol(c, 4); c = c + b  # noqa: E702
        b = b - a; b ^= _vrol(a, 6); a = a + c  # noqa: E702
        c = c - b; c ^= _vrol(b, 8); b = b + a  # noqa: E702
        a = a - c; a ^= _vrol(c, 16); c = c + b  # noqa: E702
        b = b - a; b ^= _vrol(a, 19); a = a + c  # noqa: E702
        c = c - b; c ^= _vrol(b, 4); b = b + a  # noqa: E702
        # tail of 8 bytes: words 3 and 4 into a and b
        a = a + w3
        b = b + w4
        # __jhash_final
        c ^= b; c = c - _vrol(b, 14)  # noqa: E702
        a ^= c; a = a - _vrol(c, 11)  # noqa: E702
        b ^= a; b = b - _vrol(a, 25)  # noqa: E702
        c ^= b; c = c - _vrol(b, 16)  # noqa: E702
        a ^= c; a = a - _vrol(c, 4)  # noqa: E702
        b ^= a; b = b - _vrol(a, 14)  # noqa: E702
        c ^= b; c = c - _vrol(b, 24)  # noqa: E702
    return np.ascontiguousarray(c, dtype=np.uint32)


def flow_buckets(
    src: np.ndarray, dst: np.ndarray, proto: np.ndarray | int, sport: np.ndarray, dport: np.ndarray,
    *, seed: int, table_size: int,
) -> np.ndarray:
    """`flow_bucket` for many IPv4 flows at once (int64 buckets)."""
    _check_table_size(table_size)
    hashes = flow_hashes(src, dst, proto, sport, dport, seed=seed).astype(np.uint64)
    return ((hashes * np.uint64(table_size)) >> np.uint64(32)).astype(np.int64)
