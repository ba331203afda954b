from __future__ import annotations

from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer, url_field

from ..choices import HostRole
from ..models import Host


class HostSerializer(BaseModelSerializer):
    url = url_field("inventory-api:host-detail")
    roles = serializers.ListField(child=serializers.ChoiceField(choices=HostRole.choices), required=False)

    class Meta:
        model = Host
        fields = [
            "id",
            "url",
            "display",
            "name",
            "management_address",
            "roles",
            "tenant",
            "description",
            "created",
            "updated",
        ]

    def validate_roles(self, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise serializers.ValidationError(f"roles {value} contain duplicates.")
        return value
