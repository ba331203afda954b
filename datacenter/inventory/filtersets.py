import django_filters

from datacenter.api.filters import IPAddressFilter

from .choices import HostRole
from .models import Host


class HostFilterSet(django_filters.FilterSet):
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    management_address = IPAddressFilter()
    role = django_filters.ChoiceFilter(choices=HostRole.choices, method="filter_role")

    class Meta:
        model = Host
        fields = ["id", "name", "management_address", "tenant"]

    def filter_role(self, queryset, name, value):
        # Roles are a JSON list; a quoted-name match works on PostgreSQL and SQLite alike.
        return queryset.filter(roles__icontains=f'"{value}"')
