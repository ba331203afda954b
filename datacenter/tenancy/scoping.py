"""How a queryset is restricted to the tenants a user may see, and who may write where.

Tenant isolation lives here, in the queryset layer: a viewset asks `restrict(queryset, user,
tenant_field)` and objects of other tenants simply do not exist for it (404, never 403).
Operators (`is_staff` or superuser) see and change everything.

Roles: viewer reads; member and admin read and write (see `choices.MembershipRole`).
"""

from __future__ import annotations

from django.db.models import Q, QuerySet

from .choices import WRITE_ROLES
from .models import Tenant
from .rows import roles_of


def is_operator(user) -> bool:
    return bool(user and user.is_authenticated and (user.is_staff or user.is_superuser))


def _cached_roles(user) -> dict[int, str]:
    """{tenant_id: role} for a user, memoised on the user object for the length of a request."""
    roles = getattr(user, "_tenant_roles_cache", None)
    if roles is None:
        roles = roles_of(user.pk)  # Membership rows in precompiled SQL (rows.py)
        user._tenant_roles_cache = roles
    return roles


def forget_roles(user) -> None:
    """Drop the memoised roles (after memberships of this user changed)."""
    if hasattr(user, "_tenant_roles_cache"):
        del user._tenant_roles_cache


def tenant_ids_for(user) -> list[int]:
    """Ids of the tenants a non-operator user is a member of (any role)."""
    if not (user and user.is_authenticated):
        return []
    return sorted(_cached_roles(user))


def writable_tenant_ids_for(user) -> list[int]:
    if not (user and user.is_authenticated):
        return []
    return sorted(tid for tid, role in _cached_roles(user).items() if role in WRITE_ROLES)


def role_in(user, tenant_id: int | None) -> str | None:
    if tenant_id is None or not (user and user.is_authenticated):
        return None
    return _cached_roles(user).get(tenant_id)


def tenants_for(user) -> QuerySet[Tenant]:
    """The tenants a user can see: all for operators, their memberships otherwise."""
    if is_operator(user):
        return Tenant.objects.all()
    return Tenant.objects.filter(id__in=tenant_ids_for(user))


def restrict(
    queryset: QuerySet, user, tenant_field: str = "tenant", *, include_shared: bool = False
) -> QuerySet:
    """Restrict `queryset` to rows whose `tenant_field` is one of the user's tenants.

    `tenant_field` is the lookup path to the tenant, e.g. "vip__tenant" for listeners.
    `include_shared` also keeps rows whose tenant is NULL (shared infrastructure, e.g. operator
    events that tenants may read are never NULL; use it only where NULL means "for everyone").
    """
    if is_operator(user):
        return queryset
    condition = Q(**{f"{tenant_field}__in": tenant_ids_for(user)})
    if include_shared:
        condition |= Q(**{f"{tenant_field}__isnull": True})
    return queryset.filter(condition)


def can_write(user, tenant_id: int | None) -> bool:
    """May `user` change objects of tenant `tenant_id`? (operators: always; viewers: never)."""
    if is_operator(user):
        return True
    return role_in(user, tenant_id) in WRITE_ROLES


def can_read(user, tenant_id: int | None) -> bool:
    if is_operator(user):
        return True
    return role_in(user, tenant_id) is not None
