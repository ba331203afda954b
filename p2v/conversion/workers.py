"""Which Celery queue a hypervisor's conversion jobs go to, and which workers consume it right now.

Adjust and verify need the hypervisor's volumes and serial console, so in production each
hypervisor runs its own P2V worker consuming only that hypervisor's queue (`p2v-hv-<name>`), and
every stage of a job is sent there (docs/p2v-conversion.md, "Where conversions run"). Routing is
on when the setting or environment variable P2V_HYPERVISOR_QUEUES is true (docker-compose sets
it); off (the default, `make run` and the tests' shared worker), jobs use Celery's default queue.

Liveness is asked from the workers themselves (Celery's `inspect active_queues` broadcast): a
worker counts only if it answered within the timeout, so a stopped host drops out at the next ask.
A broadcast always waits its whole timeout (it cannot know how many workers will answer), so the
answer is kept in Django's cache for P2V_WORKER_LIVENESS_CACHE_S (5 s by default, 0 to ask every
time): a page or script listing hypervisors in a loop costs one broadcast per period, not per call.
"""

from __future__ import annotations

import logging
import os
import re

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)
QUEUE_PREFIX = "p2v-hv-"
DEFAULT_PING_TIMEOUT_S = 1.0
DEFAULT_LIVENESS_CACHE_S = 5.0
_LIVENESS_CACHE_KEY = "p2v:live-workers-by-queue"
_NOT_QUEUE_CHARS = re.compile(r"[^a-z0-9-]+")
_TRUE = {"1", "true", "yes", "on"}


def routing_enabled() -> bool:
    value = getattr(settings, "P2V_HYPERVISOR_QUEUES", None)
    if value is None:
        value = os.environ.get("P2V_HYPERVISOR_QUEUES", "")
    return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE


def hypervisor_queue(name: str) -> str:
    """The queue of the hypervisor called `name`: 'p2v-hv-' + its name in lower case, a-z 0-9 '-'."""
    slug = _NOT_QUEUE_CHARS.sub("-", name.strip().lower()).strip("-")
    if not slug:
        raise ValueError(f"hypervisor name {name!r} has no letter or digit to name its queue after")
    return QUEUE_PREFIX + slug


def job_queue(hypervisor) -> str:
    """Where this hypervisor's jobs are sent: its own queue, or Celery's default with routing off."""
    if routing_enabled():
        return hypervisor_queue(hypervisor.name)
    from datacenter.celery import app

    return app.conf.task_default_queue


def live_workers_by_queue(timeout_s: float | None = None) -> dict[str, list[str]] | None:
    """{queue: [worker node names]} of the workers that answered (at most
    P2V_WORKER_LIVENESS_CACHE_S ago); None when the broker cannot ask."""
    cache_s = float(getattr(settings, "P2V_WORKER_LIVENESS_CACHE_S", DEFAULT_LIVENESS_CACHE_S))
    if cache_s > 0:
        kept = cache.get(_LIVENESS_CACHE_KEY)
        if kept is not None:  # stored wrapped, so that "could not ask" (None) is kept too
            return kept["by_queue"]
    by_queue = _ask_workers(timeout_s)
    if cache_s > 0:
        cache.set(_LIVENESS_CACHE_KEY, {"by_queue": by_queue}, timeout=cache_s)
    return by_queue


def _ask_workers(timeout_s: float | None) -> dict[str, list[str]] | None:
    from datacenter.celery import app

    if timeout_s is None:
        timeout_s = float(getattr(settings, "P2V_WORKER_PING_TIMEOUT_S", DEFAULT_PING_TIMEOUT_S))
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:  # an in-memory or unreachable broker: liveness is unknown, not "none"
        logger.warning("could not ask Celery workers for their queues: %s", exc)
        return None
    by_queue: dict[str, list[str]] = {}
    for node, queues in replies.items():
        for queue in queues or []:
            by_queue.setdefault(queue.get("name", ""), []).append(node)
    return {queue: sorted(nodes) for queue, nodes in by_queue.items()}
