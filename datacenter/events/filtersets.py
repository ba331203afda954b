import datetime

import django_filters
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField

from .models import AuditEntry


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 time, handed to the database in UTC. PostgreSQL refuses UTC offsets beyond
    +-15:59 and times before year 1, both of which ISO 8601 and Python accept (a 500 before)."""

    def to_python(self, value):
        parsed = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(datetime.UTC)
        except OverflowError:  # before year 1 or after 9999 once in UTC
            raise ValidationError(f"{value!r} is out of range once in UTC", code="invalid") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class AuditEntryFilterSet(django_filters.FilterSet):
    time_after = UtcIsoDateTimeFilter(field_name="time", lookup_expr="gte")
    time_before = UtcIsoDateTimeFilter(field_name="time", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["id", "tenant", "action", "object_type", "object_id", "actor", "request_id"]
