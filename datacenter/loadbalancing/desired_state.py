"""Compute the desired-state document (lbagent/state.py, schema 1) each agent must run, from the
database. One document per push generation is built (incrementally) and encoded once; agents'
copies differ only in `node`. The agents validate every document with lbagent.state and report a
refusal as a failed apply (ERROR with the reason); the test suite checks documents built here
with the same parser."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from lbagent.protocol import PROTOCOL_VERSION
from lbagent.state import DesiredState, parse_state

from .choices import AgentRole
from .models import AgentNode, Listener, Vip
from .models_sync import ListenerTable, PushSettings


def push_settings() -> PushSettings:
    settings_row, _ = PushSettings.objects.get_or_create(pk=1)
    return settings_row


def derived_key(purpose: str, epoch: int) -> str:
    """A cluster key derived from SECRET_KEY: nothing to store (or leak) at rest; rotate by epoch."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"lbagent:{purpose}:{epoch}".encode(), hashlib.sha256)
    return digest.hexdigest()


def state_backend(row: dict[str, Any], mac: str | None = None) -> dict[str, Any]:
    """A Generation snapshot entry -> a desired-state backend."""
    return {
        "address": row["address"],
        "port": row["port"],
        "weight": row["weight"],
        "state": row.get("admin_state", row.get("state", "active")),
        "mac": mac,
        "host": row.get("host"),
    }


def health_check_document(value: dict | None) -> dict | None:
    if not value:
        return None
    return {
        "kind": value.get("kind", "tcp"),
        "path": value.get("path") or "/",
        "interval_s": value.get("interval_s", 2),
        "timeout_s": value.get("timeout_s", 1),
        "rise": value.get("rise", 2),
        "fall": value.get("fall", 2),
    }


def _listener_document(listener: Listener, table: ListenerTable, now: float) -> dict[str, Any]:
    previous = table.previous
    if previous is not None and previous["drain_deadline"] <= now:
        previous = None  # the transition is over: agents are back to stateless
    document = {
        "id": listener.pk,
        "protocol": listener.protocol,
        "port": listener.port,
        "generation": table.number,
        "drain_timeout_s": listener.drain_timeout_s,
        "backends": table.backends,
        "previous": previous,
        "health_check": health_check_document(listener.health_check),
    }
    if listener.flow_idle_timeout_s is not None:
        # Only when set: a listener on the agents' default keeps the document it had before.
        document["flow_idle_timeout_s"] = listener.flow_idle_timeout_s
    if listener.backend_cap is not None:
        # The agents size the listener's table from it (lbagent.state.Listener.table_size_in: the
        # smallest prime above 100 x the cap, at most the cluster's) and refuse more backends.
        document["backend_cap"] = listener.backend_cap
    return document


def _bypass_next_hop(vip_doc: dict[str, Any]) -> str | None:
    """A VIP whose listeners all serve exactly one and the same backend address goes direct."""
    addresses = set()
    for listener in vip_doc["listeners"]:
        serving = [b for b in listener["backends"] if b["state"] == "active"]
        if len(serving) != 1:
            return None
        addresses.add(serving[0]["address"])
    return addresses.pop() if len(addresses) == 1 else None


def mux_set() -> list[dict[str, Any]]:
    """Enabled muxes with a data address, by name: the ownership ring every agent must agree on."""
    rows = (
        AgentNode.objects.filter(role=AgentRole.MUX, enabled=True, address__isnull=False)
        .order_by("name")
        .values("name", "address", "peer_port")
    )
    return [
        {"name": r["name"], "address": str(ipaddress.ip_address(r["address"])), "peer_port": r["peer_port"]}
        for r in rows
    ]


_LISTENER_FIELDS = (
    "id",
    "vip_id",
    "protocol",
    "port",
    "drain_timeout_s",
    "flow_idle_timeout_s",
    "backend_cap",
    "fast_path",
    "health_check",
    "table__number",
    "table__backends",
    "table__previous",
)

# A VIP whose listener rows changed within this window before the previous build is rebuilt
# again: it covers transactions that wrote `updated` before the build but committed after it.
REBUILD_SLACK = timedelta(seconds=5)
FULL_REBUILD_EVERY = timedelta(minutes=5)
MAX_DELTA_STEPS = 64  # generations a delta may span; an agent further behind gets the full state


def _vip_document(address: str, listeners: list[Listener], now: float) -> tuple[dict[str, Any], float]:
    """A VIP's part of the document and when it next needs rebuilding (a drain deadline)."""
    # A listener committed after ensure_tables() has no table yet; its own change pushes it.
    listeners = [li for li in listeners if getattr(li, "table", None) is not None]
    vip_doc = {
        "address": str(ipaddress.ip_address(address)),
        "bypass": False,
        "bypass_next_hop": None,
        "fast_path": any(li.fast_path for li in listeners),
        "listeners": [_listener_document(li, li.table, now) for li in listeners],
    }
    next_hop = _bypass_next_hop(vip_doc) if vip_doc["listeners"] else None
    if next_hop is not None and not vip_doc["fast_path"]:
        vip_doc["bypass"], vip_doc["bypass_next_hop"] = True, next_hop
    deadlines = [li["previous"]["drain_deadline"] for li in vip_doc["listeners"] if li["previous"]]
    return vip_doc, min(deadlines, default=float("inf"))


def document_head(cluster_row: PushSettings, generation: int) -> dict[str, Any]:
    """Everything in the document but the node name and the VIPs."""
    return {
        "version": 1,
        "generation": generation,
        "cluster": {
            "hash_seed": cluster_row.hash_seed,
            "table_size": cluster_row.table_size,
            "owner_seed": cluster_row.owner_seed,
            "muxes": mux_set(),
            "peer_key": derived_key("peer", cluster_row.key_epoch),
            "redirect_key": derived_key("redirect", cluster_row.key_epoch),
            "max_records": cluster_row.max_records,
        },
    }


def _delta_parts(base: int, removed: list[str], head_text: str, fragments: str) -> tuple[str, str]:
    """A delta frame's text before and after the node name (JSON-encoded) goes."""
    return (
        f'{{"type":"delta","protocol":{PROTOCOL_VERSION},"base":{base},"removed":{_dumps(removed)},'
        '"state":{"node":',
        f',{head_text[1:-1]},"vips":[{fragments}]}}}}',
    )


def listener_delta(
    cluster_row: PushSettings, generation: int, listener_ids: list[int]
) -> dict[str, Any] | None:
    """The delta frame from generation - 1 to `generation` for a change confined to these
    listeners, split around the node name, for the channel message that wakes the consumers:
    they forward it without reading the database (the scan of every VIP a cache refresh needs
    took ~40 ms at 1,000 VIPs). Call in the transaction that bumped the generation while
    holding the PushSettings row lock: pushes are then serialised, so this read is never older
    than the previous generation's. None when a listener is gone (consumers fall back to the
    document cache, which also handles removals)."""
    rows = list(
        Listener.objects.filter(vip__in=Listener.objects.filter(pk__in=listener_ids).values("vip_id"))
        .select_related("table", "vip")
        .order_by("vip_id", "protocol", "port")
        .only(*_LISTENER_FIELDS, "vip__address")
    )
    if not set(listener_ids) <= {li.pk for li in rows}:
        return None
    by_vip: dict[int, list[Listener]] = {}
    for listener in rows:
        by_vip.setdefault(listener.vip_id, []).append(listener)
    now = time.time()
    fragments = ",".join(
        _dumps(_vip_document(own[0].vip.address, own, now)[0])
        for _, own in sorted(by_vip.items(), key=lambda item: _address_key(item[1][0].vip.address))
    )
    before, after = _delta_parts(
        generation - 1, [], _dumps(document_head(cluster_row, generation)), fragments
    )
    return {"base": generation - 1, "vips": sorted(by_vip), "before": before, "after": after}


def splice_node(delta: dict[str, Any], node: str) -> str:
    """The frame of a `listener_delta` for one agent."""
    return f"{delta['before']}{json.dumps(node)}{delta['after']}"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@functools.lru_cache(maxsize=65536)
def _address_key(address: str) -> tuple[int, int]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed)


class DocumentCache:
    """The newest document, shared by every consumer in this process: with N agents connected,
    one change costs one build and one JSON encoding, not N. A rebuild only re-reads the VIPs
    whose listeners changed since the previous build (one push usually touches one VIP of
    thousands); everything else is reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self._generation: int | None = None
        self._document: dict[str, Any] | None = None
        self._encoded: str | None = None
        self._vips: dict[
            int, tuple[dict[str, Any], float, tuple[int, ...]]
        ] = {}  # id -> doc, expiry, listeners
        self._fragments: dict[int, str] = {}  # id -> the VIP's JSON text
        self._order: list[int] = []  # VIP ids by address
        self._built_at = None
        self._full_at = None
        # generation -> (the generation built before it, VIP ids whose JSON changed, VIP addresses
        # that disappeared): what a delta frame from an older generation must carry.
        self._history: dict[int, tuple[int | None, set[int], set[str]]] = {}

    def current(self) -> dict[str, Any]:
        with self._lock:
            self._refresh()
            return self._document

    def frame_for(
        self, node: str, since: int | None = None, *, base: int | None = None, extra_vips: Iterable[int] = ()
    ) -> tuple[int, str]:
        """(generation, the frame text for `node`). With `since` (the generation of the last
        frame this cache built for the agent) and the history to cover it: a `delta` frame
        carrying only the VIPs that changed; otherwise the full `desired` state. `base` is the
        generation the agent runs now if listener deltas (`listener_delta`) moved it past
        `since`, and `extra_vips` the VIPs those deltas carried: they are sent again. The full
        JSON is encoded once per generation; only the node name differs between agents."""
        with self._lock:
            self._refresh()
            if since is not None and since != self._generation:
                delta = self._delta_since(since, node, since if base is None else base, set(extra_vips))
                if delta is not None:
                    return self._generation, delta
            if self._encoded is None:
                self._encoded = self._encode()
            frame = (
                f'{{"type":"desired","protocol":{PROTOCOL_VERSION},"state":{{"node":{json.dumps(node)},'
                f"{self._encoded[1:]}}}"
            )
            return self._generation, frame

    def _delta_since(self, since: int, node: str, base: int, extra_vips: set[int]) -> str | None:
        changed: set[int] = set(extra_vips)
        removed: set[str] = set()
        generation: int | None = self._generation
        for _ in range(MAX_DELTA_STEPS):
            if generation == since:
                break
            step = self._history.get(generation)
            if step is None:
                return None
            generation, step_changed, step_removed = step
            changed |= step_changed
            removed |= step_removed
        else:
            return None
        present = [vip_id for vip_id in self._order if vip_id in changed]
        removed -= {self._vips[vip_id][0]["address"] for vip_id in self._order if vip_id in changed}
        head = {key: value for key, value in self._document.items() if key != "vips"}
        fragments = ",".join(self._fragments[vip_id] for vip_id in present)
        before, after = _delta_parts(base, sorted(removed), _dumps(head), fragments)
        return f"{before}{json.dumps(node)}{after}"

    def _encode(self) -> str:
        """The document as JSON, reusing each VIP's encoded text from its (re)build: encoding
        the whole document again took tens of ms for 1,000 VIPs."""
        head = {key: value for key, value in self._document.items() if key != "vips"}
        fragments = ",".join(self._fragments[vip_id] for vip_id in self._order)
        text = _dumps(head)
        return f'{text[:-1]},"vips":[{fragments}]}}'

    def _refresh(self) -> None:
        # One cheap query decides whether the cached document is still the newest.
        latest = PushSettings.objects.filter(pk=1).values_list("generation", flat=True).first()
        if self._document is not None and self._generation == latest:
            return
        before = self._generation
        fragments_before = dict(self._fragments)
        addresses_before = {vip_id: entry[0]["address"] for vip_id, entry in self._vips.items()}
        self._document = self._build()
        self._generation = self._document["generation"]
        self._encoded = None
        changed = {vip_id for vip_id, text in self._fragments.items() if fragments_before.get(vip_id) != text}
        removed = {address for vip_id, address in addresses_before.items() if vip_id not in self._vips}
        if before is not None and before != self._generation:
            self._history[self._generation] = (before, changed, removed)
            for old in sorted(self._history)[:-MAX_DELTA_STEPS]:
                del self._history[old]

    def _build(self) -> dict[str, Any]:
        """The document without `node`, read consistently: the generation is read first, so
        the content is never older than the number on it."""
        from .agent_sync import ensure_tables  # a listener created before any change has no table yet

        with transaction.atomic():
            cluster_row = push_settings()
            generation = cluster_row.generation
            ensure_tables()
            started = timezone.now()
            now = time.time()
            full = self._built_at is None or started - self._full_at > FULL_REBUILD_EVERY
            addresses = dict(Vip.objects.values_list("id", "address"))
            listener_ids: dict[int, list[int]] = {}
            for listener_id, vip_id in Listener.objects.order_by("vip_id", "protocol", "port").values_list(
                "id", "vip_id"
            ):
                listener_ids.setdefault(vip_id, []).append(listener_id)
            if full:
                stale = set(addresses)
            else:
                since = self._built_at - REBUILD_SLACK
                stale = {
                    vip_id
                    for vip_id in addresses
                    if vip_id not in self._vips
                    or self._vips[vip_id][1] <= now
                    or self._vips[vip_id][2] != tuple(listener_ids.get(vip_id, ()))
                }
                stale |= set(
                    Listener.objects.filter(Q(updated__gte=since) | Q(table__updated__gte=since)).values_list(
                        "vip_id", flat=True
                    )
                )
            by_vip: dict[int, list[Listener]] = {vip_id: [] for vip_id in stale}
            if stale:
                rows = (
                    Listener.objects.filter(vip_id__in=stale)
                    .select_related("table")
                    .order_by("vip_id", "protocol", "port")
                    .only(*_LISTENER_FIELDS)
                )
                for listener in rows:
                    by_vip[listener.vip_id].append(listener)
            vips = {vip_id: entry for vip_id, entry in self._vips.items() if vip_id in addresses}
            for vip_id in stale & set(addresses):
                own = by_vip.get(vip_id, [])
                vip_doc, expiry = _vip_document(addresses[vip_id], own, now)
                vips[vip_id] = (vip_doc, expiry, tuple(li.pk for li in own))
                self._fragments[vip_id] = _dumps(vip_doc)
            self._vips = vips
            self._built_at = started
            if full:
                self._full_at = started
            self._fragments = {vip_id: text for vip_id, text in self._fragments.items() if vip_id in vips}
            self._order = sorted(vips, key=lambda vip_id: _address_key(vips[vip_id][0]["address"]))
            ordered = [vips[vip_id] for vip_id in self._order]
            return {
                **document_head(cluster_row, generation),
                "vips": [entry[0] for entry in ordered],
            }


document_cache = DocumentCache()


def build_common_document() -> dict[str, Any]:
    """A fresh full build (no reuse), e.g. to check the incremental one."""
    return DocumentCache()._build()


def desired_state_for(agent: AgentNode) -> dict[str, Any]:
    return {**document_cache.current(), "node": agent.name}


def desired_frame_for(
    agent: AgentNode, since: int | None = None, *, base: int | None = None, extra_vips: Iterable[int] = ()
) -> tuple[int, str]:
    return document_cache.frame_for(agent.name, since, base=base, extra_vips=extra_vips)


def desired_state_object(agent: AgentNode) -> DesiredState:
    return parse_state(desired_state_for(agent))
