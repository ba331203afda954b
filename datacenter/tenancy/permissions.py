"""API permissions: authenticated, read-only tokens cannot write, tenant roles for writes."""

from __future__ import annotations

from rest_framework import permissions

from .models import ApiToken
from .scoping import can_write, is_operator


class IsAuthenticatedWithTokenScope(permissions.IsAuthenticated):
    """Authenticated; a token created read-only may only use safe methods."""

    message = "This API token is read-only."

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        token = request.auth
        if isinstance(token, ApiToken) and not token.write_enabled:
            return request.method in permissions.SAFE_METHODS
        return True


class IsOperatorOrReadOnly(IsAuthenticatedWithTokenScope):
    """Operators write; everyone else (authenticated) reads what their queryset shows them.

    On a detail route the refusal waits for the object lookup, so an object the caller cannot see
    is 404 for writes too (never 403, which would confirm that it exists).
    """

    message = "Only operators may change this."

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        if request.method in permissions.SAFE_METHODS or is_operator(request.user):
            return True
        return bool(getattr(view, "detail", False))

    def has_object_permission(self, request, view, obj) -> bool:
        return request.method in permissions.SAFE_METHODS or is_operator(request.user)


class IsOperator(IsAuthenticatedWithTokenScope):
    message = "Only operators may use this endpoint."

    def has_permission(self, request, view) -> bool:
        return super().has_permission(request, view) and is_operator(request.user)


class TenantWritePermission(IsAuthenticatedWithTokenScope):
    """Writes on a tenant's object need the member or admin role in that tenant (viewers: 403).

    The view exposes `tenant_id_of(obj)`; objects of other tenants never reach here because the
    queryset already hid them (404).
    """

    def has_object_permission(self, request, view, obj) -> bool:
        if request.method in permissions.SAFE_METHODS:
            return True
        if not can_write(request.user, view.tenant_id_of(obj)):
            self.message = "Your role in this tenant is read-only (viewer)."
            return False
        return True
