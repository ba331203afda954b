"""Background jobs of the events app (thin: they call services and return a small result)."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.utils import timezone


@shared_task(name="datacenter.events.ping")
def ping() -> str:
    """Liveness of the job runner (embedded or Celery workers): returns 'pong'."""
    return "pong"


@shared_task(name="datacenter.events.prune_events")
def prune_events(keep_days: int = 30) -> int:
    """Delete feed events older than `keep_days` (the audit trail is kept). Returns how many."""
    from .models import Event

    cutoff = timezone.now() - timedelta(days=keep_days)
    # A queryset delete: the append-only guard is on single-row delete(), history pruning is deliberate.
    deleted, _ = Event.objects.filter(time__lt=cutoff).delete()
    return deleted


@shared_task(name="datacenter.events.prune_history")
def prune_history() -> dict:
    """Periodic (settings.CELERY_BEAT_SCHEDULE): prune events, audit entries and generations by
    age and count (settings.RETENTION). Returns how many of each were deleted."""
    from .retention import prune_history as run

    return run()
