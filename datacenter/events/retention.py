"""Pruning history by age and count, so a busy portal's audit trail, event feed and generation
history stop growing without bound (each backend replace writes one row of each). What the
history and audit views need is kept: every listener's newest generations (the current one
always), and audit entries and events within the configured age and count."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F
from django.utils import timezone

logger = logging.getLogger("datacenter.events.retention")

DELETE_BATCH = 5000  # rows per DELETE: short transactions, no long lock on a busy table


def _delete_in_batches(queryset: models.QuerySet) -> int:
    """Delete the rows of `queryset` by primary key, DELETE_BATCH at a time."""
    deleted = 0
    while True:
        ids = list(queryset.order_by("pk").values_list("pk", flat=True)[:DELETE_BATCH])
        if not ids:
            return deleted
        # A queryset delete: the append-only guard is on single-row delete(); pruning is deliberate.
        count, _ = queryset.model.objects.filter(pk__in=ids).delete()
        deleted += count


def prune_by_age_and_count(model: type[models.Model], *, days: int, keep_max: int, now: datetime) -> int:
    """Rows of `model` (with a `time` field, ids growing with time) older than `days` or beyond
    the newest `keep_max`."""
    deleted = _delete_in_batches(model.objects.filter(time__lt=now - timedelta(days=days)))
    newest_ids = model.objects.order_by("-pk").values_list("pk", flat=True)
    boundary = list(newest_ids[keep_max : keep_max + 1])
    if boundary:
        deleted += _delete_in_batches(model.objects.filter(pk__lte=boundary[0]))
    return deleted


def prune_generations(*, days: int, keep: int, now: datetime) -> int:
    """Generations older than `days`, except each listener's newest `keep` (its current one is
    always among them: keep is at least 1)."""
    from datacenter.loadbalancing.models import Generation

    keep = max(1, keep)
    old = Generation.objects.filter(
        created__lt=now - timedelta(days=days), number__lte=F("listener__generation") - keep
    )
    return _delete_in_batches(old)


def retention_settings() -> dict[str, int]:
    """The RETENTION setting, checked: a negative or missing value is a configuration error."""
    config = dict(settings.RETENTION)
    for key in (
        "events_days",
        "events_max",
        "audit_days",
        "audit_max",
        "generations_days",
        "generations_keep",
    ):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"RETENTION[{key!r}] must be a non-negative integer, got {value!r}")
    return config


def prune_history(now: datetime | None = None) -> dict[str, Any]:
    """One retention pass; returns how many rows of each kind were deleted."""
    from .models import AuditEntry, Event

    config = retention_settings()
    now = now or timezone.now()
    result = {
        "events": prune_by_age_and_count(
            Event, days=config["events_days"], keep_max=config["events_max"], now=now
        ),
        "audit_entries": prune_by_age_and_count(
            AuditEntry, days=config["audit_days"], keep_max=config["audit_max"], now=now
        ),
        "generations": prune_generations(
            days=config["generations_days"], keep=config["generations_keep"], now=now
        ),
    }
    if any(result.values()):
        logger.info("retention pruned %s", ", ".join(f"{n} {kind}" for kind, n in result.items()))
    return result
