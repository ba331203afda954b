import django_filters

from .models import AuditEntry


class AuditEntryFilterSet(django_filters.FilterSet):
    time_after = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="gte")
    time_before = django_filters.IsoDateTimeFilter(field_name="time", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["id", "tenant", "action", "object_type", "object_id", "actor", "request_id"]
