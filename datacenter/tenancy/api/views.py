from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from datacenter.api.viewsets import OperatorWriteViewSet
from datacenter.events.services import record_change, snapshot
from datacenter.tenancy.permissions import IsAuthenticatedWithTokenScope

from ..filtersets import ApiTokenFilterSet, MembershipFilterSet, TenantFilterSet
from ..models import ApiToken, Membership, Tenant
from ..scoping import forget_roles, is_operator, restrict, tenants_for
from . import serializers
from .rotation import GRACE_PARAM, grace_seconds


class TenantViewSet(OperatorWriteViewSet):
    """Operators manage tenants and their quotas; members read their own tenants."""

    queryset = Tenant.objects.all()
    serializer_class = serializers.TenantSerializer
    filterset_class = TenantFilterSet
    ordering_fields = ["name", "created"]

    def get_queryset(self):
        return tenants_for(self.request.user)


class MembershipViewSet(OperatorWriteViewSet):
    """Operators manage who belongs to which tenant; users read their tenants' memberships."""

    queryset = Membership.objects.select_related("user", "tenant")
    serializer_class = serializers.MembershipSerializer
    filterset_class = MembershipFilterSet
    audit_tenant_field = "tenant_id"

    def get_queryset(self):
        return restrict(super().get_queryset(), self.request.user, "tenant")

    def perform_create(self, serializer):
        super().perform_create(serializer)
        forget_roles(serializer.instance.user)


class ApiTokenViewSet(
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    mixins.ListModelMixin,
    viewsets.GenericViewSet,
):
    """Your own API tokens. The key is returned once, by the create call; only its hash is stored."""

    queryset = ApiToken.objects.select_related("user")
    serializer_class = serializers.ApiTokenSerializer
    filterset_class = ApiTokenFilterSet
    permission_classes = [IsAuthenticatedWithTokenScope]

    def get_queryset(self):
        return super().get_queryset().filter(user=self.request.user)

    @extend_schema(responses={201: serializers.ApiTokenCreatedSerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            token, key = ApiToken.objects.create_token(
                request.user,
                name=serializer.validated_data.get("name", ""),
                write_enabled=serializer.validated_data.get("write_enabled", True),
                expires=serializer.validated_data.get("expires"),
            )
            record_change(
                user=request.user,
                action="create",
                obj=token,
                tenant_id=None,
                before=None,
                after={"name": token.name, "write_enabled": token.write_enabled},
            )
        body = serializers.ApiTokenCreatedSerializer(token, context=self.get_serializer_context()).data
        body["key"] = key
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(
        request=None, parameters=[GRACE_PARAM], responses={201: serializers.ApiTokenCreatedSerializer}
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def rotate(self, request, pk=None):
        """A new token with the same name, scope and expiry; the old one keeps working for the grace
        window (`grace_s`), then expires. The new key is in this answer only."""
        grace_s = grace_seconds(request)
        with transaction.atomic():
            old = ApiToken.objects.select_for_update().get(pk=self.get_object().pk)
            token, key = ApiToken.objects.create_token(
                request.user, name=old.name, write_enabled=old.write_enabled, expires=old.expires
            )
            ends = timezone.now() + timedelta(seconds=grace_s)
            old.expires = ends if old.expires is None else min(old.expires, ends)
            old.save(update_fields=["expires"])
            record_change(
                user=request.user, action="rotate", obj=old, tenant_id=None, before=None,
                after={"replaced_by": token.pk, "old_expires": old.expires.isoformat()},
            )
        body = serializers.ApiTokenCreatedSerializer(token, context=self.get_serializer_context()).data
        body["key"] = key
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer):
        with transaction.atomic():
            before = snapshot(serializer.instance)
            token = serializer.save()
            before.pop("key_hash", None)
            after = snapshot(token)
            after.pop("key_hash", None)
            record_change(
                user=self.request.user, action="update", obj=token, tenant_id=None, before=before, after=after
            )

    def perform_destroy(self, instance):
        with transaction.atomic():
            record_change(
                user=self.request.user,
                action="delete",
                obj=instance,
                tenant_id=None,
                before={"name": instance.name},
                after=None,
            )
            instance.delete()


class WhoAmIView(APIView):
    """Who the caller is, their memberships and whether their token may write (a trivial endpoint)."""

    permission_classes = [IsAuthenticatedWithTokenScope]

    @extend_schema(responses=serializers.WhoAmISerializer)
    def get(self, request):
        token = request.auth if isinstance(request.auth, ApiToken) else None
        memberships = [
            {"tenant": m.tenant_id, "tenant_name": m.tenant.name, "role": m.role}
            for m in Membership.objects.filter(user=request.user).select_related("tenant")
        ]
        return Response(
            {
                "username": request.user.get_username(),
                "operator": is_operator(request.user),
                "token_write_enabled": token.write_enabled if token else None,
                "memberships": memberships,
            }
        )
