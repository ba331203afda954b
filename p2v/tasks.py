"""Celery tasks of the P2V app: thin wrappers that load ids and call p2v.services."""

from __future__ import annotations

from celery import shared_task

from . import services
from .choices import AssessmentTrigger
from .models import Assessment, Machine

TICK_INTERVAL_S = 60.0


@shared_task(name="p2v.assess_machine")
def assess_machine(
    machine_id: int, assessment_id: int | None = None, trigger: str = AssessmentTrigger.MANUAL
) -> dict:
    """Assess one machine over SSH. Without an assessment id (a direct call), a new assessment with
    `trigger` is created; `services.queue_assessment` creates it first so the API can return it."""
    if assessment_id is None:
        machine = Machine.objects.get(pk=machine_id)
        assessment_id = Assessment.objects.create(machine=machine, trigger=AssessmentTrigger(trigger)).pk
    assessment = services.run_assessment(assessment_id)
    return {"assessment": assessment.pk, "status": assessment.status, "error": assessment.error}


@shared_task(name="p2v.tick")
def tick() -> dict:
    """Celery beat, every TICK_INTERVAL_S: scheduled conversions and periodic assessments."""
    return services.run_schedule()
