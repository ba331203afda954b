"""GET /api/vips/{id}/status/: what the muxes actually run for a VIP, as a tree
(VIP -> listeners -> backends with health, and per listener each mux's acknowledged generation)."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datacenter.tenancy.scoping import restrict

from ..choices import AgentRole, BackendState
from ..models import AgentNode, Vip
from ..models_sync import AgentListenerAck, AgentSync, PushSettings

MAX_ID = 2**63 - 1


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def vip_status_tree(vip: Vip) -> dict[str, Any]:
    agents = list(AgentNode.objects.filter(enabled=True).order_by("name"))
    syncs = {s.agent_id: s for s in AgentSync.objects.filter(agent__in=agents)}
    listeners = list(
        vip.listeners.select_related("table").prefetch_related("backends").order_by("protocol", "port")
    )
    acks = {}
    refusals = {}  # (agent, listener) -> why the agent cannot run this listener's generation
    for a in AgentListenerAck.objects.filter(listener__in=listeners):
        acks[(a.agent_id, a.listener_id)] = a.generation
        if a.error:
            refusals[(a.agent_id, a.listener_id)] = a.error
    muxes = [a for a in agents if a.role == AgentRole.MUX]
    votes = [syncs[a.pk].unhealthy for a in muxes if a.pk in syncs and syncs[a.pk].connected]

    def health_of(listener_id: int, address: str, port: int) -> dict[str, Any]:
        key = f"{listener_id}|{address}|{port}"
        reasons = [v[key] for v in votes if key in v]
        if not votes:
            return {"health": "unknown", "reports_down": 0, "reporters": 0, "reason": None}
        return {
            "health": "unhealthy" if len(reasons) * 2 > len(votes) else "healthy",
            "reports_down": len(reasons),
            "reporters": len(votes),
            "reason": reasons[0] if reasons else None,
        }

    listener_nodes = []
    for listener in listeners:
        table = getattr(listener, "table", None)
        number = table.number if table else None
        in_table = (
            {(b["address"], b["port"]) for b in table.backends if b["state"] == BackendState.ACTIVE}
            if table
            else set()
        )
        backends = []
        for backend in sorted(listener.backends.all(), key=lambda b: b.position):
            node = {
                "address": backend.address,
                "port": backend.port,
                "weight": backend.weight,
                "admin_state": backend.admin_state,
                "in_table": (backend.address, backend.port) in in_table,
            }
            if listener.health_check:
                node.update(health_of(listener.pk, backend.address, backend.port))
            else:
                node.update({"health": "not_monitored", "reports_down": 0, "reporters": 0, "reason": None})
            backends.append(node)
        agent_nodes = []
        for mux in muxes:
            sync = syncs.get(mux.pk)
            applied = acks.get((mux.pk, listener.pk))
            refusal = refusals.get((mux.pk, listener.pk))
            error = None
            if number is not None and applied is not None and applied >= number:
                state = "active"
            elif refusal:  # this listener's own VIP: the reason concerns only this tenant
                state, error = "error", refusal
            elif sync is not None and sync.error:
                state, error = "error", sync.error
            else:
                state = "pending"
            agent_nodes.append(
                {"agent": mux.name, "applied_generation": applied, "status": state, "error": error}
            )
        listener_nodes.append(
            {
                "id": listener.pk,
                "protocol": listener.protocol,
                "port": listener.port,
                "config_generation": listener.generation,
                "generation": number,
                "provisioning_status": listener.provisioning_status,
                "operating_status": listener.operating_status,
                "draining_until": table.previous["drain_deadline"] if table and table.previous else None,
                "backends": backends,
                "agents": agent_nodes,
            }
        )
    return {
        "vip": {
            "id": vip.pk,
            "name": vip.name,
            "address": vip.address,
            "provisioning_status": vip.provisioning_status,
            "operating_status": vip.operating_status,
        },
        "document_generation": PushSettings.objects.filter(pk=1).values_list("generation", flat=True).first()
        or 0,
        "listeners": listener_nodes,
        "agents": [
            {
                "name": a.name,
                "role": a.role,
                "connected": bool(syncs.get(a.pk) and syncs[a.pk].connected),
                "version": syncs[a.pk].version if a.pk in syncs else None,
                "last_seen": _iso(a.last_seen),
                "applied_generation": a.applied_generation,
                "applied_at": _iso(a.applied_at),
                "error": (syncs[a.pk].error or None) if a.pk in syncs else None,
            }
            for a in agents
        ],
    }


class VipStatusView(APIView):
    """The VIP's status tree for its tenant's members and for operators (others get 404)."""

    @extend_schema(
        responses={200: OpenApiTypes.OBJECT},
        summary="Status tree of a VIP: listeners, backends, health, and the generation each mux runs",
    )
    def get(self, request: Request, pk: int) -> Response:
        if pk > MAX_ID:
            raise Http404("No VIP matches the given query.")  # beyond bigint: no such row, not a 500
        vip = get_object_or_404(restrict(Vip.objects.all(), request.user, "tenant"), pk=pk)
        return Response(vip_status_tree(vip))
