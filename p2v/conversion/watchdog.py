"""The watchdog: running jobs whose lease expired are re-queued at their stage, or failed.

A run renews its job's lease every few seconds (lease.py); a lease past its expiry means the worker
holding it died (kill -9, OOM, host lost) or cannot reach the database. Celery beat runs
`check_leases` every P2V_WATCHDOG_INTERVAL_S (10 s by default). For each such job:

- a hand-over (the previous stage ended and queued the next, but no run took it within the lease:
  workers busy, or the worker died between the two) is re-queued at its stage; not a lost worker;
- a lost worker, fewer than P2V_JOB_MAX_RESUMES (3) times so far: the job goes back to `queued`
  at its stage, with "worker X lost during <stage>" in its log, and a run on any worker of its
  queue resumes it (services._clean_up_lost_run first removes what the dead run left in the way);
- otherwise it fails with that reason after a rollback, done here: the domain, the verification
  twin and the volumes go through libvirt (the hypervisor's URI); the isolated network and loop
  devices only when this worker runs on the hypervisor (the rollback's problems say what is left).

So a job never stays `running` for longer than P2V_JOB_LEASE_S + P2V_WATCHDOG_INTERVAL_S after its
worker is gone: about a minute with the defaults.
"""

from __future__ import annotations

import enum
import logging
import os
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import lease as lease_mod
from . import services, workers
from .choices import JobState, LogLevel
from .models import ConversionJob

logger = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 10.0
DEFAULT_MAX_RESUMES = 3
PING_TIMEOUT_S = 1.0


class Decision(enum.Enum):
    REQUEUE_HANDOVER = "requeue-handover"
    RESUME = "resume"
    FAIL = "fail"


def interval_seconds() -> float:
    return lease_mod._seconds("P2V_WATCHDOG_INTERVAL_S", DEFAULT_INTERVAL_S)


def max_resumes() -> int:
    """P2V_JOB_MAX_RESUMES from settings or the environment: a whole number, 0 or more."""
    raw = getattr(settings, "P2V_JOB_MAX_RESUMES", None)
    if raw in (None, ""):
        raw = os.environ.get("P2V_JOB_MAX_RESUMES")
    if raw in (None, ""):
        return DEFAULT_MAX_RESUMES
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"P2V_JOB_MAX_RESUMES must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"P2V_JOB_MAX_RESUMES must be 0 or more, got {raw!r}")
    return value


def decide(job: ConversionJob, now: datetime, limit: int) -> Decision | None:
    """What to do with this job now; None: nothing (not running, or its lease is alive)."""
    if job.state != JobState.RUNNING or not job.lease_token or job.lease_expires is None:
        return None
    if job.lease_expires > now:
        return None
    if not job.lease_owner:
        return Decision.REQUEUE_HANDOVER
    return Decision.RESUME if job.resumes < limit else Decision.FAIL


def check_leases(now: datetime | None = None) -> dict:
    """Act on every running job with an expired lease; the job ids by outcome (resumed, requeued, failed)."""
    now = now or timezone.now()
    limit = max_resumes()
    outcome: dict[str, list[int]] = {"resumed": [], "requeued": [], "failed": []}
    expired = (
        ConversionJob.objects.filter(state=JobState.RUNNING, lease_expires__lte=now)
        .exclude(lease_token="")
        .values_list("pk", flat=True)
    )
    for job_id in list(expired):
        try:
            done = _act(job_id, now, limit)
        except Exception:  # one job's trouble must not keep the others stuck
            logger.exception("p2v watchdog: could not handle job %s", job_id)
            continue
        if done is Decision.RESUME:
            outcome["resumed"].append(job_id)
        elif done is Decision.REQUEUE_HANDOVER:
            outcome["requeued"].append(job_id)
        elif done is Decision.FAIL:
            outcome["failed"].append(job_id)
    return outcome


def _act(job_id: int, now: datetime, limit: int) -> Decision | None:
    job = ConversionJob.objects.get(pk=job_id)
    if decide(job, now, limit) is None:
        return None
    # Asked outside the row lock (a broadcast waits its whole timeout): only for the log line.
    owner = f"{job.lease_owner} (pid {job.lease_pid})"
    liveness = _liveness(job.lease_owner) if job.lease_owner else ""
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().select_related("hypervisor").get(pk=job_id)
        decision = decide(job, now, limit)  # again under the lock: a run may have renewed or taken it
        if decision is None:
            return None
        stage = job.stage
        expired_at = job.lease_expires.isoformat(timespec="seconds")
        if decision is Decision.FAIL:
            # Hold the job while rolling back, so a late redelivery cannot start on it meanwhile.
            ConversionJob.objects.filter(pk=job_id).update(
                lease_token=uuid.uuid4().hex,
                lease_owner="watchdog",
                lease_pid=os.getpid(),
                lease_expires=timezone.now() + timedelta(seconds=lease_mod.lease_seconds() * 10),
            )
        else:
            lost = decision is Decision.RESUME
            ConversionJob.objects.filter(pk=job_id).update(
                state=JobState.QUEUED,
                lease_token="",
                lease_owner="",
                lease_pid=None,
                lease_expires=None,
                resumes=job.resumes + (1 if lost else 0),
                lost_worker=owner if lost else "",
            )
            queue = workers.job_queue(job.hypervisor)
            transaction.on_commit(lambda: _enqueue(job_id, stage, queue))
    if decision is Decision.REQUEUE_HANDOVER:
        services.log(
            job,
            f"the {stage} stage was not taken up within its lease (workers busy, or the worker that "
            f"queued it died); queued again",
            LogLevel.WARNING,
        )
    elif decision is Decision.RESUME:
        services.log(
            job,
            f"worker {owner} lost during {stage} (lease expired at {expired_at}{liveness}); "
            f"queued again to resume, resume {job.resumes + 1} of {limit}",
            LogLevel.WARNING,
        )
    else:
        job.refresh_from_db()
        services._finish_with_rollback(
            job,
            JobState.FAILED,
            f"worker {owner} lost during {stage} (lease expired at {expired_at}{liveness}) "
            f"after {job.resumes} resume(s), the most P2V_JOB_MAX_RESUMES allows ({limit}): rolled back",
        )
    return decision


def _enqueue(job_id: int, stage: str, queue: str) -> None:
    from .tasks import run_conversion_stage

    run_conversion_stage.apply_async((job_id, stage), queue=queue)


def _liveness(node: str) -> str:
    """', it does not answer' / ', it still answers (stuck?)' / '' when the broker cannot ask."""
    from datacenter.celery import app

    try:
        replies = app.control.ping(destination=[node], timeout=PING_TIMEOUT_S) or []
    except Exception as exc:  # liveness only words the log line; the expired lease decides
        logger.warning("p2v watchdog: could not ping %s: %s", node, exc)
        return ""
    if any(node in reply for reply in replies):
        return f"; {node} still answers pings but stopped renewing it (stuck, or no database)"
    return f"; {node} does not answer pings"
