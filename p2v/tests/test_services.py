"""Conversion events, policies, health triggers and the schedule (in-process, PostgreSQL/SQLite)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from p2v import services
from p2v.choices import (
    AssessmentStatus,
    AssessmentTrigger,
    ConversionEventKind,
    ConversionEventStatus,
    ConversionMode,
)
from p2v.models import Assessment, ConversionEvent, ConversionPolicy

from .helpers import make_machine

pytestmark = pytest.mark.django_db


@pytest.fixture
def engine(monkeypatch):
    """Stands in for p2v.conversion (issue 7's engine): records the events it is handed."""
    handed = []
    monkeypatch.setattr(
        services, "_conversion_hook", lambda name: handed.append if name == "start_conversion" else None
    )
    return handed


@pytest.fixture
def refusing_engine(monkeypatch):
    def refuse(event):
        raise RuntimeError("no hypervisor is registered")

    monkeypatch.setattr(
        services, "_conversion_hook", lambda name: refuse if name == "start_conversion" else None
    )


def health(smart_passed=True, io_errors=0, edac=None) -> dict:
    return {
        "health": {
            "smart": [{"disk": "/dev/sda", "passed": smart_passed}],
            "io_errors": io_errors,
            "edac": edac,
        }
    }


def test_health_signals():
    policy = ConversionPolicy(io_error_increase_threshold=3, ecc_ce_increase_threshold=10)
    assert services.health_signals(health(), None, policy) == []
    assert services.health_signals(health(smart_passed=False), None, policy) == [
        "SMART health check failed on /dev/sda"
    ]
    assert services.health_signals(health(io_errors=5), health(io_errors=3), policy) == []
    assert services.health_signals(health(io_errors=6), health(io_errors=3), policy) == [
        "kernel log I/O errors rose from 3 to 6"
    ]
    assert (
        services.health_signals(health(edac={"ce": 15, "ue": 0}), health(edac={"ce": 6, "ue": 0}), policy)
        == []
    )
    assert services.health_signals(
        health(edac={"ce": 16, "ue": 1}), health(edac={"ce": 6, "ue": 0}), policy
    ) == ["uncorrected ECC errors rose from 0 to 1", "corrected ECC errors rose from 6 to 16"]


def test_approval_policy_waits_then_approval_starts(engine):
    machine = make_machine(policy=ConversionPolicy.objects.create(name="p", mode=ConversionMode.APPROVAL))
    event = services.raise_conversion_event(machine, kind=ConversionEventKind.HEALTH, raised_by="health: x")
    assert event.status == ConversionEventStatus.PENDING_APPROVAL
    assert engine == []
    services.approve_event(event, None, "go")
    event.refresh_from_db()
    assert event.status == ConversionEventStatus.STARTED
    assert event.started_at is not None
    assert [e.pk for e in engine] == [event.pk]
    with pytest.raises(services.EventStateError, match="is started, not waiting for approval"):
        services.reject_event(event, None)


def test_auto_policy_starts_at_once(engine):
    machine = make_machine(policy=ConversionPolicy.objects.create(name="p", mode=ConversionMode.AUTO))
    event = services.raise_conversion_event(machine, kind=ConversionEventKind.SCHEDULE, raised_by="schedule")
    assert event.status == ConversionEventStatus.STARTED
    assert [e.pk for e in engine] == [event.pk]


def test_default_policy_applies_and_manual_requests_always_start(engine):
    ConversionPolicy.objects.create(name="default", is_default=True, mode=ConversionMode.APPROVAL)
    machine = make_machine()
    assert machine.effective_policy().name == "default"
    event = services.raise_conversion_event(machine, kind=ConversionEventKind.MANUAL, raised_by="alice")
    assert event.status == ConversionEventStatus.STARTED


def test_rejected_event_never_starts(engine):
    machine = make_machine()
    event = services.raise_conversion_event(machine, kind=ConversionEventKind.HEALTH, raised_by="health")
    services.reject_event(event, None, "not now")
    event.refresh_from_db()
    assert (event.status, event.decision_note) == (ConversionEventStatus.REJECTED, "not now")
    assert engine == []


def test_engine_refusal_keeps_the_event_approved_with_the_reason(refusing_engine):
    machine = make_machine(policy=ConversionPolicy.objects.create(name="p", mode=ConversionMode.AUTO))
    event = services.raise_conversion_event(machine, kind=ConversionEventKind.HEALTH, raised_by="health")
    event.refresh_from_db()
    assert event.status == ConversionEventStatus.APPROVED
    assert event.details["start_error"] == "RuntimeError: no hypervisor is registered"
    with pytest.raises(services.ConversionStartError, match="no hypervisor is registered"):
        services.raise_conversion_event(machine, kind=ConversionEventKind.MANUAL, raised_by="alice")


def failing(machine, **kwargs) -> Assessment:
    return Assessment.objects.create(
        machine=machine, status=AssessmentStatus.SUCCEEDED, facts=health(**kwargs)
    )


def test_health_events_are_not_repeated_for_the_same_signals(engine):
    machine = make_machine()  # built-in policy: approval
    first = services.check_health(failing(machine, smart_passed=False))
    assert first.status == ConversionEventStatus.PENDING_APPROVAL
    assert services.check_health(failing(machine, smart_passed=False)) is None  # still waiting
    services.reject_event(first, None, "known, replacing the disk next week")
    assert services.check_health(failing(machine, smart_passed=False)) is None  # same signals: rejected
    rising = services.check_health(failing(machine, smart_passed=False, io_errors=7))
    assert rising is not None  # something changed: ask again
    assert rising.details["signals"][1] == "kernel log I/O errors rose from 0 to 7"
    services.approve_event(rising, None)
    assert services.check_health(failing(machine, smart_passed=False, io_errors=7)) is None  # started
    assert ConversionEvent.objects.filter(machine=machine).count() == 2


def test_rising_io_errors_compare_with_the_previous_assessment(engine):
    machine = make_machine()
    Assessment.objects.create(machine=machine, status=AssessmentStatus.SUCCEEDED, facts=health(io_errors=4))
    same = Assessment.objects.create(
        machine=machine, status=AssessmentStatus.SUCCEEDED, facts=health(io_errors=4)
    )
    assert services.check_health(same) is None
    more = Assessment.objects.create(
        machine=machine, status=AssessmentStatus.SUCCEEDED, facts=health(io_errors=9)
    )
    event = services.check_health(more)
    assert event.details["signals"] == ["kernel log I/O errors rose from 4 to 9"]


def test_schedule_raises_due_conversions_and_queues_due_assessments(
    engine, django_capture_on_commit_callbacks, monkeypatch
):
    from p2v import tasks

    queued_tasks = []
    monkeypatch.setattr(tasks.assess_machine, "delay", lambda *args: queued_tasks.append(args))
    now = timezone.now()
    policy = ConversionPolicy.objects.create(
        name="hourly", mode=ConversionMode.APPROVAL, assessment_interval_s=3600
    )
    due = make_machine("due", scheduled_conversion_at=now - timedelta(minutes=1))
    later = make_machine("later", scheduled_conversion_at=now + timedelta(hours=1))
    stale = make_machine("stale", policy=policy)
    Assessment.objects.filter(
        pk=Assessment.objects.create(machine=stale, status=AssessmentStatus.SUCCEEDED).pk
    ).update(created=now - timedelta(hours=2))
    fresh = make_machine("fresh", policy=policy)
    Assessment.objects.create(machine=fresh, status=AssessmentStatus.SUCCEEDED)

    with django_capture_on_commit_callbacks(execute=True):
        result = services.run_schedule(now)
    [event] = ConversionEvent.objects.filter(pk__in=result["conversion_events"])
    assert (event.machine, event.kind, event.status) == (
        due,
        ConversionEventKind.SCHEDULE,
        ConversionEventStatus.PENDING_APPROVAL,
    )
    due.refresh_from_db()
    later.refresh_from_db()
    assert due.scheduled_conversion_at is None
    assert later.scheduled_conversion_at is not None
    [queued] = Assessment.objects.filter(pk__in=result["assessments"])
    assert (queued.machine, queued.trigger, queued.status) == (
        stale,
        AssessmentTrigger.SCHEDULE,
        AssessmentStatus.QUEUED,
    )
    assert queued_tasks == [(stale.pk, queued.pk)]  # one Celery task, sent on commit
    assert services.run_schedule(now) == {"conversion_events": [], "assessments": [], "stale_assessments": []}


def test_lost_assessments_end_with_a_reason():
    now = timezone.now()
    machine = make_machine()
    lost = Assessment.objects.create(machine=machine, status=AssessmentStatus.RUNNING)
    Assessment.objects.filter(pk=lost.pk).update(created=now - timedelta(hours=2))
    recent = Assessment.objects.create(machine=machine, status=AssessmentStatus.QUEUED)
    assert services.fail_stale_assessments(now) == [lost.pk]
    lost.refresh_from_db()
    recent.refresh_from_db()
    assert lost.status == AssessmentStatus.FAILED
    assert "worker or its task message was lost" in lost.error
    assert lost.facts is None
    assert recent.status == AssessmentStatus.QUEUED


def test_beat_runs_the_p2v_tick():
    from datacenter.celery import app

    assert app.conf.beat_schedule["p2v-tick"]["task"] == "p2v.tick"


def test_assess_task_without_an_assessment_creates_one(monkeypatch):
    from p2v import tasks

    machine = make_machine()
    ran = []
    monkeypatch.setattr(
        services, "run_assessment", lambda pk: ran.append(pk) or Assessment.objects.get(pk=pk)
    )
    result = tasks.assess_machine.run(machine.pk, trigger="conversion")
    assessment = Assessment.objects.get(pk=result["assessment"])
    assert (assessment.machine, assessment.trigger, ran) == (
        machine,
        AssessmentTrigger.CONVERSION,
        [assessment.pk],
    )
