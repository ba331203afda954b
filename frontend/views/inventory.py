"""Hosts and tenants: lists and detail pages (editing stays in the Django admin)."""

from __future__ import annotations

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404

from datacenter.inventory.models import Host
from datacenter.loadbalancing.models import AgentNode, Backend, Vip
from datacenter.tenancy.models import Membership
from datacenter.tenancy.scoping import is_operator, restrict, tenants_for

from .common import dashboard_page, page, paginate, sorted_by


def scoped_hosts(user):
    """Operators: every host; tenants: the hosts assigned to them (shared infrastructure stays hidden)."""
    return restrict(Host.objects.select_related("tenant"), user, "tenant")


@dashboard_page
def host_list(request: HttpRequest) -> HttpResponse:
    hosts = scoped_hosts(request.user).annotate(backend_count=Count("backends")).order_by("name")
    hosts, sort = sorted_by(request, hosts, {"name": "name", "address": "management_address"}, "name")
    return page(
        request, "frontend/host_list.html", {"page_obj": paginate(request, hosts), "sort": sort}, live="hosts"
    )


@dashboard_page
def host_detail(request: HttpRequest, pk: int) -> HttpResponse:
    host = get_object_or_404(scoped_hosts(request.user), pk=pk)
    backends = restrict(
        Backend.objects.filter(host=host).select_related("listener__vip"),
        request.user,
        "listener__vip__tenant",
    )
    context = {
        "host": host,
        "backends": paginate(request, backends.order_by("listener__vip__name", "listener__port", "position")),
        "agents": AgentNode.objects.filter(host=host).select_related("sync")
        if is_operator(request.user)
        else [],
    }
    return page(request, "frontend/host_detail.html", context, live="hosts")


@dashboard_page
def tenant_list(request: HttpRequest) -> HttpResponse:
    # explicit order: Django drops Meta.ordering from aggregating queries
    tenants = tenants_for(request.user).annotate(vip_count=Count("vips", distinct=True)).order_by("name")
    return page(
        request, "frontend/tenant_list.html", {"page_obj": paginate(request, tenants)}, live="tenants"
    )


@dashboard_page
def tenant_detail(request: HttpRequest, pk: int) -> HttpResponse:
    tenant = get_object_or_404(tenants_for(request.user), pk=pk)
    vips = Vip.objects.filter(tenant=tenant).annotate(listener_count=Count("listeners")).order_by("name")
    context = {
        "tenant": tenant,
        "vips": paginate(request, vips),
        "vip_total": vips.count(),
        "members": Membership.objects.filter(tenant=tenant).select_related("user"),
        "pools": tenant.vip_pools.all(),
        "hosts": Host.objects.filter(tenant=tenant),
    }
    return page(request, "frontend/tenant_detail.html", context, live=f"tenant:{tenant.pk}")
