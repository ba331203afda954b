"""Portal metrics in Prometheus' text format at /metrics (prometheus_client).

Who may read them: an operator (session or API token), or a scraper presenting
`Authorization: Bearer <DATACENTER_METRICS_TOKEN>` (compared in constant time; unset: operators only).

What they are (docs/operations.md explains each):
  datacenter_http_request_duration_seconds{view,method,status}  histogram, per Django view name
  datacenter_celery_queue_length{queue}         messages waiting in a Celery queue (Redis broker)
  datacenter_celery_tasks_total{task,outcome}   tasks finished by any worker: succeeded/failed/retried
  datacenter_agents{role,state}                 agent nodes: connected, disconnected, disabled
  datacenter_agents_behind{role}                connected agents not at every listener's generation
  datacenter_listeners{provisioning_status}     listeners by provisioning status
  datacenter_p2v_jobs{state}                    P2V conversion jobs by state
  datacenter_log_write_errors_total             log records this process could not write (full disk)

The gauges are read from the database (and Redis) at scrape time, so every web process answers
the same; the request histogram is per process (set PROMETHEUS_MULTIPROC_DIR with several workers).
Task outcomes are counted in Redis by the workers themselves (Celery signals), since the web
process that is scraped never sees a task finish.
"""

from __future__ import annotations

import logging
import secrets
import time

from django.conf import settings
from django.db.models import Count, F, Max, OuterRef, Q, Subquery
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from datacenter.log_handlers import LOG_WRITE_ERRORS

logger = logging.getLogger(__name__)

TASK_COUNTER_KEY = "dc-metrics:celery-tasks"  # Redis hash "<task>|<outcome>" -> count
QUEUES = ("celery",)

REQUEST_SECONDS = Histogram(
    "datacenter_http_request_duration_seconds",
    "Time to answer an HTTP request, by Django view.",
    ["view", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def _redis():
    if not settings.REDIS_URL:
        return None
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


class PortalCollector:
    """Gauges computed at scrape time from the database and the broker."""

    def collect(self):
        from datacenter.loadbalancing.choices import AgentRole
        from datacenter.loadbalancing.models import AgentNode, Listener
        from datacenter.loadbalancing.models_sync import AgentListenerAck, ListenerTable
        from p2v.conversion.models import ConversionJob

        agents = GaugeMetricFamily("datacenter_agents", "Agent nodes by role and state.",
                                   labels=["role", "state"])
        rows = AgentNode.objects.values("role", "enabled", "sync__connected").annotate(n=Count("id"))
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            if not row["enabled"]:
                state = "disabled"
            else:
                state = "connected" if row["sync__connected"] else "disconnected"
            counts[(row["role"], state)] = counts.get((row["role"], state), 0) + row["n"]
        for role in AgentRole.values:
            for state in ("connected", "disconnected", "disabled"):
                agents.add_metric([role, state], counts.get((role, state), 0))
        yield agents

        latest = ListenerTable.objects.filter(listener=OuterRef("listener")).values("listener").annotate(
            top=Max("number")).values("top")
        lagging = AgentListenerAck.objects.filter(
            agent__enabled=True, agent__sync__connected=True
        ).annotate(latest=Subquery(latest)).filter(Q(generation__lt=F("latest")) | ~Q(error=""))
        behind = GaugeMetricFamily(
            "datacenter_agents_behind", "Connected agents not at every listener's latest generation.",
            labels=["role"])
        behind_counts = dict(lagging.values_list("agent__role").annotate(n=Count("agent", distinct=True)))
        for role in AgentRole.values:
            behind.add_metric([role], behind_counts.get(role, 0))
        yield behind

        listeners = GaugeMetricFamily("datacenter_listeners", "Listeners by provisioning status.",
                                      labels=["provisioning_status"])
        by_status = dict(Listener.objects.values_list("provisioning_status").annotate(n=Count("id")))
        for status in Listener._meta.get_field("provisioning_status").choices:
            listeners.add_metric([status[0]], by_status.get(status[0], 0))
        yield listeners

        jobs = GaugeMetricFamily("datacenter_p2v_jobs", "P2V conversion jobs by state.", labels=["state"])
        by_state = dict(ConversionJob.objects.values_list("state").annotate(n=Count("id")))
        for state in ConversionJob._meta.get_field("state").choices:
            jobs.add_metric([state[0]], by_state.get(state[0], 0))
        yield jobs

        yield from self._broker()

    def _broker(self):
        queue = GaugeMetricFamily("datacenter_celery_queue_length", "Messages waiting in a Celery queue.",
                                  labels=["queue"])
        tasks = CounterMetricFamily("datacenter_celery_tasks", "Celery tasks finished, by outcome.",
                                    labels=["task", "outcome"])
        client = _redis()
        if client is not None:
            try:
                for name in QUEUES:
                    queue.add_metric([name], client.llen(name))
                for field, value in client.hgetall(TASK_COUNTER_KEY).items():
                    task, _, outcome = field.decode().rpartition("|")
                    tasks.add_metric([task, outcome], int(value))
            except Exception as exc:  # the broker being down must not take the metrics page with it
                logger.warning("metrics: the broker did not answer: %s", exc)
        yield queue
        yield tasks


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PortalCollector())
    registry.register(REQUEST_SECONDS)
    registry.register(LOG_WRITE_ERRORS)
    return registry


def _allowed(request) -> bool:
    token = getattr(settings, "DATACENTER_METRICS_TOKEN", "")
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer ") and secrets.compare_digest(header[7:].encode(), token.encode()):
        return True
    from rest_framework.exceptions import AuthenticationFailed

    from datacenter.tenancy.authentication import ApiTokenAuthentication
    from datacenter.tenancy.scoping import is_operator

    user = request.user
    if header.startswith("Token "):
        try:
            result = ApiTokenAuthentication().authenticate_key(header[6:].strip())
        except AuthenticationFailed:
            return False
        user = result[0] if result else None
    return bool(user) and is_operator(user)


def metrics_view(request):
    if not _allowed(request):
        response = HttpResponse("metrics: operators or the scrape token only\n", status=403,
                                content_type="text/plain")
        return response
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


class RequestMetricsMiddleware:
    """Observes every request's duration under its Django view name ("unresolved" for a 404)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        view = (match.view_name if match else None) or "unresolved"
        REQUEST_SECONDS.labels(view, request.method, str(response.status_code)).observe(
            time.perf_counter() - started)
        return response


def count_task_outcome(task_name: str, outcome: str) -> None:
    """Called by the workers' Celery signal handlers (datacenter/celery.py)."""
    client = _redis()
    if client is None:
        return
    try:
        client.hincrby(TASK_COUNTER_KEY, f"{task_name}|{outcome}", 1)
    except Exception as exc:  # counting must never fail a task
        logger.warning("metrics: could not count %s %s: %s", task_name, outcome, exc)
