"""The desired-state document an agent runs: parsed and validated into frozen dataclasses.

The portal builds this document for each agent and pushes it over the websocket; the kernel
data-plane daemon reads the same document from a config file. Both go through `parse_state`, so
a bad document is refused with an error naming the offending path and value before anything is
applied. Schema (version 1) is documented in docs/agent-protocol.md.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

STATE_VERSION = 1

# The mux's mark holds a listener's slot above 17 bits of bucket (lbagent.dataplane.nft): 131,071,
# the largest prime below 2^17, is the largest table it can hash into.
MAX_TABLE_SIZE = 131071
MAX_WEIGHT = 65535
MAX_MUXES = 256
MAX_VIPS = 100_000
MAX_LISTENERS_PER_VIP = 1024
MAX_BACKENDS_PER_LISTENER = 4096
MAX_NAME_LENGTH = 253  # a DNS name
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64
MAX_DRAIN_TIMEOUT_S = 86_400
MAX_HEALTH_INTERVAL_S = 3_600.0
# How long a flow's pin and owner record live without a packet of the flow (refreshed by every
# packet in the kernel). TCP: longer than Linux's default keepalive interval (7,200 s), so an
# idle connection with keepalive on never loses its state; UDP has no connection, so the
# conntrack-like 120 s. Per listener: `flow_idle_timeout_s`.
DEFAULT_FLOW_IDLE_TIMEOUT_S = {"tcp": 7_440, "udp": 120}
MIN_FLOW_IDLE_TIMEOUT_S = 2
MAX_FLOW_IDLE_TIMEOUT_S = 7 * 86_400
# A listener's Maglev table has more than this many buckets per backend of its cap: Maglev's
# per-backend share then stays within about 1% of its weight (docs/dataplane.md), while the
# kernel maps stay small (6,421 buckets for a 64-backend cap instead of 65,537).
BUCKETS_PER_BACKEND = 100

PROTOCOLS = ("tcp", "udp")
BACKEND_STATES = ("active", "draining", "disabled")
HEALTH_KINDS = ("tcp", "http")

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX_RE = re.compile(r"^(?:[0-9a-fA-F]{2})+$")
_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")  # printable ASCII, no spaces: goes into an HTTP request line


Path_ = str | tuple[str, str]


class StateError(ValueError):
    """A desired-state document is invalid. `path` names the offending field (e.g.
    `vips[0].listeners[1].backends[2].port`)."""

    def __init__(self, path: str | tuple[str, str], message: str) -> None:
        if isinstance(path, tuple):  # (parent, key): joined only when an error is raised
            path = _join(*path)
        self.path = path or "<document>"
        self.message = message
        super().__init__(f"{self.path}: {message}")


# ---------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True, slots=True)
class Mux:
    name: str
    address: str
    peer_port: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "peer_port": self.peer_port}


@dataclass(frozen=True, slots=True)
class Cluster:
    hash_seed: int
    table_size: int
    owner_seed: int
    muxes: tuple[Mux, ...]
    peer_key: bytes = field(repr=False)
    redirect_key: bytes = field(repr=False)
    max_records: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "hash_seed": self.hash_seed,
            "table_size": self.table_size,
            "owner_seed": self.owner_seed,
            "muxes": [m.to_dict() for m in self.muxes],
            "peer_key": self.peer_key.hex(),
            "redirect_key": self.redirect_key.hex(),
            "max_records": self.max_records,
        }


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    state: Literal["active", "draining", "disabled"] = "active"
    mac: str | None = None
    host: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
            "state": self.state,
            "mac": self.mac,
            "host": self.host,
        }


@dataclass(frozen=True, slots=True)
class PreviousGeneration:
    generation: int
    backends: tuple[Backend, ...]
    drain_deadline: float  # unix time, seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "backends": [b.to_dict() for b in self.backends],
            "drain_deadline": self.drain_deadline,
        }


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: Literal["tcp", "http"] = "tcp"
    path: str = "/"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "interval_s": self.interval_s,
            "timeout_s": self.timeout_s,
            "rise": self.rise,
            "fall": self.fall,
        }


@dataclass(frozen=True, slots=True)
class Listener:
    id: int
    protocol: Literal["tcp", "udp"]
    port: int
    generation: int
    drain_timeout_s: int
    backends: tuple[Backend, ...]
    previous: PreviousGeneration | None = None
    health_check: HealthCheck | None = None
    flow_idle_timeout_s: int | None = None  # None: DEFAULT_FLOW_IDLE_TIMEOUT_S of the protocol
    table_size: int | None = None  # explicit Maglev table size of this listener (a prime)
    backend_cap: int | None = None  # most backends this listener may get: sizes its table

    def table_size_in(self, cluster: Cluster) -> int:
        """Buckets of this listener's Maglev table (and kernel maps): the explicit `table_size`,
        else the smallest prime above BUCKETS_PER_BACKEND x `backend_cap`, else the cluster's.
        Never above the cluster's size: the owner table (one per cluster) covers that many."""
        if self.table_size is not None:
            return self.table_size
        if self.backend_cap is not None:
            return min(table_size_for_cap(self.backend_cap), cluster.table_size)
        return cluster.table_size

    @property
    def idle_timeout_s(self) -> int:
        """Seconds a flow's pin and record live without a packet (the default when not set)."""
        if self.flow_idle_timeout_s is not None:
            return self.flow_idle_timeout_s
        return DEFAULT_FLOW_IDLE_TIMEOUT_S[self.protocol]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "protocol": self.protocol,
            "port": self.port,
            "generation": self.generation,
            "drain_timeout_s": self.drain_timeout_s,
            "backends": [b.to_dict() for b in self.backends],
            "previous": self.previous.to_dict() if self.previous else None,
            "health_check": self.health_check.to_dict() if self.health_check else None,
        }
        if self.flow_idle_timeout_s is not None:
            out["flow_idle_timeout_s"] = self.flow_idle_timeout_s
        if self.table_size is not None:
            out["table_size"] = self.table_size
        if self.backend_cap is not None:
            out["backend_cap"] = self.backend_cap
        return out


@dataclass(frozen=True, slots=True)
class Vip:
    address: str
    listeners: tuple[Listener, ...]
    bypass: bool = False
    bypass_next_hop: str | None = None
    fast_path: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "bypass": self.bypass,
            "bypass_next_hop": self.bypass_next_hop,
            "fast_path": self.fast_path,
            "listeners": [li.to_dict() for li in self.listeners],
        }


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything one agent must run. `generation` numbers the whole document for this agent;
    each listener carries its own generation (what the portal's status is about)."""

    generation: int
    node: str
    cluster: Cluster
    vips: tuple[Vip, ...]
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "generation": self.generation,
            "node": self.node,
            "cluster": self.cluster.to_dict(),
            "vips": [v.to_dict() for v in self.vips],
        }

    def to_json(self) -> str:
        """Canonical JSON: the same state always gives the same bytes (sorted keys, compact)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def listeners(self) -> Iterator[tuple[Vip, Listener]]:
        for vip in self.vips:
            for listener in vip.listeners:
                yield vip, listener

    def listener_generations(self) -> dict[int, int]:
        """listener id -> generation: what an agent acknowledges when it applied this document."""
        return {listener.id: listener.generation for _, listener in self.listeners()}


# ---------------------------------------------------------------------------------------------
# Field readers: each takes (value, path) and returns the clean value or raises StateError.


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _object(value: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()) -> Mapping:
    if not isinstance(value, Mapping):
        raise StateError(path, f"expected an object, got {type(value).__name__} {_describe(value)}")
    unknown = [k for k in value if k not in required and k not in optional]
    if unknown:
        raise StateError(_join(path, str(unknown[0])), "unknown field (schema version 1)")
    for key in required:
        if key not in value:
            raise StateError(_join(path, key), "missing required field")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int(value: Any, path: Path_, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(path, f"expected an integer {lo}..{hi}, got {_describe(value)}")
    if not lo <= value <= hi:
        raise StateError(path, f"expected an integer {lo}..{hi}, got {value}")
    return value


def _number(value: Any, path: Path_, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateError(path, f"expected a number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number) or number > hi or number < lo or (lo_open and number == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise StateError(path, f"expected a finite number {bound} and <= {hi}, got {_describe(value)}")
    return number


def _bool(value: Any, path: Path_) -> bool:
    if not isinstance(value, bool):
        raise StateError(path, f"expected true or false, got {_describe(value)}")
    return value


def _choice(value: Any, path: Path_, choices: Sequence[str]) -> str:
    if value not in choices or not isinstance(value, str):
        raise StateError(path, f"expected one of {', '.join(choices)}, got {_describe(value)}")
    return value


def _name(value: Any, path: Path_) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH or not _NAME_RE.match(value):
        raise StateError(
            path,
            f"expected a name of letters, digits, '.', '_', '-' (1..{MAX_NAME_LENGTH}), "
            f"got {_describe(value)}",
        )
    return value


@functools.lru_cache(maxsize=131072)
def _canonical_ip(text: str) -> tuple[str, int] | None:
    """(canonical text, family) or None. Cached: a document repeats the same few thousand
    addresses on every push, and ipaddress parsing dominated the parse time."""
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text:
            return text, 4
    except OSError:
        pass
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address), address.version  # canonical form: the same address always compares equal


def _ip(value: Any, path: Path_) -> str:
    return _ip_family(value, path)[0]


def _ip_family(value: Any, path: Path_) -> tuple[str, int]:
    if not isinstance(value, str):
        raise StateError(path, f"expected an IP address string, got {_describe(value)}")
    parsed = _canonical_ip(value) if len(value) <= 64 else None
    if parsed is None:
        raise StateError(path, f"expected an IP address, got {_describe(value)}")
    return parsed


def _key(value: Any, path: Path_) -> bytes:
    if not isinstance(value, str) or not _HEX_RE.match(value):
        # Never echo a key, even a malformed one: it may be a real secret with a typo.
        raise StateError(path, "expected an even-length hex string")
    raw = bytes.fromhex(value)
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        raise StateError(path, f"expected {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes of key, got {len(raw)}")
    return raw


def _list(value: Any, path: str, max_items: int) -> list:
    if not isinstance(value, list | tuple):
        raise StateError(path, f"expected a list, got {type(value).__name__} {_describe(value)}")
    if len(value) > max_items:
        raise StateError(path, f"expected at most {max_items} items, got {len(value)}")
    return list(value)


def _unique(items: Sequence[Any], key: Callable[[Any], Any], path: str, what: str) -> None:
    seen: dict[Any, int] = {}
    for index, item in enumerate(items):
        k = key(item)
        if k in seen:
            raise StateError(f"{path}[{index}]", f"duplicate {what} {_describe(k)} (also at [{seen[k]}])")
        seen[k] = index


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


# ---------------------------------------------------------------------------------------------
# Section parsers


def table_size_for_cap(backend_cap: int) -> int:
    """The smallest prime above BUCKETS_PER_BACKEND x backend_cap (Maglev needs a prime)."""
    if not isinstance(backend_cap, int) or isinstance(backend_cap, bool) or backend_cap < 1:
        raise ValueError(f"backend_cap: expected a positive integer, got {backend_cap!r}")
    n = BUCKETS_PER_BACKEND * backend_cap + 1
    while not _is_prime(n):
        n += 1
    return n


def _parse_mux(value: Any, path: str) -> Mux:
    obj = _object(value, path, ("name", "address", "peer_port"))
    return Mux(
        name=_name(obj["name"], (path, "name")),
        address=_ip(obj["address"], (path, "address")),
        peer_port=_int(obj["peer_port"], (path, "peer_port"), 1, 65535),
    )


def _parse_cluster(value: Any, path: str) -> Cluster:
    obj = _object(
        value,
        path,
        ("hash_seed", "table_size", "owner_seed", "muxes", "peer_key", "redirect_key", "max_records"),
    )
    table_size = _int(obj["table_size"], (path, "table_size"), 3, MAX_TABLE_SIZE)
    if not _is_prime(table_size):
        raise StateError(_join(path, "table_size"), f"expected a prime (Maglev needs one), got {table_size}")
    muxes_path = _join(path, "muxes")
    muxes = tuple(
        _parse_mux(m, f"{muxes_path}[{i}]") for i, m in enumerate(_list(obj["muxes"], muxes_path, MAX_MUXES))
    )
    _unique(muxes, lambda m: m.name, muxes_path, "mux name")
    _unique(muxes, lambda m: (m.address, m.peer_port), muxes_path, "mux address and port")
    return Cluster(
        hash_seed=_int(obj["hash_seed"], (path, "hash_seed"), 0, 0xFFFFFFFF),
        table_size=table_size,
        owner_seed=_int(obj["owner_seed"], (path, "owner_seed"), 0, 0xFFFFFFFF),
        muxes=muxes,
        peer_key=_key(obj["peer_key"], (path, "peer_key")),
        redirect_key=_key(obj["redirect_key"], (path, "redirect_key")),
        max_records=_int(obj["max_records"], (path, "max_records"), 0, 100_000_000),
    )


def _parse_backend(value: Any, path: str, family: int) -> Backend:
    obj = _object(value, path, ("address", "port"), ("weight", "state", "mac", "host"))
    address, address_family = _ip_family(obj["address"], (path, "address"))
    if address_family != family:
        raise StateError(
            _join(path, "address"), f"expected an IPv{family} address like its VIP, got {address}"
        )
    mac = obj.get("mac")
    if mac is not None:
        if not isinstance(mac, str) or not _MAC_RE.match(mac.lower()):
            raise StateError(
                _join(path, "mac"), f"expected a MAC address aa:bb:cc:dd:ee:ff, got {_describe(mac)}"
            )
        mac = mac.lower()
    host = obj.get("host")
    if host is not None:
        host = _name(host, (path, "host"))
    return Backend(
        address=address,
        port=_int(obj["port"], (path, "port"), 1, 65535),
        weight=_int(obj.get("weight", 1), (path, "weight"), 0, MAX_WEIGHT),
        state=_choice(obj.get("state", "active"), (path, "state"), BACKEND_STATES),  # type: ignore[arg-type]
        mac=mac,
        host=host,
    )


def _parse_backends(value: Any, path: str, family: int) -> tuple[Backend, ...]:
    backends = tuple(
        _parse_backend(b, f"{path}[{i}]", family)
        for i, b in enumerate(_list(value, path, MAX_BACKENDS_PER_LISTENER))
    )
    _unique(backends, lambda b: b.key, path, "backend address and port")
    return backends


def _parse_previous(value: Any, path: str, family: int, generation: int) -> PreviousGeneration | None:
    if value is None:
        return None
    obj = _object(value, path, ("generation", "backends", "drain_deadline"))
    previous_generation = _int(obj["generation"], (path, "generation"), 0, 2**63 - 1)
    if previous_generation >= generation:
        raise StateError(
            _join(path, "generation"),
            f"expected a generation older than the listener's {generation}, got {previous_generation}",
        )
    return PreviousGeneration(
        generation=previous_generation,
        backends=_parse_backends(obj["backends"], _join(path, "backends"), family),
        drain_deadline=_number(obj["drain_deadline"], (path, "drain_deadline"), 0.0, 1e11),
    )


def _parse_health_check(value: Any, path: str) -> HealthCheck | None:
    if value is None:
        return None
    obj = _object(value, path, ("kind",), ("path", "interval_s", "timeout_s", "rise", "fall"))
    kind = _choice(obj["kind"], (path, "kind"), HEALTH_KINDS)
    http_path = obj.get("path", "/")
    if not isinstance(http_path, str) or len(http_path) > 1024 or not _PATH_RE.match(http_path):
        raise StateError(
            _join(path, "path"), f"expected an HTTP path starting with '/', got {_describe(http_path)}"
        )
    interval_s = _number(
        obj.get("interval_s", 2.0), (path, "interval_s"), 0.0, MAX_HEALTH_INTERVAL_S, lo_open=True
    )
    timeout_s = _number(
        obj.get("timeout_s", 1.0), (path, "timeout_s"), 0.0, MAX_HEALTH_INTERVAL_S, lo_open=True
    )
    if timeout_s > interval_s:
        raise StateError(
            _join(path, "timeout_s"), f"expected at most interval_s ({interval_s}), got {timeout_s}"
        )
    return HealthCheck(
        kind=kind,  # type: ignore[arg-type]
        path=http_path,
        interval_s=interval_s,
        timeout_s=timeout_s,
        rise=_int(obj.get("rise", 2), (path, "rise"), 1, 100),
        fall=_int(obj.get("fall", 2), (path, "fall"), 1, 100),
    )


def _parse_listener(value: Any, path: str, family: int) -> Listener:
    obj = _object(
        value,
        path,
        ("id", "protocol", "port", "generation", "backends"),
        ("drain_timeout_s", "previous", "health_check", "flow_idle_timeout_s", "table_size", "backend_cap"),
    )
    generation = _int(obj["generation"], (path, "generation"), 0, 2**63 - 1)
    idle = obj.get("flow_idle_timeout_s")
    if idle is not None:
        idle = _int(idle, (path, "flow_idle_timeout_s"), MIN_FLOW_IDLE_TIMEOUT_S, MAX_FLOW_IDLE_TIMEOUT_S)
    backends = _parse_backends(obj["backends"], _join(path, "backends"), family)
    previous = _parse_previous(obj.get("previous"), _join(path, "previous"), family, generation)
    table_size = obj.get("table_size")
    if table_size is not None:
        table_size = _int(table_size, (path, "table_size"), 3, MAX_TABLE_SIZE)
        if not _is_prime(table_size):
            raise StateError((path, "table_size"), f"expected a prime (Maglev needs one), got {table_size}")
    cap = obj.get("backend_cap")
    if cap is not None:
        cap = _int(cap, (path, "backend_cap"), 1, MAX_BACKENDS_PER_LISTENER)
        most = max(len(backends), len(previous.backends) if previous else 0)
        if most > cap:
            raise StateError((path, "backends"), f"{most} backends exceed the listener's backend_cap {cap}")
    if table_size is not None:
        most = max(len(backends), len(previous.backends) if previous else 0)
        if most >= table_size:
            raise StateError((path, "table_size"),
                             f"{table_size} buckets must be more than the listener's {most} backends")
    return Listener(
        id=_int(obj["id"], (path, "id"), 1, 2**63 - 1),
        protocol=_choice(obj["protocol"], (path, "protocol"), PROTOCOLS),  # type: ignore[arg-type]
        port=_int(obj["port"], (path, "port"), 1, 65535),
        generation=generation,
        drain_timeout_s=_int(
            obj.get("drain_timeout_s", 30), (path, "drain_timeout_s"), 0, MAX_DRAIN_TIMEOUT_S
        ),
        backends=backends,
        previous=previous,
        health_check=_parse_health_check(obj.get("health_check"), _join(path, "health_check")),
        flow_idle_timeout_s=idle,
        table_size=table_size,
        backend_cap=cap,
    )


def _parse_vip(value: Any, path: str) -> Vip:
    obj = _object(value, path, ("address", "listeners"), ("bypass", "bypass_next_hop", "fast_path"))
    address, family = _ip_family(obj["address"], (path, "address"))
    bypass = _bool(obj.get("bypass", False), (path, "bypass"))
    next_hop = obj.get("bypass_next_hop")
    if next_hop is not None:
        next_hop = _ip(next_hop, (path, "bypass_next_hop"))
    if bypass and next_hop is None:
        raise StateError(
            _join(path, "bypass_next_hop"), "expected the backend host's address when bypass is true"
        )
    listeners_path = _join(path, "listeners")
    listeners = tuple(
        _parse_listener(li, f"{listeners_path}[{i}]", family)
        for i, li in enumerate(_list(obj["listeners"], listeners_path, MAX_LISTENERS_PER_VIP))
    )
    _unique(listeners, lambda li: (li.protocol, li.port), listeners_path, "listener protocol and port")
    return Vip(
        address=address,
        listeners=listeners,
        bypass=bypass,
        bypass_next_hop=next_hop,
        fast_path=_bool(obj.get("fast_path", False), (path, "fast_path")),
    )


class StateParser:
    """Parses successive documents of one agent, reusing the parsed VIPs whose JSON did not
    change since the last successful parse: a push usually changes one VIP out of thousands, and
    comparing dicts is ~50x cheaper than validating them again."""

    def __init__(self) -> None:
        self._vips: dict[str, tuple[Any, Vip]] = {}

    def parse(self, document: Mapping[str, Any] | str | bytes) -> DesiredState:
        return parse_state(document, parser=self)


def parse_state(
    document: Mapping[str, Any] | str | bytes, *, parser: StateParser | None = None
) -> DesiredState:
    """Validate a desired-state document (a dict or its JSON text) and return it frozen.

    Raises StateError naming the first offending field and value.
    """
    if isinstance(document, str | bytes | bytearray):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError) as exc:
            raise StateError("", f"not valid JSON: {exc}") from None
    obj = _object(document, "", ("version", "generation", "node", "cluster", "vips"))
    version = obj["version"]
    if isinstance(version, bool) or version != STATE_VERSION:
        raise StateError(
            "version",
            f"expected {STATE_VERSION} (the only schema this agent knows), got {_describe(version)}",
        )
    known = parser._vips if parser is not None else {}
    parsed: dict[str, tuple[Any, Vip]] = {}
    vip_list = []
    for index, raw in enumerate(_list(obj["vips"], "vips", MAX_VIPS)):
        address = raw.get("address") if isinstance(raw, dict) else None
        hit = known.get(address) if isinstance(address, str) else None
        # `is` first: a merged delta hands back the very same dicts for unchanged VIPs.
        reuse = hit is not None and (hit[0] is raw or hit[0] == raw)
        vip = hit[1] if reuse else _parse_vip(raw, f"vips[{index}]")
        vip_list.append(vip)
        if isinstance(address, str):
            parsed[address] = (raw, vip)
    vips = tuple(vip_list)
    _unique(vips, lambda v: v.address, "vips", "VIP address")
    seen_ids: set[int] = set()
    for index, vip in enumerate(vips):
        for position, listener in enumerate(vip.listeners):
            if listener.id in seen_ids:
                raise StateError(
                    f"vips[{index}].listeners[{position}].id", f"duplicate listener id {listener.id}"
                )
            seen_ids.add(listener.id)
    cluster = _parse_cluster(obj["cluster"], "cluster")
    for index, vip in enumerate(vips):
        for position, listener in enumerate(vip.listeners):
            if listener.table_size is not None and listener.table_size > cluster.table_size:
                # The owner table has the cluster's size: a bucket beyond it would have no owner.
                raise StateError(f"vips[{index}].listeners[{position}].table_size",
                                 f"{listener.table_size} is larger than cluster.table_size "
                                 f"{cluster.table_size}")
    state = DesiredState(
        generation=_int(obj["generation"], "generation", 0, 2**63 - 1),
        node=_name(obj["node"], "node"),
        cluster=cluster,
        vips=vips,
    )
    if parser is not None:
        parser._vips = parsed
    return state


def state_json(state: DesiredState, texts: dict[str, tuple[Vip, str]]) -> str:
    """`state` as compact JSON (what `json.dumps(state.to_dict(), separators=(",", ":"))` gives),
    serialising only the VIPs that are not the same object as in the last call: `texts` (VIP
    address -> (Vip, its JSON)) is the caller's, kept between calls. A parser reuses unchanged
    VIPs' objects, so writing the state after one change costs that VIP and a join."""
    parts = []
    seen = set()
    for vip in state.vips:
        held = texts.get(vip.address)
        if held is None or held[0] is not vip:
            held = texts[vip.address] = (vip, json.dumps(vip.to_dict(), separators=(",", ":")))
        parts.append(held[1])
        seen.add(vip.address)
    for address in [a for a in texts if a not in seen]:
        del texts[address]
    head = json.dumps({"version": state.version, "generation": state.generation, "node": state.node,
                       "cluster": state.cluster.to_dict()}, separators=(",", ":"))
    return f'{head[:-1]},"vips":[{",".join(parts)}]}}'


def load_state_file(path: str | Path) -> DesiredState:
    """Read and validate a desired-state JSON file (the daemon's config file mode)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError("", f"cannot read desired state file {path}: {exc.strerror}") from None
    return parse_state(text)


# --- the daemon's last good state per VIP ---------------------------------------------------------
# What each VIP last ran in the kernel, kept across daemon restarts: a restart with a document
# that one VIP's part is refused from (an unresolvable backend) keeps that VIP on its last good
# tables instead of dropping it. Same VIP schema as the desired state, validated the same way.
LAST_GOOD_VERSION = 1


def dump_last_good_vip(vip: Vip) -> str:
    """One VIP's last good file (lbagent.state_files): the VIP in the desired state's schema."""
    return f'{{"version":{LAST_GOOD_VERSION},"vip":{json.dumps(vip.to_dict(), separators=(",", ":"))}}}'


def _last_good_document(text: str | bytes, field: str) -> Mapping:
    """A last good file's object: valid JSON, this version, `version` and `field` only."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise StateError("", f"not valid JSON: {exc}") from None
    obj = _object(document, "", ("version", field))
    if obj["version"] != LAST_GOOD_VERSION or isinstance(obj["version"], bool):
        raise StateError("version", f"expected {LAST_GOOD_VERSION}, got {_describe(obj['version'])}")
    return obj


def parse_last_good_vip(text: str | bytes) -> Vip:
    """The Vip of dump_last_good_vip's text; StateError names what is wrong."""
    return _parse_vip(_last_good_document(text, "vip")["vip"], "vip")


def parse_last_good(text: str | bytes) -> dict[str, Vip]:
    """VIP address -> Vip from the single last-good.json of earlier versions (read once at start
    when there is no per-VIP directory yet); StateError names what is wrong."""
    obj = _last_good_document(text, "vips")
    vips = [_parse_vip(raw, f"vips[{i}]") for i, raw in enumerate(_list(obj["vips"], "vips", MAX_VIPS))]
    _unique(vips, lambda v: v.address, "vips", "VIP address")
    return {vip.address: vip for vip in vips}


def write_file_atomically(
    path: Path, text: str, *, durable: bool = False, sync_directory: bool = True
) -> None:
    """Replace `path` with `text` in one step (a temporary file renamed over it): a reader, or an
    agent restarting after a crash, sees the old content or the new, never half of it. `durable`
    also fsyncs the file and (unless `sync_directory` is False: a caller writing many files
    fsyncs their directory once) its directory, so a power cut cannot leave an empty file behind
    the rename. On failure (a full disk) the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable and sync_directory:
        fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the names last created or removed in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
