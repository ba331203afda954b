"""Shared viewsets: tenant scoping in the queryset, role checks on writes, audit of operator CRUD.

`TenantScopedViewSet` is the one place that hides other tenants' objects (404) and refuses writes
to viewers (403); subclasses only say where the tenant is (`tenant_field`).
"""

from __future__ import annotations

from django.db import transaction
from rest_framework import viewsets
from rest_framework.exceptions import PermissionDenied

from datacenter.events.services import record_change, snapshot
from datacenter.tenancy.permissions import IsOperator, IsOperatorOrReadOnly, TenantWritePermission
from datacenter.tenancy.scoping import can_write, restrict


class TenantScopedMixin:
    tenant_field = "tenant"  # lookup path from the model to its Tenant, e.g. "vip__tenant"
    permission_classes = [TenantWritePermission]

    def get_queryset(self):
        return restrict(super().get_queryset(), self.request.user, self.tenant_field)

    def tenant_id_of(self, obj) -> int | None:
        *path, last = self.tenant_field.split("__")
        value = obj
        for part in path:
            value = getattr(value, part)
        return getattr(value, f"{last}_id")

    def require_write(self, tenant_id: int | None) -> None:
        if not can_write(self.request.user, tenant_id):
            raise PermissionDenied("Your role in this tenant is read-only (viewer).")


class TenantScopedViewSet(TenantScopedMixin, viewsets.ModelViewSet):
    pass


class TenantScopedReadOnlyViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    pass


class AuditedModelViewSet(viewsets.ModelViewSet):
    """Plain CRUD (operator objects) that still writes an AuditEntry and an Event per change."""

    audit_tenant_field: str | None = None  # attribute holding the tenant id for the event, if any
    audit_exclude = ("token_hash", "key_hash")  # never copy secrets' hashes into audit rows

    def _snapshot(self, obj) -> dict:
        data = snapshot(obj)
        for name in self.audit_exclude:
            data.pop(name, None)
        return data

    def _tenant_id(self, obj) -> int | None:
        return getattr(obj, self.audit_tenant_field) if self.audit_tenant_field else None

    def perform_create(self, serializer):
        with transaction.atomic():
            obj = serializer.save()
            record_change(
                user=self.request.user,
                action="create",
                obj=obj,
                tenant_id=self._tenant_id(obj),
                before=None,
                after=self._snapshot(obj),
            )

    def perform_update(self, serializer):
        with transaction.atomic():
            before = self._snapshot(serializer.instance)
            obj = serializer.save()
            record_change(
                user=self.request.user,
                action="update",
                obj=obj,
                tenant_id=self._tenant_id(obj),
                before=before,
                after=self._snapshot(obj),
            )

    def perform_destroy(self, instance):
        with transaction.atomic():
            record_change(
                user=self.request.user,
                action="delete",
                obj=instance,
                tenant_id=self._tenant_id(instance),
                before=self._snapshot(instance),
                after=None,
            )
            instance.delete()


class OperatorViewSet(AuditedModelViewSet):
    permission_classes = [IsOperator]


class OperatorWriteViewSet(AuditedModelViewSet):
    """Operators write; other users read what `get_queryset` shows them."""

    permission_classes = [IsOperatorOrReadOnly]
