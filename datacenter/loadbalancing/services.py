"""Load-balancing domain operations; the API, admin, seed command and tasks all call these.

Every rule lives here: quotas, address checks, backend-list validation, generations, audit.
Errors are `datacenter.services_errors` exceptions naming the offending field and value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Q

from datacenter.events.middleware import current_request_id
from datacenter.events.services import record_change, snapshot
from datacenter.inventory.models import Host
from datacenter.services_errors import FieldConflict, FieldErrors, QuotaExceeded, StaleGeneration
from datacenter.tenancy.models import Tenant

from .choices import (
    BACKEND_CAP_MAX,
    BACKEND_CAP_MIN,
    BACKEND_CAP_RANGE,
    BACKEND_WEIGHT_MAX,
    BACKEND_WEIGHT_MIN,
    DRAIN_TIMEOUT_MAX_S,
    FLOW_IDLE_TIMEOUT_MAX_S,
    FLOW_IDLE_TIMEOUT_MIN_S,
    FLOW_IDLE_TIMEOUT_RANGE,
    PORT_MAX,
    PORT_MIN,
    BackendState,
    HealthCheckKind,
    Protocol,
    ProvisioningStatus,
)
from .models import Backend, Generation, Listener, Vip, VipPool
from .models_sync import ListenerTable
from .signals import generation_created, generation_staged

BACKEND_FIELDS = ("address", "port", "weight", "admin_state", "host")
MAX_ALLOCATION_SCAN = 65536  # addresses looked at when allocating from a pool


# --- pools and VIPs ---------------------------------------------------------------------------------


def pools_allowed_for(tenant: Tenant):
    """VIP pools a tenant may take addresses from: shared ones and those granted to it."""
    return VipPool.objects.filter(Q(shared=True) | Q(tenants=tenant)).distinct()


def _parse_ip(value: Any, field_name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise FieldErrors({field_name: [f"expected an IP address string, got {value!r}."]})
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise FieldErrors({field_name: [f"{value!r} is not a valid IPv4 or IPv6 address."]}) from None


def _is_backend_address(address: str) -> bool:
    return Backend.objects.filter(address=address).exists()


def allocate_address(pool: VipPool) -> str:
    """The first address of `pool` not used by a VIP (skipping network/broadcast addresses)."""
    network = pool.network
    used = set(Vip.objects.filter(pool=pool).values_list("address", flat=True))
    hosts = network.hosts() if network.num_addresses > 2 else iter(network)
    for scanned, candidate in enumerate(hosts):
        if scanned >= MAX_ALLOCATION_SCAN:
            break
        text = str(candidate)
        if text not in used and not _is_backend_address(text):
            return text
    raise FieldErrors({"pool": [f"VIP pool {pool.name!r} ({pool.prefix}) has no free address left."]})


def _check_vip_quota(tenant: Tenant) -> None:
    count = Vip.objects.filter(tenant=tenant).count()
    if count + 1 > tenant.max_vips:
        raise QuotaExceeded(
            "max_vips",
            tenant.max_vips,
            count + 1,
            f"Quota exceeded: tenant {tenant.name!r} may have at most {tenant.max_vips} VIPs "
            f"and already has {count}.",
        )


def resolve_vip_address(tenant: Tenant, *, pool: VipPool | None, address: str | None) -> tuple[VipPool, str]:
    """Check a requested address (or allocate one) against the tenant's allowed pools."""
    allowed = list(pools_allowed_for(tenant))
    if pool is not None and pool not in allowed:
        raise FieldErrors({"pool": [f"VIP pool {pool.name!r} is not available to tenant {tenant.name!r}."]})
    if address in (None, ""):
        if pool is None:
            if not allowed:
                raise FieldErrors({"pool": [f"No VIP pool is available to tenant {tenant.name!r}."]})
            pool = allowed[0]
        return pool, allocate_address(pool)
    ip = _parse_ip(address, "address")
    text = str(ip)
    candidates = [pool] if pool is not None else allowed
    inside = [p for p in candidates if p.contains(text)]
    if not inside:
        names = ", ".join(f"{p.name} ({p.prefix})" for p in candidates) or "none"
        raise FieldErrors(
            {
                "address": [
                    f"{text} is not inside an allowed VIP pool for tenant {tenant.name!r} (allowed: {names})."
                ]
            }
        )
    if Vip.objects.filter(address=text).exists():
        raise FieldErrors({"address": [f"{text} is already used by another VIP."]})
    if _is_backend_address(text):
        raise FieldErrors({"address": [f"{text} is already used as a backend address."]})
    return inside[0], text


@transaction.atomic
def create_vip(
    *,
    tenant: Tenant,
    name: str,
    pool: VipPool | None = None,
    address: str | None = None,
    description: str = "",
    user=None,
) -> Vip:
    # Lock the tenant row so two concurrent creates cannot both pass the quota check.
    tenant = Tenant.objects.select_for_update().get(pk=tenant.pk)
    _check_vip_quota(tenant)
    if Vip.objects.filter(tenant=tenant, name=name).exists():
        raise FieldErrors({"name": [f"tenant {tenant.name!r} already has a VIP named {name!r}."]})
    pool, address = resolve_vip_address(tenant, pool=pool, address=address)
    vip = Vip.objects.create(tenant=tenant, pool=pool, name=name, address=address, description=description)
    record_change(user=user, action="create", obj=vip, tenant_id=tenant.id, before=None, after=snapshot(vip))
    return vip


@transaction.atomic
def update_vip(vip: Vip, *, user=None, **changes: Any) -> Vip:
    """Change a VIP's name or description (address, pool and tenant are fixed at creation)."""
    fixed = sorted(set(changes) - {"name", "description"})
    if fixed:
        raise FieldErrors({name: ["cannot be changed after the VIP is created."] for name in fixed})
    before = snapshot(vip)
    new_name = changes.get("name", vip.name)
    if new_name != vip.name and Vip.objects.filter(tenant_id=vip.tenant_id, name=new_name).exists():
        raise FieldErrors({"name": [f"this tenant already has a VIP named {new_name!r}."]})
    for key, value in changes.items():
        setattr(vip, key, value)
    vip.save()
    record_change(
        user=user, action="update", obj=vip, tenant_id=vip.tenant_id, before=before, after=snapshot(vip)
    )
    return vip


@transaction.atomic
def delete_vip(vip: Vip, *, user=None) -> None:
    before = snapshot(vip)
    tenant_id = vip.tenant_id
    record_change(user=user, action="delete", obj=vip, tenant_id=tenant_id, before=before, after=None)
    vip.delete()


# --- listeners ----------------------------------------------------------------------------------------


def validate_health_check(value: Any) -> dict | None:
    """None, or a dict {"kind": "tcp"|"http", "path", "interval_s", "timeout_s", "rise", "fall"}."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FieldErrors({"health_check": [f"expected an object or null, got {value!r}."]})
    errors: dict[str, list[str]] = {}
    allowed_keys = {"kind", "path", "interval_s", "timeout_s", "rise", "fall"}
    for key in sorted(set(value) - allowed_keys):
        errors[f"health_check.{key}"] = [f"unknown field; expected some of {sorted(allowed_keys)}."]
    kind = value.get("kind", HealthCheckKind.TCP)
    if kind not in HealthCheckKind.values:
        errors["health_check.kind"] = [f"{kind!r} is not one of {HealthCheckKind.values}."]
    result: dict[str, Any] = {"kind": kind, "path": None}
    if kind == HealthCheckKind.HTTP:
        path = value.get("path", "/")
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 200:
            errors["health_check.path"] = [f"{path!r} must be a path starting with '/' (at most 200 chars)."]
        result["path"] = path
    for key, default, low, high in (
        ("interval_s", 2, 1, 300),
        ("timeout_s", 1, 1, 60),
        ("rise", 2, 1, 10),
        ("fall", 2, 1, 10),
    ):
        number = value.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            errors[f"health_check.{key}"] = [f"{number!r} must be an integer from {low} to {high}."]
        result[key] = number
    if errors:
        raise FieldErrors(errors)
    if result["timeout_s"] > result["interval_s"]:
        raise FieldErrors(
            {
                "health_check.timeout_s": [
                    f"timeout_s ({result['timeout_s']}) must not exceed interval_s ({result['interval_s']})."
                ]
            }
        )
    return result


def _check_listener_fields(
    vip: Vip,
    protocol: str,
    port: Any,
    drain_timeout_s: Any,
    flow_idle_timeout_s: Any = None,
    backend_cap: Any = None,
    *,
    exclude_id=None,
):
    errors: dict[str, list[str]] = {}
    conflicts: dict[str, list[str]] = {}  # valid values that the stored state refuses: 409
    if backend_cap is not None and (
        isinstance(backend_cap, bool)
        or not isinstance(backend_cap, int)
        or not BACKEND_CAP_MIN <= backend_cap <= BACKEND_CAP_MAX
    ):
        errors["backend_cap"] = [f"{backend_cap!r} is not a backend cap: {BACKEND_CAP_RANGE}."]
    elif backend_cap is not None and exclude_id is not None:
        # The agents refuse a listener with more backends than its cap: never send one.
        count = Backend.objects.filter(listener_id=exclude_id).count()
        # A transition's previous generation is in the document too (its backends drain).
        previous = (
            ListenerTable.objects.filter(listener_id=exclude_id).values_list("previous", flat=True).first()
        )
        if previous:
            count = max(count, len(previous.get("backends", ())))
        if count > backend_cap:
            conflicts["backend_cap"] = [
                f"{backend_cap} is below the listener's {count} backends; remove backends first."
            ]
    if protocol not in Protocol.values:
        errors["protocol"] = [f"{protocol!r} is not one of {Protocol.values}."]
    if isinstance(port, bool) or not isinstance(port, int) or not PORT_MIN <= port <= PORT_MAX:
        errors["port"] = [f"{port!r} is not a port number from {PORT_MIN} to {PORT_MAX}."]
    if (
        isinstance(drain_timeout_s, bool)
        or not isinstance(drain_timeout_s, int)
        or not 0 <= drain_timeout_s <= DRAIN_TIMEOUT_MAX_S
    ):
        errors["drain_timeout_s"] = [f"{drain_timeout_s!r} must be 0..{DRAIN_TIMEOUT_MAX_S} seconds."]
    if flow_idle_timeout_s is not None and (
        isinstance(flow_idle_timeout_s, bool)
        or not isinstance(flow_idle_timeout_s, int)
        or not FLOW_IDLE_TIMEOUT_MIN_S <= flow_idle_timeout_s <= FLOW_IDLE_TIMEOUT_MAX_S
    ):
        errors["flow_idle_timeout_s"] = [
            f"{flow_idle_timeout_s!r} is not a flow idle timeout: {FLOW_IDLE_TIMEOUT_RANGE}."
        ]
    if not errors:
        clash = Listener.objects.filter(vip=vip, protocol=protocol, port=port)
        if exclude_id is not None:
            clash = clash.exclude(pk=exclude_id)
        if clash.exists():
            conflicts["port"] = [f"VIP {vip.address} already has a {protocol} listener on port {port}."]
    if errors:
        raise FieldErrors(errors)
    if conflicts:
        raise FieldConflict(conflicts)


@transaction.atomic
def create_listener(
    *,
    vip: Vip,
    port: int,
    protocol: str = Protocol.TCP,
    name: str = "",
    drain_timeout_s: int = 30,
    fast_path: bool = False,
    health_check: dict | None = None,
    flow_idle_timeout_s: int | None = None,
    backend_cap: int | None = None,
    user=None,
) -> Listener:
    vip = Vip.objects.select_for_update().select_related("tenant").get(pk=vip.pk)
    tenant = vip.tenant
    count = Listener.objects.filter(vip=vip).count()
    if count + 1 > tenant.max_listeners_per_vip:
        raise QuotaExceeded(
            "max_listeners_per_vip",
            tenant.max_listeners_per_vip,
            count + 1,
            f"Quota exceeded: tenant {tenant.name!r} may have at most {tenant.max_listeners_per_vip} "
            f"listeners per VIP and VIP {vip.name!r} already has {count}.",
        )
    _check_listener_fields(vip, protocol, port, drain_timeout_s, flow_idle_timeout_s, backend_cap)
    listener = Listener.objects.create(
        vip=vip,
        name=name,
        protocol=protocol,
        port=port,
        drain_timeout_s=drain_timeout_s,
        fast_path=fast_path,
        health_check=validate_health_check(health_check),
        flow_idle_timeout_s=flow_idle_timeout_s,
        backend_cap=backend_cap,
    )
    record_change(
        user=user, action="create", obj=listener, tenant_id=tenant.id, before=None, after=snapshot(listener)
    )
    return listener


LISTENER_MUTABLE_FIELDS = {
    "name",
    "protocol",
    "port",
    "drain_timeout_s",
    "fast_path",
    "health_check",
    "flow_idle_timeout_s",
    "backend_cap",
}


@transaction.atomic
def update_listener(listener: Listener, *, user=None, **changes: Any) -> Listener:
    fixed = sorted(set(changes) - LISTENER_MUTABLE_FIELDS)
    if fixed:
        raise FieldErrors({name: ["cannot be changed on an existing listener."] for name in fixed})
    before = snapshot(listener)
    merged = {key: changes.get(key, getattr(listener, key)) for key in LISTENER_MUTABLE_FIELDS}
    _check_listener_fields(
        listener.vip,
        merged["protocol"],
        merged["port"],
        merged["drain_timeout_s"],
        merged["flow_idle_timeout_s"],
        merged["backend_cap"],
        exclude_id=listener.pk,
    )
    if "health_check" in changes:
        changes["health_check"] = validate_health_check(changes["health_check"])
    for key, value in changes.items():
        setattr(listener, key, value)
    listener.save()
    record_change(
        user=user,
        action="update",
        obj=listener,
        tenant_id=listener.vip.tenant_id,
        before=before,
        after=snapshot(listener),
    )
    return listener


@transaction.atomic
def delete_listener(listener: Listener, *, user=None) -> None:
    record_change(
        user=user,
        action="delete",
        obj=listener,
        tenant_id=listener.vip.tenant_id,
        before=snapshot(listener),
        after=None,
    )
    listener.delete()


# --- backends and generations -------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    """A validated backend list entry. `host` is a Host or None."""

    address: str
    port: int
    weight: int = 1
    admin_state: str = BackendState.ACTIVE
    host: Host | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "port": self.port,
            "weight": self.weight,
            "admin_state": self.admin_state,
            "host": self.host.name if self.host else None,
        }


def backend_as_dict(backend: Backend) -> dict[str, Any]:
    return {
        "address": backend.address,
        "port": backend.port,
        "weight": backend.weight,
        "admin_state": backend.admin_state,
        "host": backend.host.name if backend.host_id else None,
    }


def current_backends(listener: Listener) -> list[dict[str, Any]]:
    return [backend_as_dict(b) for b in listener.backends.select_related("host").order_by("position")]


def _hosts_usable_by(tenant_id: int) -> dict[str, Host]:
    hosts = Host.objects.filter(Q(tenant_id=tenant_id) | Q(tenant__isnull=True))
    return {host.name: host for host in hosts}


def validate_backend_list(listener: Listener, items: Any) -> list[BackendSpec]:
    """Check a whole backend list; raise FieldErrors keyed like "backends[2].port" or QuotaExceeded."""
    if not isinstance(items, list | tuple):
        raise FieldErrors({"backends": [f"expected a list of backends, got {type(items).__name__}."]})
    vip = listener.vip
    tenant = vip.tenant
    if len(items) > tenant.max_backends_per_listener:
        raise QuotaExceeded(
            "max_backends_per_listener",
            tenant.max_backends_per_listener,
            len(items),
            f"Quota exceeded: tenant {tenant.name!r} may have at most {tenant.max_backends_per_listener} "
            f"backends per listener; this list has {len(items)}.",
        )
    if listener.backend_cap is not None and len(items) > listener.backend_cap:
        # The agents would refuse the listener (its table is sized for the cap). The cap is stored
        # state, so a list the schema allows can exceed it: a conflict, not a malformed request.
        raise FieldConflict(
            {
                "backends": [
                    f"{len(items)} backends exceed the listener's backend_cap {listener.backend_cap}; "
                    "raise the cap first."
                ]
            }
        )
    vip_version = ipaddress.ip_address(vip.address).version
    errors: dict[str, list[str]] = {}
    specs: list[BackendSpec] = []
    seen: dict[tuple[str, int], int] = {}
    hosts: dict[str, Host] | None = None
    addresses_to_check: dict[str, list[int]] = {}

    for index, item in enumerate(items):
        where = f"backends[{index}]"
        if not isinstance(item, Mapping):
            errors[where] = [f"expected an object with address and port, got {item!r}."]
            continue
        unknown = sorted(set(item) - set(BACKEND_FIELDS))
        for key in unknown:
            errors[f"{where}.{key}"] = [f"unknown field; expected some of {list(BACKEND_FIELDS)}."]
        address = item.get("address")
        try:
            ip = _parse_ip(address, f"{where}.address")
        except FieldErrors as exc:
            errors.update(exc.errors)
            ip = None
        if ip is not None and ip.version != vip_version:
            errors[f"{where}.address"] = [
                f"{ip} is IPv{ip.version} but VIP {vip.address} is IPv{vip_version}; use the same family."
            ]
        elif ip is not None and (ip.is_multicast or ip.is_unspecified or ip.is_loopback):
            errors[f"{where}.address"] = [f"{ip} is not a unicast host address."]
        port = item.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not PORT_MIN <= port <= PORT_MAX:
            errors[f"{where}.port"] = [f"{port!r} is not a port number from {PORT_MIN} to {PORT_MAX}."]
        weight = item.get("weight", 1)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int)
            or not (BACKEND_WEIGHT_MIN <= weight <= BACKEND_WEIGHT_MAX)
        ):
            errors[f"{where}.weight"] = [
                f"{weight!r} is not a weight from {BACKEND_WEIGHT_MIN} to {BACKEND_WEIGHT_MAX}."
            ]
        state = item.get("admin_state", BackendState.ACTIVE)
        if state not in BackendState.values:
            errors[f"{where}.admin_state"] = [f"{state!r} is not one of {BackendState.values}."]
        host = None
        host_name = item.get("host")
        if host_name is not None:
            if hosts is None:
                hosts = _hosts_usable_by(tenant.id)
            host = hosts.get(host_name) if isinstance(host_name, str) else None
            if host is None:
                errors[f"{where}.host"] = [f"unknown host {host_name!r}."]
        if any(key.startswith(where) for key in errors):
            continue
        text = str(ip)
        key = (text, port)
        if key in seen:
            errors[f"{where}.address"] = [f"{text}:{port} is a duplicate of backends[{seen[key]}]."]
            continue
        seen[key] = index
        addresses_to_check.setdefault(text, []).append(index)
        specs.append(BackendSpec(address=text, port=port, weight=weight, admin_state=state, host=host))

    if addresses_to_check:
        for vip_address in Vip.objects.filter(address__in=list(addresses_to_check)).values_list(
            "address", flat=True
        ):
            for index in addresses_to_check[vip_address]:
                errors[f"backends[{index}].address"] = [f"{vip_address} is a VIP address, not a backend."]
    if errors:
        raise FieldErrors(dict(sorted(errors.items())))
    return specs


def diff_backends(before: Sequence[Mapping], after: Sequence[Mapping]) -> dict[str, Any]:
    """What changes between two backend lists, keyed by (address, port).

    {"added": [...], "removed": [...], "changed": [{"before", "after"}], "reordered": bool}
    """
    old = {(b["address"], b["port"]): dict(b) for b in before}
    new = {(b["address"], b["port"]): dict(b) for b in after}
    added = [new[k] for k in new if k not in old]
    removed = [old[k] for k in old if k not in new]
    changed = [{"before": old[k], "after": new[k]} for k in new if k in old and old[k] != new[k]]
    common_old = [k for k in old if k in new]
    common_new = [k for k in new if k in old]
    return {"added": added, "removed": removed, "changed": changed, "reordered": common_old != common_new}


def diff_is_empty(diff: Mapping[str, Any]) -> bool:
    return not (diff["added"] or diff["removed"] or diff["changed"] or diff["reordered"])


@dataclass
class ReplaceResult:
    listener: Listener
    diff: dict[str, Any]
    dry_run: bool
    changed: bool
    generation: Generation | None = None  # the new generation (None for dry runs and no-ops)
    backends: list[dict[str, Any]] = field(default_factory=list)  # the resulting (or would-be) list

    @property
    def generation_number(self) -> int:
        """The listener's generation after the call (unchanged for dry runs and no-ops)."""
        return self.generation.number if self.generation else self.listener.generation


def check_generation(listener: Listener, expected: int | None, *, via_if_match: bool = False) -> None:
    if expected is not None and expected != listener.generation:
        raise StaleGeneration(expected, listener.generation, via_if_match=via_if_match)


def replace_backends(
    listener: Listener,
    items: Sequence[Mapping[str, Any]],
    *,
    user=None,
    expected_generation: int | None = None,
    via_if_match: bool = False,
    dry_run: bool = False,
    request_id: str | None = None,
) -> ReplaceResult:
    """Replace the listener's whole ordered backend list declaratively.

    - `expected_generation`: the generation the client last saw; a different current generation
      raises StaleGeneration (HTTP 409, or 412 when it came from If-Match: `via_if_match`).
    - `dry_run`: validate and return the diff without writing anything.
    - An identical list changes nothing and makes no generation (`changed` False).
    - Otherwise rows are updated in place (ids of kept backends stay stable) and a new immutable
      Generation, AuditEntry and Event are written in the same transaction.
    """
    with transaction.atomic():
        # The row lock serialises concurrent replaces of one listener (PostgreSQL); the generation
        # check below then sees the committed winner.
        listener = (
            Listener.objects.select_for_update(of=("self",)).select_related("vip__tenant").get(pk=listener.pk)
        )
        check_generation(listener, expected_generation, via_if_match=via_if_match)
        specs = validate_backend_list(listener, items)
        rows = list(listener.backends.select_related("host").order_by("position"))
        before = [backend_as_dict(b) for b in rows]
        after = [spec.as_dict() for spec in specs]
        diff = diff_backends(before, after)
        if dry_run or diff_is_empty(diff):
            return ReplaceResult(
                listener=listener, diff=diff, dry_run=dry_run, changed=not diff_is_empty(diff), backends=after
            )
        _write_backend_rows(listener, specs, rows)
        generation = new_generation(
            listener, user=user, changes=diff, request_id=request_id, before=before, after=after
        )
        return ReplaceResult(
            listener=listener, diff=diff, dry_run=False, changed=True, generation=generation, backends=after
        )


def _write_backend_rows(listener: Listener, specs: Sequence[BackendSpec], rows: Sequence[Backend]) -> None:
    """Make the listener's backend rows match `specs`; `rows` are its rows as read in this transaction."""
    existing = {(b.address, b.port): b for b in rows}
    wanted = {spec.key for spec in specs}
    stale_ids = [b.pk for key, b in existing.items() if key not in wanted]
    if stale_ids:
        Backend.objects.filter(pk__in=stale_ids).delete()
    to_update, to_create = [], []
    for position, spec in enumerate(specs):
        row = existing.get(spec.key)
        if row is None:
            to_create.append(
                Backend(
                    listener=listener,
                    position=position,
                    address=spec.address,
                    port=spec.port,
                    weight=spec.weight,
                    admin_state=spec.admin_state,
                    host=spec.host,
                )
            )
            continue
        values = {
            "position": position,
            "weight": spec.weight,
            "admin_state": spec.admin_state,
            "host_id": spec.host.pk if spec.host else None,
        }
        if any(getattr(row, name) != value for name, value in values.items()):
            for name, value in values.items():
                setattr(row, name, value)
            to_update.append(row)
    if to_update:
        Backend.objects.bulk_update(to_update, ["position", "weight", "admin_state", "host", "updated"])
    if to_create:
        Backend.objects.bulk_create(to_create)


def new_generation(
    listener: Listener,
    *,
    user=None,
    changes: dict[str, Any] | None = None,
    request_id: str | None = None,
    before: list[dict[str, Any]] | None = None,
    after: list[dict[str, Any]] | None = None,
) -> Generation:
    """Snapshot the listener's current backend rows as its next immutable Generation.

    Also bumps `listener.generation`, marks the listener pending until agents apply it, and
    writes the AuditEntry and the Event ("listener.backends_replaced"). Call inside a transaction
    holding the listener's row lock (replace_backends does).
    """
    request_id = current_request_id() if request_id is None else request_id
    # Inside the caller's transaction (which holds the row lock) no savepoint: nothing here is
    # retried on its own, and it saves two round trips.
    with transaction.atomic(savepoint=False):
        backends = current_backends(listener) if after is None else after
        if before is None:
            previous = listener.generations.order_by("-number").first()
            before = previous.backends if previous else []
        if changes is None:
            changes = diff_backends(before, backends)
        number = listener.generation + 1
        authenticated = getattr(user, "is_authenticated", False)
        generation = Generation.objects.create(
            listener=listener,
            number=number,
            backends=backends,
            changes=changes,
            author=user if authenticated else None,
            author_name=user.get_username() if authenticated else "system",
            request_id=request_id,
        )
        listener.generation = number
        if listener.provisioning_status != ProvisioningStatus.PENDING_CREATE:
            listener.provisioning_status = ProvisioningStatus.PENDING_UPDATE
        listener.save(update_fields=["generation", "provisioning_status", "updated"])
        record_change(
            user=user,
            action="replace_backends",
            obj=listener,
            tenant_id=listener.vip.tenant_id,
            before={"generation": number - 1, "backends": before},
            after={"generation": number, "backends": backends},
            event_kind="listener.backends_replaced",
            event_data={
                "listener": listener.pk,
                "vip": listener.vip_id,
                "generation": number,
                "changes": changes,
            },
            request_id=request_id,
        )
        generation_staged.send(sender=Generation, generation=generation)
        transaction.on_commit(lambda: generation_created.send(sender=Generation, generation=generation))
        return generation


# --- single-backend conveniences (each one is a whole-list replace) ------------------------------------


def add_backend(
    listener: Listener,
    item: Mapping[str, Any],
    *,
    user=None,
    expected_generation: int | None = None,
    via_if_match: bool = False,
) -> tuple[Backend, ReplaceResult]:
    """Append one backend to the listener's list (a new generation)."""
    items = [*current_backends(listener), dict(item)]
    result = replace_backends(
        listener, items, user=user, expected_generation=expected_generation, via_if_match=via_if_match
    )
    spec = result.backends[-1]
    return Backend.objects.get(listener=listener, address=spec["address"], port=spec["port"]), result


def update_backend(
    backend: Backend,
    changes: Mapping[str, Any],
    *,
    user=None,
    expected_generation: int | None = None,
    via_if_match: bool = False,
) -> tuple[Backend, ReplaceResult]:
    """Change fields of one backend (e.g. admin_state="draining"); a new generation."""
    listener = backend.listener
    items = current_backends(listener)
    index = next(
        i for i, b in enumerate(items) if (b["address"], b["port"]) == (backend.address, backend.port)
    )
    items[index] = {**items[index], **dict(changes)}
    result = replace_backends(
        listener, items, user=user, expected_generation=expected_generation, via_if_match=via_if_match
    )
    spec = result.backends[index]
    return Backend.objects.get(listener=listener, address=spec["address"], port=spec["port"]), result


def remove_backend(
    backend: Backend, *, user=None, expected_generation: int | None = None, via_if_match: bool = False
) -> ReplaceResult:
    """Remove one backend from its listener's list (a new generation)."""
    listener = backend.listener
    items = [
        b for b in current_backends(listener) if (b["address"], b["port"]) != (backend.address, backend.port)
    ]
    return replace_backends(
        listener, items, user=user, expected_generation=expected_generation, via_if_match=via_if_match
    )
