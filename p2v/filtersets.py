"""django-filter filtersets for the P2V API (and the dashboard)."""

import django_filters

from .models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent


class MachineFilterSet(django_filters.FilterSet):
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")

    class Meta:
        model = Machine
        fields = ["id", "name", "address", "tenant", "policy", "host_key_source"]


class AssessmentFilterSet(django_filters.FilterSet):
    class Meta:
        model = Assessment
        fields = ["id", "machine", "status", "trigger", "compatible"]


class ConversionEventFilterSet(django_filters.FilterSet):
    class Meta:
        model = ConversionEvent
        fields = ["id", "machine", "kind", "status"]


class ConversionPolicyFilterSet(django_filters.FilterSet):
    class Meta:
        model = ConversionPolicy
        fields = ["id", "name", "is_default", "mode"]


class SecurityEventFilterSet(django_filters.FilterSet):
    class Meta:
        model = SecurityEvent
        fields = ["id", "machine", "kind"]
