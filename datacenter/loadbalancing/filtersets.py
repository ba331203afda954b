"""django-filter filtersets; the same filters serve the API and (later) the dashboard."""

import django_filters

from datacenter.api.filters import IPAddressFilter

from .models import AgentNode, Backend, Generation, Listener, Vip, VipPool


class VipPoolFilterSet(django_filters.FilterSet):
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")

    class Meta:
        model = VipPool
        fields = ["id", "name", "prefix", "shared"]


class VipFilterSet(django_filters.FilterSet):
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    address = IPAddressFilter()

    class Meta:
        model = Vip
        fields = ["id", "tenant", "pool", "name", "address", "provisioning_status", "operating_status"]


class ListenerFilterSet(django_filters.FilterSet):
    tenant = django_filters.NumberFilter(field_name="vip__tenant")

    class Meta:
        model = Listener
        fields = ["id", "vip", "protocol", "port", "fast_path", "provisioning_status", "operating_status"]


class BackendFilterSet(django_filters.FilterSet):
    vip = django_filters.NumberFilter(field_name="listener__vip")
    host = django_filters.CharFilter(field_name="host__name")
    address = IPAddressFilter()

    class Meta:
        model = Backend
        fields = ["id", "listener", "address", "port", "admin_state"]


class GenerationFilterSet(django_filters.FilterSet):
    number__gte = django_filters.NumberFilter(field_name="number", lookup_expr="gte")

    class Meta:
        model = Generation
        fields = ["id", "listener", "number"]


class AgentNodeFilterSet(django_filters.FilterSet):
    class Meta:
        model = AgentNode
        fields = ["id", "name", "host", "role", "enabled"]
