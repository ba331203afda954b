"""Which Celery queue a hypervisor's conversion jobs go to, and which workers consume it right now.

Adjust and verify need the hypervisor's volumes and serial console, so in production each
hypervisor runs its own P2V worker consuming only that hypervisor's queue (`p2v-hv-<name>`), and
every stage of a job is sent there (docs/p2v-conversion.md, "Where conversions run"). Routing is
on when the setting or environment variable P2V_HYPERVISOR_QUEUES is true (docker-compose sets
it); off (the default, `make run` and the tests' shared worker), jobs use Celery's default queue.

Liveness is asked from the workers themselves (Celery's `inspect active_queues` broadcast): a
worker counts only if it answered within the timeout, so a stopped host drops out at once.
"""

from __future__ import annotations

import logging
import os
import re

from django.conf import settings

logger = logging.getLogger(__name__)
QUEUE_PREFIX = "p2v-hv-"
DEFAULT_PING_TIMEOUT_S = 1.0
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
    """{queue: [worker node names]} of the workers that answered; None when the broker cannot ask."""
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
