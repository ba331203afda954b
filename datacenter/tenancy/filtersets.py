import django_filters

from .models import ApiToken, Membership, Tenant


class TenantFilterSet(django_filters.FilterSet):
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")

    class Meta:
        model = Tenant
        fields = ["id", "name", "slug"]


class MembershipFilterSet(django_filters.FilterSet):
    user = django_filters.CharFilter(field_name="user__username")

    class Meta:
        model = Membership
        fields = ["id", "tenant", "role"]


class ApiTokenFilterSet(django_filters.FilterSet):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "write_enabled"]
