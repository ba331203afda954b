"""P2V domain operations, called alike by the API, the admin, Celery tasks and tests.

- assessments: `queue_assessment` (a row + a Celery task), `run_assessment` (SSH, facts, rules,
  written in one transaction or not at all; a failure keeps only the reason);
- host keys: pinned on first contact; a mismatch writes a SecurityEvent (and an operator Event);
- conversion events: `raise_conversion_event` applies the machine's policy (start at once, or wait
  for `approve_event`/`reject_event`); `start_conversion` hands over to p2v.conversion when present;
- triggers: health signals found by an assessment, and `run_schedule` (celery beat).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from datetime import timedelta

from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from datacenter.events.models import Event
from datacenter.services_errors import DomainError

from . import rules, ssh
from .choices import (
    AssessmentStatus,
    AssessmentTrigger,
    ConversionEventKind,
    ConversionEventStatus,
    ConversionMode,
    HostKeySource,
    SecurityEventKind,
)
from .credentials import CredentialError
from .facts import FactsParseError, collect_facts
from .models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent

logger = logging.getLogger(__name__)
CONVERSION_SERVICES = "p2v.conversion.services"
STALE_ASSESSMENT_S = 3600  # an assessment takes seconds; an hour without a result means it was lost


class ConversionStartError(DomainError):
    """The conversion engine refused to start (the event stays approved, with the reason)."""

    http_status = 409
    code = "conversion_not_started"


class EventStateError(DomainError):
    """An approval or rejection of an event that is not waiting for one."""

    http_status = 409
    code = "conflict"


# --- assessments ------------------------------------------------------------------------------------


def queue_assessment(machine: Machine, *, trigger: str = AssessmentTrigger.MANUAL, user=None) -> Assessment:
    """Create a queued assessment and send it to a Celery worker once this transaction commits."""
    from .tasks import assess_machine

    assessment = Assessment.objects.create(
        machine=machine,
        trigger=trigger,
        requested_by=user if getattr(user, "is_authenticated", False) else None,
    )
    transaction.on_commit(lambda: assess_machine.delay(machine.pk, assessment.pk))
    return assessment


def target_profile_for(machine: Machine) -> rules.TargetProfile:
    """What the target offers: the machine's policy, refined by p2v.conversion when it knows better."""
    policy = machine.effective_policy()
    profile = rules.TargetProfile(
        supported_firmware=tuple(policy.supported_firmware or ()),
        memory_cap_bytes=policy.memory_cap_bytes,
        pool_free_bytes=policy.target_pool_free_bytes,
        min_boot_free_bytes=policy.min_boot_free_bytes,
    )
    hook = _conversion_hook("target_profile")
    return (hook(machine, profile) or profile) if hook else profile


def run_assessment(assessment_id: int) -> Assessment:
    """Assess the machine now (in a worker). Returns the finished assessment, succeeded or failed."""
    claimed = Assessment.objects.filter(pk=assessment_id, status=AssessmentStatus.QUEUED).update(
        status=AssessmentStatus.RUNNING, started=timezone.now()
    )
    assessment = Assessment.objects.select_related("machine").get(pk=assessment_id)
    if not claimed:
        logger.info("p2v assessment %s already %s; not run again", assessment_id, assessment.status)
        return assessment
    machine = assessment.machine
    began = time.monotonic()
    logger.info(
        "p2v assessment %s of machine %s (%s:%s) started",
        assessment.pk,
        machine.pk,
        machine.address,
        machine.ssh_port,
    )
    try:
        facts, fingerprint = _gather_facts(machine, assessment)
    except ssh.HostKeyMismatch as exc:
        _record_host_key_mismatch(machine, assessment, exc)
        return _fail(assessment, str(exc), began)
    except (ssh.SSHError, FactsParseError, CredentialError) as exc:
        return _fail(assessment, str(exc), began)
    except Exception as exc:
        logger.exception("p2v assessment %s: unexpected error", assessment.pk)
        _fail(assessment, f"internal error: {type(exc).__name__}: {exc}", began)
        raise
    verdict = rules.evaluate(facts, target_profile_for(machine))
    with transaction.atomic():
        assessment.facts = facts
        assessment.facts_schema = facts["schema"]
        assessment.compatibility_score = verdict.score
        assessment.compatible = verdict.compatible
        assessment.blockers = verdict.blockers
        assessment.warnings = verdict.warnings
        assessment.host_key_fingerprint = fingerprint
        assessment.status = AssessmentStatus.SUCCEEDED
        assessment.finished = timezone.now()
        assessment.duration_s = round(time.monotonic() - began, 3)
        assessment.save()
        _feed(
            "p2v.assessment_succeeded",
            machine,
            {"assessment": assessment.pk, "score": verdict.score, "blockers": len(verdict.blockers)},
        )
        check_health(assessment)
    logger.info(
        "p2v assessment %s succeeded in %.1f s: score %s, %d blockers, %d warnings",
        assessment.pk,
        assessment.duration_s,
        verdict.score,
        len(verdict.blockers),
        len(verdict.warnings),
    )
    return assessment


def _gather_facts(machine: Machine, assessment: Assessment) -> tuple[dict, str]:
    endpoint = machine.endpoint()
    with ssh.connect(endpoint, connect_timeout_s=machine.connect_timeout_s, privileged=False) as session:
        if session.pinned_now:
            _pin_host_key(machine, session.host_key_fingerprint)
        # Root, or sudo for a user root cannot log in as; when neither works the probes still run as
        # that user (what they can see) and the rules block the conversion with the reason.
        try:
            access = {"user": endpoint.user, "via": session.acquire_privilege().via}
        except ssh.PrivilegeUnavailable as exc:
            access = {"user": endpoint.user, "via": None, "reason": str(exc)}
        timeout_s = machine.command_timeout_s
        facts = collect_facts(
            lambda command: session.run(command, timeout_s),
            lambda commands: session.run_many(commands, timeout_s),
        )
        facts["access"] = access
        return facts, session.host_key_fingerprint


def _pin_host_key(machine: Machine, fingerprint: str) -> None:
    """Pin on first contact, unless someone pinned a key meanwhile (then the next connection checks it)."""
    updated = Machine.objects.filter(pk=machine.pk, host_key_fingerprint="").update(
        host_key_fingerprint=fingerprint,
        host_key_source=HostKeySource.FIRST_CONTACT,
        host_key_pinned_at=timezone.now(),
    )
    if updated:
        logger.info("p2v machine %s: host key %s pinned on first contact", machine.pk, fingerprint)


def _fail(assessment: Assessment, reason: str, began: float) -> Assessment:
    """Record why, and nothing else: no facts, score or findings from a run that did not finish."""
    assessment.status = AssessmentStatus.FAILED
    assessment.error = reason
    assessment.facts = None
    assessment.facts_schema = None
    assessment.compatibility_score = None
    assessment.compatible = None
    assessment.blockers = []
    assessment.warnings = []
    assessment.finished = timezone.now()
    assessment.duration_s = round(time.monotonic() - began, 3)
    with transaction.atomic():
        assessment.save()
        _feed("p2v.assessment_failed", assessment.machine, {"assessment": assessment.pk, "error": reason})
    logger.warning("p2v assessment %s of machine %s failed: %s", assessment.pk, assessment.machine_id, reason)
    return assessment


def _feed(kind: str, machine: Machine, data: dict) -> None:
    """An operator-only entry in the portal's event feed (tenant NULL: P2V is for admins)."""
    Event.objects.create(
        tenant=None, kind=kind, object_type="p2v.machine", object_id=str(machine.pk), data=data
    )


def _record_host_key_mismatch(machine: Machine, assessment: Assessment, exc: ssh.HostKeyMismatch) -> None:
    with transaction.atomic():
        event = SecurityEvent.objects.create(
            kind=SecurityEventKind.HOST_KEY_MISMATCH,
            machine=machine,
            assessment=assessment,
            address=exc.address,
            port=exc.port,
            expected_fingerprint=exc.expected,
            presented_fingerprint=exc.presented,
            message=str(exc),
        )
        _feed(
            "p2v.host_key_mismatch",
            machine,
            {
                "security_event": event.pk,
                "address": exc.address,
                "port": exc.port,
                "expected": exc.expected,
                "presented": exc.presented,
            },
        )
    logger.warning("p2v machine %s: %s", machine.pk, exc)


# --- health triggers --------------------------------------------------------------------------------


def previous_facts(assessment: Assessment) -> dict | None:
    earlier = (
        Assessment.objects.filter(
            machine=assessment.machine, status=AssessmentStatus.SUCCEEDED, id__lt=assessment.pk
        )
        .order_by("-id")
        .first()
    )
    return earlier.facts if earlier else None


def health_signals(facts: dict, previous: dict | None, policy: ConversionPolicy) -> list[str]:
    """Reasons found in this assessment to convert the machine before its hardware fails."""
    health = facts.get("health") or {}
    before = (previous or {}).get("health") or {}
    signals = [
        f"SMART health check failed on {entry['disk']}"
        for entry in health.get("smart") or []
        if entry.get("passed") is False
    ]
    io_now, io_before = health.get("io_errors"), before.get("io_errors") or 0
    if io_now is not None and io_now - io_before >= policy.io_error_increase_threshold:
        signals.append(f"kernel log I/O errors rose from {io_before} to {io_now}")
    edac_now, edac_before = health.get("edac"), before.get("edac") or {"ce": 0, "ue": 0}
    if edac_now:
        if edac_now["ue"] > edac_before.get("ue", 0):
            signals.append(f"uncorrected ECC errors rose from {edac_before.get('ue', 0)} to {edac_now['ue']}")
        if edac_now["ce"] - edac_before.get("ce", 0) >= policy.ecc_ce_increase_threshold:
            signals.append(f"corrected ECC errors rose from {edac_before.get('ce', 0)} to {edac_now['ce']}")
    return signals


def check_health(assessment: Assessment) -> ConversionEvent | None:
    """Raise a health conversion event when the assessment shows failing hardware.

    Not again while the last health event waits (for approval or for the engine) or has started a
    conversion (a converted machine is not converted twice; an admin can still ask for it). After
    a rejection, only new signals (errors still rising, another disk failing) raise a new event,
    not every periodic assessment that sees the same failing disk.
    """
    machine = assessment.machine
    signals = health_signals(assessment.facts or {}, previous_facts(assessment), machine.effective_policy())
    if not signals:
        return None
    last = machine.conversion_events.filter(kind=ConversionEventKind.HEALTH).order_by("-id").first()
    if last is not None and (
        last.status != ConversionEventStatus.REJECTED or last.details.get("signals") == signals
    ):
        logger.info(
            "p2v machine %s: health signals %s; covered by event %s (%s)",
            machine.pk,
            signals,
            last.pk,
            last.status,
        )
        return None
    return raise_conversion_event(
        machine,
        kind=ConversionEventKind.HEALTH,
        raised_by=f"health: {assessment}",
        details={"signals": signals, "assessment": assessment.pk},
        assessment=assessment,
    )


# --- conversion events ----------------------------------------------------------------------------


def raise_conversion_event(
    machine: Machine,
    *,
    kind: str,
    raised_by: str,
    details: dict | None = None,
    user=None,
    assessment: Assessment | None = None,
) -> ConversionEvent:
    """Record a reason to convert and act per policy: an admin's request and `auto` policies start a
    conversion at once; otherwise the event waits for an admin's approval."""
    policy = machine.effective_policy()
    with transaction.atomic():
        event = ConversionEvent.objects.create(
            machine=machine,
            kind=kind,
            details=details or {},
            raised_by=raised_by,
            raised_by_user=user if getattr(user, "is_authenticated", False) else None,
            assessment=assessment,
            status=ConversionEventStatus.PENDING_APPROVAL,
        )
        if kind == ConversionEventKind.MANUAL:
            _decide(event, ConversionEventStatus.APPROVED, user, "requested by an admin")
        elif policy.mode == ConversionMode.AUTO:
            _decide(event, ConversionEventStatus.APPROVED, None, f"policy {policy.name}: auto-convert")
        _feed(
            "p2v.conversion_event_raised", machine, {"event": event.pk, "kind": kind, "status": event.status}
        )
    logger.info(
        "p2v machine %s: %s conversion event %s raised by %s: %s",
        machine.pk,
        kind,
        event.pk,
        raised_by,
        event.status,
    )
    if event.status == ConversionEventStatus.APPROVED:
        try:
            start_conversion(event)
        except ConversionStartError as exc:
            if kind == ConversionEventKind.MANUAL:
                raise  # the admin asking gets the reason (HTTP 409); the event keeps it too
            logger.warning("p2v machine %s: %s", machine.pk, exc)
    return event


def _decide(event: ConversionEvent, status: str, user, note: str) -> None:
    event.status = status
    event.decided_by = user if getattr(user, "is_authenticated", False) else None
    event.decided_at = timezone.now()
    event.decision_note = note[:500]
    event.save(update_fields=["status", "decided_by", "decided_at", "decision_note"])
    _feed("p2v.conversion_event_decided", event.machine, {"event": event.pk, "status": status, "note": note})


def approve_event(event: ConversionEvent, user, note: str = "") -> ConversionEvent:
    with transaction.atomic():
        event = ConversionEvent.objects.select_for_update().get(pk=event.pk)
        if event.status != ConversionEventStatus.PENDING_APPROVAL:
            raise EventStateError(f"event {event.pk} is {event.status}, not waiting for approval")
        _decide(event, ConversionEventStatus.APPROVED, user, note or "approved")
        start_conversion(event)
    return event


def reject_event(event: ConversionEvent, user, note: str = "") -> ConversionEvent:
    with transaction.atomic():
        event = ConversionEvent.objects.select_for_update().get(pk=event.pk)
        if event.status != ConversionEventStatus.PENDING_APPROVAL:
            raise EventStateError(f"event {event.pk} is {event.status}, not waiting for approval")
        _decide(event, ConversionEventStatus.REJECTED, user, note or "rejected")
    return event


def _conversion_hook(name: str):
    """A function of the conversion sub-app (p2v/conversion/services.py), or None while it does not exist."""
    if (
        importlib.util.find_spec("p2v.conversion") is None
        or importlib.util.find_spec(CONVERSION_SERVICES) is None
    ):
        return None
    return getattr(importlib.import_module(CONVERSION_SERVICES), name, None)


def start_conversion(event: ConversionEvent) -> ConversionEvent:
    """Mark the event started and hand it to the conversion engine (p2v.conversion) atomically.

    If the engine refuses (no hypervisor, blockers, a job already running), the event stays
    approved, keeps the reason in details["start_error"], and ConversionStartError is raised.
    """
    hook = _conversion_hook("start_conversion")
    try:
        with transaction.atomic():
            event.status = ConversionEventStatus.STARTED
            event.started_at = timezone.now()
            event.save(update_fields=["status", "started_at"])
            if hook is not None:
                hook(event)
    except Exception as exc:  # re-raised below as a domain error carrying the engine's reason
        event.refresh_from_db()
        event.details = {**event.details, "start_error": f"{type(exc).__name__}: {exc}"}
        event.save(update_fields=["details"])
        raise ConversionStartError(f"conversion of {event.machine} was not started: {exc}") from exc
    return event


# --- schedule ---------------------------------------------------------------------------------------


def fail_stale_assessments(now=None) -> list[int]:
    """Assessments queued or running for longer than STALE_ASSESSMENT_S lost their worker or their
    message: end them with that reason, so the machine can be assessed again."""
    cutoff = (now or timezone.now()) - timedelta(seconds=STALE_ASSESSMENT_S)
    stale = Assessment.objects.filter(
        status__in=[AssessmentStatus.QUEUED, AssessmentStatus.RUNNING], created__lt=cutoff
    )
    failed = []
    for assessment in stale.select_related("machine"):
        reason = (
            f"no result after {STALE_ASSESSMENT_S} s while {assessment.status}: "
            "the worker or its task message was lost"
        )
        _fail(assessment, reason, time.monotonic())
        assessment.duration_s = None
        assessment.save(update_fields=["duration_s"])
        failed.append(assessment.pk)
    return failed


def run_schedule(now=None) -> dict:
    """The beat tick: end stale assessments, raise due scheduled conversions, queue due assessments."""
    now = now or timezone.now()
    stale = fail_stale_assessments(now)
    raised = []
    for machine_id in Machine.objects.filter(scheduled_conversion_at__lte=now).values_list("pk", flat=True):
        with transaction.atomic():
            machine = Machine.objects.select_for_update().get(pk=machine_id)
            if machine.scheduled_conversion_at is None or machine.scheduled_conversion_at > now:
                continue  # another tick took it
            details = {"scheduled_for": machine.scheduled_conversion_at.isoformat()}
            machine.scheduled_conversion_at = None
            machine.save(update_fields=["scheduled_conversion_at"])
            raised.append(
                raise_conversion_event(
                    machine, kind=ConversionEventKind.SCHEDULE, raised_by="schedule", details=details
                ).pk
            )
    queued = []
    busy = Q(assessments__status__in=[AssessmentStatus.QUEUED, AssessmentStatus.RUNNING])
    candidates = (
        Machine.objects.exclude(busy).annotate(last=Max("assessments__created")).select_related("policy")
    )
    for machine in candidates:
        interval = machine.effective_policy().assessment_interval_s
        if not interval or (machine.last is not None and machine.last > now - timedelta(seconds=interval)):
            continue
        with transaction.atomic():
            queued.append(queue_assessment(machine, trigger=AssessmentTrigger.SCHEDULE).pk)
    return {"conversion_events": raised, "assessments": queued, "stale_assessments": stale}
