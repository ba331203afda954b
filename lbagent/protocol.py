"""Messages between the portal and an agent over the websocket control channel (protocol 1).

Every message is one JSON text frame `{"type": ..., "protocol": 1, ...}`. Both ends decode
through this module, so a malformed, unknown or oversized message is refused with a
ProtocolError naming what was wrong, and the receiver closes the connection with that reason.
docs/agent-protocol.md is the prose version of this file.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lbagent.state import DesiredState, StateError, StateParser, parse_state

PROTOCOL_VERSION = 1

# A desired state for 1,000 VIPs x 4 listeners x 8 backends is about 4 MB of JSON.
MAX_PORTAL_MESSAGE_BYTES = 16 * 1024 * 1024
# Agents send acknowledgements, counters and health changes: small by construction.
MAX_AGENT_MESSAGE_BYTES = 1024 * 1024
MAX_COUNTERS = 256
MAX_HEALTH_ENTRIES = 5000
MAX_REASON_CHARS = 1000

ROLES = ("mux", "host")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_COUNTER_RE = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z.+_-]{1,64}$")


class ProtocolError(ValueError):
    """A message violates protocol 1. The text is safe to log and to send as a close reason."""


class InvalidDesiredState(ProtocolError):
    """A well-formed `desired` message whose state fails validation. The agent answers it with a
    failed `applied` (so the portal shows ERROR with the reason) instead of dropping the link."""

    def __init__(self, message: str, generation: int | None) -> None:
        super().__init__(message)
        self.generation = generation


@dataclass(frozen=True, slots=True)
class Hello:
    """agent -> portal, first message after connecting."""

    node: str
    role: Literal["mux", "host"]
    version: str  # agent software version
    applied_generation: int | None  # generation of the state the agent runs now (fail static)
    # What the agent runs, in an acknowledgement's terms (listener id -> listener generation, and
    # why a listener is not at its desired one). The portal rebuilds the agent's acknowledgement
    # rows from it, so nothing a previous connection said (or said late) survives a reconnect.
    # None: an older agent that does not say; the portal then keeps its rows until the next ack.
    listeners: Mapping[int, int] | None = None
    listener_errors: Mapping[int, str] = field(default_factory=dict)
    type: str = field(default="hello", init=False)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node": self.node,
            "role": self.role,
            "version": self.version,
            "applied_generation": self.applied_generation,
        }
        if self.listeners is not None:
            body["listeners"] = {str(k): v for k, v in sorted(self.listeners.items())}
        if self.listener_errors:
            body["listener_errors"] = {str(k): v for k, v in sorted(self.listener_errors.items())}
        return body


@dataclass(frozen=True, slots=True)
class Desired:
    """portal -> agent: the full state for this agent. Every (re)connect starts with one."""

    state: DesiredState
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # the state as received
    type: str = field(default="desired", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict()}


@dataclass(frozen=True, slots=True)
class Applied:
    """agent -> portal: the outcome of applying the desired state `generation`. On success
    `listeners` maps listener id -> the listener generation now running (0: not served), and
    `listener_errors` says why a listener is not at its desired generation (its VIP could not be
    applied; everything else was); on failure `error` says why and the agent keeps running its
    previous state."""

    generation: int
    ok: bool
    listeners: Mapping[int, int] = field(default_factory=dict)
    error: str | None = None
    listener_errors: Mapping[int, str] = field(default_factory=dict)
    type: str = field(default="applied", init=False)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "generation": self.generation,
            "ok": self.ok,
            "error": self.error,
            "listeners": {str(k): v for k, v in sorted(self.listeners.items())},
        }
        if self.listener_errors:
            body["listener_errors"] = {str(k): v for k, v in sorted(self.listener_errors.items())}
        return body


@dataclass(frozen=True, slots=True)
class Stats:
    """agent -> portal: counters since the agent started (monotonic)."""

    counters: Mapping[str, int]
    type: str = field(default="stats", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"counters": dict(sorted(self.counters.items()))}


@dataclass(frozen=True, slots=True)
class BackendHealth:
    listener: int
    address: str
    port: int
    healthy: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "listener": self.listener,
            "address": self.address,
            "port": self.port,
            "healthy": self.healthy,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Health:
    """agent -> portal: backend check results. `full` is true when the list is every backend the
    agent checks (sent after each applied state); false means only the changes since then."""

    checks: tuple[BackendHealth, ...]
    full: bool = False
    type: str = field(default="health", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"full": self.full, "checks": [c.to_dict() for c in self.checks]}


AgentMessage = Hello | Applied | Stats | Health
PortalMessage = Desired


def encode(message: AgentMessage | PortalMessage) -> str:
    body = {"type": message.type, "protocol": PROTOCOL_VERSION, **message.to_dict()}
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Decoding


def _load(text: str | bytes, limit: int) -> dict[str, Any]:
    if isinstance(text, bytes | bytearray):
        raise ProtocolError("binary frames are not part of the protocol; send JSON text")
    if len(text) > limit:  # characters >= bytes/4, and the transport enforces the byte limit too
        raise ProtocolError(f"message of {len(text)} characters exceeds the limit of {limit} bytes")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(body).__name__}")
    if body.get("protocol") != PROTOCOL_VERSION or isinstance(body.get("protocol"), bool):
        raise ProtocolError(
            f"unsupported protocol {_short(body.get('protocol'))}; this end speaks {PROTOCOL_VERSION}"
        )
    return body


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(body: Mapping[str, Any], kind: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    allowed = {"type", "protocol", *required, *optional}
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ProtocolError(f"{kind}.{_short(unknown[0])[1:-1]}: unknown field")
    for key in required:
        if key not in body:
            raise ProtocolError(f"{kind}.{key}: missing required field")


def _int(value: Any, where: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{where}: expected an integer {lo}..{hi}, got {_short(value)}")
    return value


def _reason(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: expected a string or null, got {_short(value)}")
    return value[:MAX_REASON_CHARS]


def _decode_hello(body: dict[str, Any]) -> Hello:
    _fields(
        body, "hello", ("node", "role", "version"), ("applied_generation", "listeners", "listener_errors")
    )
    node, role, version = body["node"], body["role"], body["version"]
    if not isinstance(node, str) or not _NAME_RE.match(node):
        raise ProtocolError(f"hello.node: expected a node name, got {_short(node)}")
    if role not in ROLES:
        raise ProtocolError(f"hello.role: expected one of {', '.join(ROLES)}, got {_short(role)}")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ProtocolError(f"hello.version: expected a version string, got {_short(version)}")
    applied = body.get("applied_generation")
    if applied is not None:
        applied = _int(applied, "hello.applied_generation")
    listeners = None
    listener_errors: dict[int, str] = {}
    if body.get("listeners") is not None:
        listeners = _listener_generations(body["listeners"], "hello.listeners")
        listener_errors = _listener_errors(body.get("listener_errors"), listeners, "hello.listener_errors")
    elif body.get("listener_errors"):
        raise ProtocolError("hello.listener_errors: given without hello.listeners")
    return Hello(
        node=node,
        role=role,
        version=version,
        applied_generation=applied,
        listeners=listeners,
        listener_errors=listener_errors,
    )


def _is_id(key: str) -> bool:
    """A listener id as JSON object key: ASCII digits, no leading zero, at most 19 of them
    (str.isdigit alone accepts "²" and "０", which int() refuses or reads as another id)."""
    return key.isascii() and key.isdigit() and len(key) <= 19 and (key[0] != "0" or key == "0")


def _listener_generations(raw_listeners: Any, where: str) -> dict[int, int]:
    if not isinstance(raw_listeners, dict) or len(raw_listeners) > 1_000_000:
        raise ProtocolError(
            f"{where}: expected an object of listener id -> generation, got {_short(raw_listeners)}"
        )
    listeners: dict[int, int] = {}
    top = 2**63 - 1
    for key, value in raw_listeners.items():
        if not _is_id(key):
            raise ProtocolError(f"{where}: expected listener ids as keys, got {_short(key)}")
        # An ack lists every listener (thousands): the message naming the entry is only built
        # for a bad one. type() excludes bool.
        if type(value) is not int or not 0 <= value <= top:
            _int(value, f"{where}.{key}")
        listeners[int(key)] = value
    return listeners


def _listener_errors(raw_errors: Any, listeners: Mapping[int, int], where: str) -> dict[int, str]:
    raw_errors = {} if raw_errors is None else raw_errors
    if not isinstance(raw_errors, dict) or len(raw_errors) > len(listeners):
        raise ProtocolError(
            f"{where}: expected an object of listener id -> reason for listeners the "
            f"message lists, got {_short(raw_errors)}"
        )
    listener_errors: dict[int, str] = {}
    for key, value in raw_errors.items():
        if not _is_id(key) or int(key) not in listeners:
            raise ProtocolError(f"{where}: {_short(key)} is not a listener this message lists")
        reason = _reason(value, f"{where}.{key}")
        if not reason:
            raise ProtocolError(f"{where}.{key}: the reason is empty")
        listener_errors[int(key)] = reason
    return listener_errors


def _decode_applied(body: dict[str, Any]) -> Applied:
    _fields(body, "applied", ("generation", "ok"), ("error", "listeners", "listener_errors"))
    ok = body["ok"]
    if not isinstance(ok, bool):
        raise ProtocolError(f"applied.ok: expected true or false, got {_short(ok)}")
    error = _reason(body.get("error"), "applied.error")
    if not ok and not error:
        raise ProtocolError("applied.error: a failed apply must say why")
    listeners = _listener_generations(body.get("listeners") or {}, "applied.listeners")
    listener_errors = _listener_errors(body.get("listener_errors"), listeners, "applied.listener_errors")
    return Applied(
        generation=_int(body["generation"], "applied.generation"),
        ok=ok,
        listeners=listeners,
        error=error,
        listener_errors=listener_errors,
    )


def _decode_stats(body: dict[str, Any]) -> Stats:
    _fields(body, "stats", ("counters",))
    counters = body["counters"]
    if not isinstance(counters, dict) or len(counters) > MAX_COUNTERS:
        raise ProtocolError(f"stats.counters: expected an object of at most {MAX_COUNTERS} counters")
    clean: dict[str, int] = {}
    for name, value in counters.items():
        if not isinstance(name, str) or not _COUNTER_RE.match(name):
            raise ProtocolError(
                f"stats.counters: bad counter name {_short(name)} (expected [a-z][a-z0-9_.]*)"
            )
        clean[name] = _int(value, f"stats.counters.{name}")
    return Stats(counters=clean)


def _decode_health(body: dict[str, Any]) -> Health:
    _fields(body, "health", ("checks",), ("full",))
    checks = body["checks"]
    full = body.get("full", False)
    if not isinstance(full, bool):
        raise ProtocolError(f"health.full: expected true or false, got {_short(full)}")
    if not isinstance(checks, list) or len(checks) > MAX_HEALTH_ENTRIES:
        raise ProtocolError(f"health.checks: expected a list of at most {MAX_HEALTH_ENTRIES} entries")
    parsed = []
    for index, entry in enumerate(checks):
        where = f"health.checks[{index}]"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where}: expected an object, got {_short(entry)}")
        unknown = sorted(set(entry) - {"listener", "address", "port", "healthy", "reason"})
        if unknown:
            raise ProtocolError(f"{where}.{_short(unknown[0])[1:-1]}: unknown field")
        try:
            address = str(ipaddress.ip_address(entry.get("address")))
        except ValueError:
            raise ProtocolError(
                f"{where}.address: expected an IP address, got {_short(entry.get('address'))}"
            ) from None
        healthy = entry.get("healthy")
        if not isinstance(healthy, bool):
            raise ProtocolError(f"{where}.healthy: expected true or false, got {_short(healthy)}")
        parsed.append(
            BackendHealth(
                listener=_int(entry.get("listener"), f"{where}.listener", 1),
                address=address,
                port=_int(entry.get("port"), f"{where}.port", 1, 65535),
                healthy=healthy,
                reason=_reason(entry.get("reason"), f"{where}.reason"),
            )
        )
    return Health(checks=tuple(parsed), full=full)


_AGENT_DECODERS = {
    "hello": _decode_hello,
    "applied": _decode_applied,
    "stats": _decode_stats,
    "health": _decode_health,
}


def decode_agent_message(text: str | bytes) -> AgentMessage:
    """Portal side: decode one frame from an agent, or raise ProtocolError."""
    body = _load(text, MAX_AGENT_MESSAGE_BYTES)
    decoder = _AGENT_DECODERS.get(body.get("type"))  # type: ignore[arg-type]
    if decoder is None:
        raise ProtocolError(
            f"unknown agent message type {_short(body.get('type'))}; expected one of "
            f"{', '.join(_AGENT_DECODERS)}"
        )
    return decoder(body)


class DeltaBaseMismatch(ProtocolError):
    """A `delta` against a generation this agent does not hold: reconnect for a full resync."""


@functools.lru_cache(maxsize=131072)
def _address_order(address: str) -> tuple[int, int]:
    """The portal's VIP order (by family, then numeric address); bad addresses sort last and
    are refused by the state parser afterwards."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0)
    return parsed.version, int(parsed)


def _merge_delta(body: dict[str, Any], base: tuple[int, Mapping[str, Any]] | None) -> dict[str, Any]:
    _fields(body, "delta", ("base", "state", "removed"))
    base_generation = _int(body["base"], "delta.base")
    if base is None or base[0] != base_generation:
        raise DeltaBaseMismatch(
            f"delta.base: delta against generation {base_generation}, but this agent holds "
            f"{base[0] if base else 'nothing'}; reconnecting for the full state"
        )
    state, removed = body["state"], body["removed"]
    if not isinstance(state, dict) or not isinstance(state.get("vips"), list):
        raise ProtocolError("delta.state: expected an object with a vips list")
    if not isinstance(removed, list) or not all(isinstance(a, str) for a in removed):
        raise ProtocolError("delta.removed: expected a list of VIP addresses")
    by_address = {vip["address"]: vip for vip in base[1]["vips"]}
    known = len(by_address)
    for vip in state["vips"]:
        if not isinstance(vip, dict) or not isinstance(vip.get("address"), str):
            raise ProtocolError(f"delta.state.vips: expected VIP objects with an address, got {_short(vip)}")
        by_address[vip["address"]] = vip
    if not removed and len(by_address) == known:
        # The usual delta only replaces VIPs: keep the base's order (sorting thousands of
        # addresses again cost more than the rest of the merge).
        return {**state, "vips": list(by_address.values())}
    for address in removed:
        by_address.pop(address, None)
    return {**state, "vips": [by_address[a] for a in sorted(by_address, key=_address_order)]}


def decode_portal_message(
    text: str | bytes,
    parser: StateParser | None = None,
    base: tuple[int, Mapping[str, Any]] | None = None,
) -> PortalMessage:
    """Agent side: decode one frame from the portal, or raise ProtocolError.

    `desired` carries the full state; `delta` carries the VIPs that changed since generation
    `base` (and the addresses of removed VIPs), to be merged into the state this agent last
    received, given as `base` = (generation, state as received). Either way the result is the
    whole new state, validated. A StateParser carried from frame to frame makes re-parsing
    unchanged VIPs nearly free."""
    body = _load(text, MAX_PORTAL_MESSAGE_BYTES)
    kind = body.get("type")
    if kind == "desired":
        _fields(body, "desired", ("state",))
        raw = body["state"]
    elif kind == "delta":
        raw = _merge_delta(body, base)
    else:
        raise ProtocolError(f"unknown portal message type {_short(kind)}; expected desired or delta")
    try:
        return Desired(state=parse_state(raw, parser=parser), raw=raw)
    except StateError as exc:
        generation = raw.get("generation") if isinstance(raw, dict) else None
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            generation = None
        raise InvalidDesiredState(f"{kind}.state.{exc}", generation) from None
