from __future__ import annotations

from datacenter.api.viewsets import OperatorWriteViewSet
from datacenter.tenancy.scoping import restrict

from ..filtersets import HostFilterSet
from ..models import Host
from . import serializers


class HostViewSet(OperatorWriteViewSet):
    """Operators manage hosts; tenants read the hosts assigned to them (shared hosts stay hidden)."""

    queryset = Host.objects.all()
    serializer_class = serializers.HostSerializer
    filterset_class = HostFilterSet
    ordering_fields = ["name", "created"]
    audit_tenant_field = "tenant_id"

    def get_queryset(self):
        return restrict(super().get_queryset(), self.request.user, "tenant")
