"""The audit log with filters (who, what, object, time), scoped like the API's /api/audit/."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from datacenter.events.filtersets import AuditEntryFilterSet
from datacenter.events.models import AuditEntry
from datacenter.tenancy.scoping import restrict

from .common import dashboard_page, page, paginate


@dashboard_page
def audit_log(request: HttpRequest) -> HttpResponse:
    scoped = restrict(AuditEntry.objects.all(), request.user, "tenant")
    filters = AuditEntryFilterSet(request.GET, queryset=scoped, request=request)
    entries = filters.qs.select_related("tenant").order_by("-id") if filters.is_valid() else scoped.none()
    actions = scoped.order_by().values_list("action", flat=True).distinct()
    object_types = scoped.order_by().values_list("object_type", flat=True).distinct()
    context = {
        "page_obj": paginate(request, entries),
        "filters": filters,
        "actions": sorted(actions),
        "object_types": sorted(object_types),
        "query": request.GET.copy(),
    }
    return page(request, "frontend/audit_log.html", context, live="audit")
