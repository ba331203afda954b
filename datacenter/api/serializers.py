"""Base serializer: every object carries `id`, `url` and a human `display` string (NetBox style)."""

from __future__ import annotations

from rest_framework import serializers


class BaseModelSerializer(serializers.ModelSerializer):
    display = serializers.SerializerMethodField()

    def get_display(self, obj) -> str:
        return str(obj)


def url_field(view_name: str) -> serializers.HyperlinkedIdentityField:
    return serializers.HyperlinkedIdentityField(view_name=view_name)
