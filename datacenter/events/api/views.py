"""Audit log (read-only) and the event feed: GET /api/events/?since=<id>&limit=<n>."""

from __future__ import annotations

import re

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from datacenter.api.viewsets import TenantScopedReadOnlyViewSet
from datacenter.tenancy.permissions import IsAuthenticatedWithTokenScope
from datacenter.tenancy.scoping import restrict

from ..filtersets import AuditEntryFilterSet
from ..models import AuditEntry, Event
from . import serializers

FEED_DEFAULT_LIMIT = 100
FEED_MAX_LIMIT = 1000


class AuditEntryViewSet(TenantScopedReadOnlyViewSet):
    """Who changed what: operators see everything, members see their tenants' entries."""

    queryset = AuditEntry.objects.all()
    serializer_class = serializers.AuditEntrySerializer
    filterset_class = AuditEntryFilterSet
    ordering_fields = ["id", "time"]


def _non_negative_int(request, name: str, default: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw):  # ASCII digits: str.isdigit() also takes "²"
        raise ValidationError({name: [f"{raw!r} is not a non-negative integer."]})
    value = int(raw)
    if maximum is not None and value > maximum:
        raise ValidationError({name: [f"{value} is above the maximum {maximum}."]})
    return value


class EventFeedView(APIView):
    """Changes visible to the caller with id > since, oldest first. Poll with the returned next_since."""

    permission_classes = [IsAuthenticatedWithTokenScope]

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "since", {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                description="Return events with a larger id (default 0).",
            ),
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 0, "maximum": FEED_MAX_LIMIT},
                description=f"At most this many (default {FEED_DEFAULT_LIMIT}, max {FEED_MAX_LIMIT}).",
            ),
            OpenApiParameter("kind", OpenApiTypes.STR, description="Only events of this kind."),
        ],
        responses=serializers.EventFeedSerializer,
    )
    def get(self, request):
        since = _non_negative_int(request, "since", 0)
        limit = _non_negative_int(request, "limit", FEED_DEFAULT_LIMIT, FEED_MAX_LIMIT) or FEED_DEFAULT_LIMIT
        events = restrict(Event.objects.filter(id__gt=since), request.user, "tenant").order_by("id")
        kind = request.query_params.get("kind")
        if kind:
            events = events.filter(kind=kind)
        page = list(events[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit]
        return Response(
            {
                "results": serializers.EventSerializer(page, many=True).data,
                "next_since": page[-1].id if page else since,
                "has_more": has_more,
            }
        )
