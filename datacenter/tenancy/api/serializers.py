from __future__ import annotations

from django.contrib.auth import get_user_model
from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer, url_field

from ..models import TOKEN_PREFIX, ApiToken, Membership, Tenant


class TenantSerializer(BaseModelSerializer):
    url = url_field("tenancy-api:tenant-detail")

    class Meta:
        model = Tenant
        fields = [
            "id",
            "url",
            "display",
            "name",
            "slug",
            "description",
            "max_vips",
            "max_listeners_per_vip",
            "max_backends_per_listener",
            "created",
            "updated",
        ]


class MembershipSerializer(BaseModelSerializer):
    url = url_field("tenancy-api:membership-detail")
    user = serializers.SlugRelatedField(slug_field="username", queryset=get_user_model().objects.all())

    class Meta:
        model = Membership
        fields = ["id", "url", "display", "user", "tenant", "role", "created"]


class ApiTokenSerializer(BaseModelSerializer):
    url = url_field("tenancy-api:apitoken-detail")
    key_prefix = serializers.SerializerMethodField()
    user = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "url",
            "display",
            "user",
            "name",
            "key_prefix",
            "write_enabled",
            "expires",
            "last_used",
            "created",
        ]
        read_only_fields = ["last_used", "created"]

    def get_key_prefix(self, obj) -> str:
        return f"{TOKEN_PREFIX}{obj.key_lookup}"


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    key = serializers.CharField(read_only=True, help_text="The token key; shown only in this response.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "key"]


class WhoAmISerializer(serializers.Serializer):
    username = serializers.CharField()
    operator = serializers.BooleanField()
    token_write_enabled = serializers.BooleanField(allow_null=True)
    memberships = serializers.ListField(child=serializers.DictField())
