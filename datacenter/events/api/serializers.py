from __future__ import annotations

from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer, url_field

from ..models import AuditEntry, Event


class AuditEntrySerializer(BaseModelSerializer):
    url = url_field("events-api:auditentry-detail")

    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "url",
            "display",
            "time",
            "actor",
            "tenant",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "before",
            "after",
            "request_id",
        ]
        read_only_fields = fields


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["id", "time", "tenant", "kind", "object_type", "object_id", "data", "request_id"]
        read_only_fields = fields


class EventFeedSerializer(serializers.Serializer):
    results = EventSerializer(many=True)
    next_since = serializers.IntegerField(help_text="Pass as ?since= to get the events after these.")
    has_more = serializers.BooleanField()
