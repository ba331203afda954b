"""The overview: counts and health at a glance, and the event feed (updated live)."""

from __future__ import annotations

import time

from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from datacenter.events.models import Event
from datacenter.loadbalancing.choices import AgentRole, BackendState, OperatingStatus, ProvisioningStatus
from datacenter.loadbalancing.models import AgentNode, Backend, Listener, ListenerTable, PushSettings, Vip
from datacenter.tenancy.scoping import is_operator, restrict, tenants_for

from .common import dashboard_page, page

FEED_SIZE = 25


def _status_counts(queryset, field: str, choices) -> list[tuple[str, str, int]]:
    counts = dict(queryset.order_by().values_list(field).annotate(n=Count("pk")))
    return [(value, label, counts.get(value, 0)) for value, label in choices.choices]


def bypass_vip_ids(vips) -> set[int]:
    """VIPs whose listeners all have exactly one serving backend, on one host (the bypass rule of
    docs/dataplane.md: muxes announce them with that host as next hop and keep no state)."""
    listeners = dict(
        Listener.objects.filter(vip__in=vips).order_by().values_list("vip").annotate(n=Count("pk"))
    )
    serving = (
        Backend.objects.filter(listener__vip__in=vips, admin_state=BackendState.ACTIVE)
        .order_by()
        .values_list("listener__vip")
        .annotate(
            backends=Count("pk"),
            listeners=Count("listener", distinct=True),
            hosts=Count("host", distinct=True),
            hostless=Count("pk", filter=Q(host__isnull=True)),
        )
    )
    return {
        vip
        for vip, backends, with_backends, hosts, hostless in serving
        if backends == with_backends == listeners.get(vip) and hosts == 1 and hostless == 0
    }


def lb_summary(user) -> dict:
    vips = restrict(Vip.objects.all(), user, "tenant")
    listeners = restrict(Listener.objects.all(), user, "vip__tenant")
    in_transition = (
        ListenerTable.objects.filter(
            listener__in=listeners, previous__isnull=False, previous__drain_deadline__gt=time.time()
        )
        .values("listener__vip")
        .distinct()
        .count()
    )
    return {
        "vip_count": vips.count(),
        "vip_provisioning": _status_counts(vips, "provisioning_status", ProvisioningStatus),
        "listener_provisioning": _status_counts(listeners, "provisioning_status", ProvisioningStatus),
        "listener_operating": _status_counts(listeners, "operating_status", OperatingStatus),
        "vips_in_transition": in_transition,
        "vips_in_bypass": len(bypass_vip_ids(vips)),
    }


def agent_summary() -> dict:
    desired = PushSettings.objects.filter(pk=1).values_list("generation", flat=True).first() or 0
    rows = AgentNode.objects.filter(enabled=True).aggregate(
        muxes=Count("pk", filter=Q(role=AgentRole.MUX)),
        hosts=Count("pk", filter=Q(role=AgentRole.HOST)),
        online=Count("pk", filter=Q(sync__connected=True)),
        behind=Count(
            "pk",
            filter=Q(sync__connected=True)
            & (Q(applied_generation__lt=desired) | Q(applied_generation__isnull=True)),
        ),
        failing=Count("pk", filter=Q(sync__connected=True) & ~Q(sync__error="")),
        simulated=Count("pk", filter=Q(last_stats__simulated=1)),
        total=Count("pk"),
    )
    rows["offline"] = rows["total"] - rows["online"]
    rows["desired_generation"] = desired
    return rows


def p2v_summary() -> dict:
    from p2v.choices import ConversionEventStatus
    from p2v.conversion.choices import JobState
    from p2v.conversion.models import ConversionJob
    from p2v.models import ConversionEvent, Machine

    jobs = ConversionJob.objects.aggregate(
        running=Count("pk", filter=Q(state__in=[JobState.RUNNING, JobState.QUEUED])),
        failed=Count("pk", filter=Q(state=JobState.FAILED)),
        succeeded=Count("pk", filter=Q(state=JobState.SUCCEEDED)),
    )
    return {
        **jobs,
        "machines": Machine.objects.count(),
        "approvals_waiting": ConversionEvent.objects.filter(
            status=ConversionEventStatus.PENDING_APPROVAL
        ).count(),
    }


def feed(user, limit: int = FEED_SIZE) -> list[Event]:
    return list(restrict(Event.objects.all(), user, "tenant").order_by("-id")[:limit])


@dashboard_page
def overview(request: HttpRequest) -> HttpResponse:
    context = {"lb": lb_summary(request.user), "feed": feed(request.user), "now": timezone.now()}
    if not is_operator(request.user):
        context["tenants"] = list(tenants_for(request.user)[:50])
    if is_operator(request.user):
        context["agents"] = agent_summary()
        context["p2v"] = p2v_summary()
    return page(request, "frontend/overview.html", context, live="overview")
