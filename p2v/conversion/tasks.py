"""Celery tasks: one task runs one stage of a conversion job and queues the next."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(bind=True, name="p2v.conversion.run_stage", ignore_result=True)
def run_conversion_stage(self, job_id: int) -> None:
    if services.run_stage(job_id):
        # The next stage goes to the queue this one came from, so a job stays with its workers.
        queue = (self.request.delivery_info or {}).get("routing_key")
        run_conversion_stage.apply_async((job_id,), queue=queue)
