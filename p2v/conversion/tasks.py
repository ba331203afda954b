"""Celery tasks: one task runs one stage of a conversion job and queues the next; the watchdog.

The stage task is `acks_late` with `reject_on_worker_lost`: its message is acknowledged only when
the stage has ended, so a worker process that dies mid-stage does not take the message with it (a
prefork pool child's death returns it to the queue at once; a whole worker's death leaves it
unacknowledged until the Redis transport's visibility timeout, one hour by default, redelivers
it). The job's lease (lease.py) makes every delivery safe: a duplicate for a job a live run holds
comes back when that lease is due, one for a stage already done is dropped. The watchdog reacts
well before the visibility timeout: within P2V_JOB_LEASE_S + P2V_WATCHDOG_INTERVAL_S.
"""

from __future__ import annotations

from celery import shared_task

from . import lease, services, watchdog

# A busy job's message comes back once the holder's lease is due, but at least this much later.
BUSY_RETRY_MIN_S = 1.0


@shared_task(
    bind=True,
    name="p2v.conversion.run_stage",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def run_conversion_stage(self, job_id: int, stage: str | None = None, handoff: str = "") -> None:
    # The next stage goes to the queue this one came from, so a job stays with its workers.
    queue = (self.request.delivery_info or {}).get("routing_key")

    def enqueue_next(next_stage: str, token: str) -> None:
        run_conversion_stage.apply_async((job_id, next_stage, token), queue=queue)

    holder = lease.Holder.here(self.request.hostname)
    try:
        services.run_stage(job_id, stage=stage, holder=holder, handoff=handoff, enqueue_next=enqueue_next)
    except lease.JobBusy as busy:
        raise self.retry(countdown=max(busy.retry_in_s + 1.0, BUSY_RETRY_MIN_S), queue=queue) from None


@shared_task(name="p2v.conversion.watchdog", ignore_result=True)
def check_job_leases() -> dict:
    """Celery beat, every P2V_WATCHDOG_INTERVAL_S: jobs whose worker stopped renewing their lease."""
    return watchdog.check_leases()
