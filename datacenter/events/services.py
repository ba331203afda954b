"""Recording changes: one AuditEntry (who, what, before/after) and one Event (feed) per change."""

from __future__ import annotations

import json
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models

from .middleware import current_request_id
from .models import AuditEntry, Event


def snapshot(obj: models.Model) -> dict[str, Any]:
    """JSON-safe dict of a model's concrete fields (foreign keys as ids) for before/after."""
    data = {}
    for field in obj._meta.concrete_fields:
        data[field.attname] = field.value_from_object(obj)
    return json.loads(json.dumps(data, cls=DjangoJSONEncoder))


def actor_name(user) -> str:
    if user is None or not getattr(user, "is_authenticated", False):
        return "system"
    return user.get_username()


def record_change(
    *,
    user,
    action: str,
    obj: models.Model,
    tenant_id: int | None,
    before: dict | list | None,
    after: dict | list | None,
    event_kind: str | None = None,
    event_data: dict | None = None,
    request_id: str | None = None,
) -> tuple[AuditEntry, Event]:
    """Write the audit entry and the feed event for one change of `obj` (call inside the transaction).

    `action` is a verb ("create", "update", "delete", "replace_backends"); the event kind defaults
    to "<model>.<action>d"-like "<model>.<action>" (e.g. "vip.create").
    """
    request_id = current_request_id() if request_id is None else request_id
    object_type = obj._meta.label_lower
    object_id = "" if obj.pk is None else str(obj.pk)
    audit = AuditEntry.objects.create(
        user=user if getattr(user, "is_authenticated", False) else None,
        actor=actor_name(user),
        tenant_id=tenant_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        object_repr=str(obj)[:200],
        before=before,
        after=after,
        request_id=request_id,
    )
    event = Event.objects.create(
        tenant_id=tenant_id,
        kind=event_kind or f"{obj._meta.model_name}.{action}",
        object_type=object_type,
        object_id=object_id,
        data=event_data if event_data is not None else _default_event_data(before, after),
        request_id=request_id,
    )
    return audit, event


def _default_event_data(before, after) -> dict:
    if after is not None:
        return {"after": after}
    if before is not None:
        return {"before": before}
    return {}
