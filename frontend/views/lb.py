"""Load-balancing pages: VIP list, VIP page (listeners, backends, generations, agents, bucket
shares, the backend editor), backend drain/disable with confirmation, agents, VIP pools."""

from __future__ import annotations

import re
import time
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from datacenter.loadbalancing import services
from datacenter.loadbalancing.bucket_movement import bucket_movement, bucket_shares, current_table_size
from datacenter.loadbalancing.choices import AgentRole, BackendState, OperatingStatus, ProvisioningStatus
from datacenter.loadbalancing.filtersets import VipFilterSet
from datacenter.loadbalancing.models import (
    AgentListenerAck,
    AgentNode,
    Backend,
    Generation,
    Listener,
    PushSettings,
    Vip,
    VipPool,
)
from datacenter.services_errors import DomainError, FieldErrors, StaleGeneration
from datacenter.tenancy.scoping import can_write, is_operator, restrict, tenant_ids_for, tenants_for
from lbagent.demo import backend_counter_name

from .common import dashboard_page, operator_page, page, paginate, sorted_by

GENERATIONS_SHOWN = 8
EDITOR_BLANK_ROWS = 2
# What the demo muxes report, then what the kernel daemon's portal bridge reports today.
HEADLINE_COUNTERS = (
    "packets",
    "new_flows",
    "slowpath_decisions",
    "flow_records",
    "applies",
    "daemon.applies",
    "daemon.apply_errors",
    "daemon.config_errors",
)


# --- VIP list ----------------------------------------------------------------------------------------


@dashboard_page
def vip_list(request: HttpRequest) -> HttpResponse:
    scoped = restrict(Vip.objects.all(), request.user, "tenant")
    filters = VipFilterSet(request.GET, queryset=scoped, request=request)
    vips = filters.qs if filters.is_valid() else scoped.none()
    vips = vips.select_related("tenant", "pool").annotate(listener_count=Count("listeners"))
    vips, sort = sorted_by(
        request,
        vips,
        {"name": "name", "address": "address", "tenant": "tenant__name", "created": "created"},
        "name",
    )
    context = {
        "page_obj": paginate(request, vips),
        "filters": filters,
        "sort": sort,
        "tenants": tenants_for(request.user),
        "provisioning_choices": ProvisioningStatus.choices,
        "operating_choices": OperatingStatus.choices,
        "query": request.GET.copy(),
    }
    return page(request, "frontend/vip_list.html", context, live="vips")


# --- VIP page ----------------------------------------------------------------------------------------


def scoped_vip(request: HttpRequest, pk: int) -> Vip:
    """The VIP if this user may see it; 404 otherwise (never 403: that would confirm it exists)."""
    return get_object_or_404(
        restrict(Vip.objects.select_related("tenant", "pool"), request.user, "tenant"), pk=pk
    )


def _health_votes(muxes: list[AgentNode]) -> tuple[int, dict[str, int]]:
    """(muxes voting, {"<listener>|<address>|<port>": muxes finding it unhealthy})."""
    votes: dict[str, int] = {}
    voters = 0
    for mux in muxes:
        sync = getattr(mux, "sync", None)
        if sync is None or not sync.connected:
            continue
        voters += 1
        for key in sync.unhealthy or {}:
            votes[key] = votes.get(key, 0) + 1
    return voters, votes


def _traffic(muxes: list[AgentNode], listener_id: int, backends: list[Backend]) -> dict[int, int]:
    """New flows per backend as the agents count them (the sum of their reported counters)."""
    totals: dict[int, int] = {}
    for backend in backends:
        name = backend_counter_name(listener_id, backend.address, backend.port)
        totals[backend.pk] = sum(int((m.last_stats or {}).get(name, 0)) for m in muxes)
    return totals


def listener_views(vip: Vip, muxes: list[AgentNode], table_size: int) -> list[dict[str, Any]]:
    listeners = list(
        vip.listeners.select_related("table").prefetch_related(
            Prefetch("backends", queryset=Backend.objects.select_related("host").order_by("position"))
        )
    )
    history: dict[int, list[Generation]] = {}
    if listeners:
        recent = Q()
        for listener in listeners:
            recent |= Q(listener=listener, number__gt=listener.generation - GENERATIONS_SHOWN)
        for generation in Generation.objects.filter(recent).order_by("listener_id", "-number"):
            history.setdefault(generation.listener_id, []).append(generation)
    acks: dict[int, dict[int, AgentListenerAck]] = {}
    for ack in AgentListenerAck.objects.filter(listener__in=listeners):
        acks.setdefault(ack.listener_id, {})[ack.agent_id] = ack
    voters, votes = _health_votes(muxes)
    views = []
    for listener in listeners:
        table = getattr(listener, "table", None)
        backends = list(listener.backends.all())
        running = table.backends if table is not None else [services.backend_as_dict(b) for b in backends]
        in_table = {
            (b["address"], b["port"]) for b in running if b.get("state", b.get("admin_state")) == "active"
        }
        shares = bucket_shares(running, table_size)
        traffic = _traffic(muxes, listener.pk, backends)
        traffic_total = sum(traffic.values())
        rows = []
        for backend in backends:
            name = f"{backend.address}:{backend.port}"
            rows.append(
                {
                    "backend": backend,
                    "share": shares.get(name, 0.0),
                    "in_table": (backend.address, backend.port) in in_table,
                    "down_votes": votes.get(f"{listener.pk}|{backend.address}|{backend.port}", 0),
                    "traffic": traffic[backend.pk],
                    "traffic_share": traffic[backend.pk] / traffic_total if traffic_total else 0.0,
                }
            )
        agent_rows = []
        for mux in muxes:
            ack = acks.get(listener.pk, {}).get(mux.pk)
            agent_rows.append(
                {
                    "agent": mux,
                    "generation": ack.generation if ack else None,
                    "error": ack.error if ack else "",
                    "current": bool(ack and table and ack.generation >= table.number),
                }
            )
        previous = table.previous if table is not None else None
        if previous and previous.get("drain_deadline", 0) <= time.time():
            previous = None
        views.append(
            {
                "listener": listener,
                "table": table,
                # the old table counts until its drain deadline (agents drop it then)
                "transition": previous,
                "rows": rows,
                "voters": voters,
                "history": history.get(listener.pk, []),
                "agents": agent_rows,
                "traffic_total": traffic_total,
                "editor_rows": [*backends, *([None] * EDITOR_BLANK_ROWS)],
            }
        )
    return views


def vip_context(request: HttpRequest, vip: Vip) -> dict[str, Any]:
    muxes = list(
        AgentNode.objects.filter(role=AgentRole.MUX, enabled=True).select_related("sync").order_by("name")
    )
    return {
        "vip": vip,
        "listeners": listener_views(vip, muxes, current_table_size()),
        "can_write": can_write(request.user, vip.tenant_id),
        "backend_states": BackendState.choices,
        "hosts": _host_names(request.user, vip.tenant_id),
    }


def _host_names(user, tenant_id: int) -> list[str]:
    """Hosts a backend of this tenant may name (the tenant's own and shared ones), for the editor."""
    from datacenter.inventory.models import Host

    return list(
        Host.objects.filter(Q(tenant_id=tenant_id) | Q(tenant__isnull=True)).values_list("name", flat=True)
    )


@dashboard_page
def vip_detail(request: HttpRequest, pk: int) -> HttpResponse:
    vip = scoped_vip(request, pk)
    return page(request, "frontend/vip_detail.html", vip_context(request, vip), live=f"vip:{vip.pk}")


# --- backend editor ------------------------------------------------------------------------------

FIELD_PATH = re.compile(r"^backends\[(\d+)\]\.?(.*)$")


def _editor_items(request: HttpRequest) -> list[dict[str, Any]]:
    """The editor's rows as the services' backend items; blank rows are ignored."""
    columns = {
        name: request.POST.getlist(name) for name in ("address", "port", "weight", "admin_state", "host")
    }
    items = []
    for i, address in enumerate(columns["address"]):

        def cell(name: str, i: int = i) -> str:
            values = columns[name]
            return values[i].strip() if i < len(values) else ""

        if not address.strip() and not cell("port"):
            continue
        item: dict[str, Any] = {"address": address.strip(), "admin_state": cell("admin_state") or "active"}
        port, weight = cell("port"), cell("weight")
        item["port"] = int(port) if port.isdigit() else port
        if weight:
            item["weight"] = int(weight) if weight.isdigit() else weight
        item["host"] = cell("host") or None
        items.append(item)
    return items


def _expected_generation(request: HttpRequest) -> int:
    raw = request.POST.get("expected_generation", "")
    if not raw.isdigit():
        raise FieldErrors(
            {"expected_generation": [f"{raw!r} is not the generation number the edit started from."]}
        )
    return int(raw)


def _writable_listener(request: HttpRequest, vip_pk: int, listener_pk: int) -> Listener:
    vip = scoped_vip(request, vip_pk)
    listener = get_object_or_404(Listener.objects.select_related("vip"), pk=listener_pk, vip=vip)
    if not can_write(request.user, vip.tenant_id):
        raise PermissionDenied("Your role in this tenant is read-only (viewer).")
    return listener


@dashboard_page
def backend_editor(request: HttpRequest, vip_pk: int, listener_pk: int) -> HttpResponse:
    """POST action=preview (dry run + bucket movement) or action=apply (with the generation
    precondition: a stale edit answers 409 and changes nothing)."""
    if request.method != "POST":
        return redirect(reverse("frontend:vip", args=[vip_pk]) + f"#listener-{listener_pk}")
    listener = _writable_listener(request, vip_pk, listener_pk)
    action = request.POST.get("action", "preview")
    result: dict[str, Any] = {"listener": listener, "action": action}
    status = 200
    try:
        if action not in ("preview", "apply"):
            raise FieldErrors({"action": [f"{action!r} is not preview or apply."]})
        items = _editor_items(request)
        expected = _expected_generation(request)
        before = services.current_backends(listener)
        outcome = services.replace_backends(
            listener, items, user=request.user, expected_generation=expected, dry_run=action == "preview"
        )
        result.update(
            diff=outcome.diff,
            changed=outcome.changed,
            generation=outcome.generation_number,
            movement=bucket_movement(before, outcome.backends, current_table_size()),
        )
    except StaleGeneration as exc:
        status = 409
        result.update(conflict=exc)
    except FieldErrors as exc:
        status = 400
        result.update(errors=_row_errors(exc))
    except DomainError as exc:
        status = exc.http_status
        result.update(errors=[("", str(exc))])
    if request.headers.get("X-Dashboard-Fetch") == "1":
        return render(request, "frontend/partials/editor_result.html", {"result": result}, status=status)
    vip = scoped_vip(request, vip_pk)
    context = {**vip_context(request, vip), "editor_result": result}
    return page(request, "frontend/vip_detail.html", context, live=f"vip:{vip.pk}", status=status)


def _row_errors(exc: FieldErrors) -> list[tuple[str, str]]:
    """[("row 2, port", message)]: errors named the way the editor shows its rows."""
    named = []
    for path, messages in exc.errors.items():
        match = FIELD_PATH.match(path)
        where = (
            f"row {int(match.group(1)) + 1}{', ' + match.group(2) if match.group(2) else ''}"
            if match
            else path
        )
        named += [(where, message) for message in messages]
    return named


STATE_VERBS = {
    BackendState.DRAINING: ("Drain", "New flows stop going to it; established flows stay until they end."),
    BackendState.DISABLED: ("Disable", "It leaves the table: its buckets move to the other backends."),
    BackendState.ACTIVE: ("Activate", "It takes new flows again (its share of buckets comes back)."),
}


@dashboard_page
def backend_state(request: HttpRequest, vip_pk: int, backend_pk: int) -> HttpResponse:
    """GET: the confirmation page; POST: the change, as a new generation (409 if the listener moved on)."""
    vip = scoped_vip(request, vip_pk)
    backend = get_object_or_404(Backend.objects.select_related("listener"), pk=backend_pk, listener__vip=vip)
    if not can_write(request.user, vip.tenant_id):
        raise PermissionDenied("Your role in this tenant is read-only (viewer).")
    target = request.POST.get("to") or request.GET.get("to") or ""
    if target not in STATE_VERBS:
        raise Http404(f"{target!r} is not a backend state (active, draining, disabled).")
    verb, consequence = STATE_VERBS[target]
    context: dict[str, Any] = {
        "vip": vip,
        "backend": backend,
        "target": target,
        "verb": verb,
        "consequence": consequence,
        "expected_generation": backend.listener.generation,
    }
    status = 200
    if request.method == "POST":
        try:
            _, result = services.update_backend(
                backend,
                {"admin_state": target},
                user=request.user,
                expected_generation=_expected_generation(request),
            )
        except StaleGeneration as exc:
            status = 409
            context["conflict"] = exc
            context["expected_generation"] = exc.current
        except DomainError as exc:
            status = exc.http_status
            context["error"] = str(exc)
        else:
            url = reverse("frontend:vip", args=[vip.pk])
            return redirect(f"{url}?changed={result.generation_number}#listener-{backend.listener_id}")
    return page(request, "frontend/backend_state.html", context, live=f"vip:{vip.pk}", status=status)


# --- agents -----------------------------------------------------------------------------------------


@operator_page
def agent_list(request: HttpRequest) -> HttpResponse:
    desired = PushSettings.objects.filter(pk=1).values_list("generation", flat=True).first() or 0
    refused: dict[int, list[AgentListenerAck]] = {}
    for ack in (
        AgentListenerAck.objects.exclude(error="").select_related("listener__vip").order_by("listener_id")
    ):
        refused.setdefault(ack.agent_id, []).append(ack)
    agents = []
    for agent in AgentNode.objects.select_related("host", "sync").order_by("role", "name"):
        sync = getattr(agent, "sync", None)
        stats = agent.last_stats or {}
        agents.append(
            {
                "agent": agent,
                "sync": sync,
                "connected": bool(sync and sync.connected),
                "behind": agent.applied_generation is None or agent.applied_generation < desired,
                "refused": refused.get(agent.pk, []),
                "simulated": bool(stats.get("simulated")),
                "headline": [(name, stats[name]) for name in HEADLINE_COUNTERS if name in stats],
                "bgp": {k: v for k, v in stats.items() if k.startswith("bgp")},
                "counters": sorted((k, v) for k, v in stats.items() if not k.startswith("bflows.")),
            }
        )
    return page(request, "frontend/agent_list.html", {"agents": agents, "desired": desired}, live="agents")


# --- VIP pools ---------------------------------------------------------------------------------------


def scoped_pools(user):
    pools = VipPool.objects.all()
    if is_operator(user):
        return pools
    allowed = VipPool.objects.filter(Q(shared=True) | Q(tenants__in=tenant_ids_for(user))).values("pk")
    return pools.filter(pk__in=allowed)


@dashboard_page
def pool_list(request: HttpRequest) -> HttpResponse:
    pools = (
        scoped_pools(request.user).annotate(vip_count=Count("vips")).prefetch_related("tenants").order_by("name")
    )
    return page(request, "frontend/pool_list.html", {"page_obj": paginate(request, pools)}, live="pools")


@dashboard_page
def pool_detail(request: HttpRequest, pk: int) -> HttpResponse:
    pool = get_object_or_404(scoped_pools(request.user), pk=pk)
    vips = restrict(pool.vips.select_related("tenant"), request.user, "tenant")
    vips = vips.order_by("tenant__name", "name")
    size = pool.network.num_addresses
    context = {
        "pool": pool,
        "page_obj": paginate(request, vips),
        "size": size,
        "used": pool.vips.count(),
        "tenants": pool.tenants.all()
        if is_operator(request.user)
        else tenants_for(request.user).filter(vip_pools=pool),
    }
    return page(request, "frontend/pool_detail.html", context, live="pools")
