"""P2V pages (operators only, like /api/p2v/): machines with their latest assessment, conversion
events with approve/reject, jobs with stage-by-stage progress and their streaming log."""

from __future__ import annotations

from django.contrib import messages
from django.db.models import OuterRef, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect

from p2v import services as p2v_services
from p2v.choices import AssessmentStatus, ConversionEventStatus
from p2v.conversion.choices import STAGE_ORDER, JobStage, JobState
from p2v.conversion.models import ConversionJob
from p2v.models import Assessment, ConversionEvent, Machine

from .common import operator_page, page, paginate

LOG_LINES_SHOWN = 500


def _latest_assessments(machines: list[Machine]) -> dict[int, Assessment]:
    latest = (
        Assessment.objects.filter(machine=OuterRef("machine"), status=AssessmentStatus.SUCCEEDED)
        .order_by("-finished", "-id")
        .values("pk")[:1]
    )
    rows = Assessment.objects.filter(machine__in=machines, pk=Subquery(latest))
    return {a.machine_id: a for a in rows}


@operator_page
def machine_list(request: HttpRequest) -> HttpResponse:
    page_obj = paginate(request, Machine.objects.select_related("tenant").order_by("name"))
    latest = _latest_assessments(list(page_obj))
    rows = [{"machine": m, "assessment": latest.get(m.pk)} for m in page_obj]
    return page(request, "frontend/p2v_machines.html", {"page_obj": page_obj, "rows": rows}, live="p2v")


@operator_page
def machine_detail(request: HttpRequest, pk: int) -> HttpResponse:
    machine = get_object_or_404(Machine.objects.select_related("tenant", "policy"), pk=pk)
    assessment = _latest_assessments([machine]).get(machine.pk)
    context = {
        "machine": machine,
        "assessment": assessment,
        "recent": machine.assessments.order_by("-id")[:10],
        "events": machine.conversion_events.order_by("-id")[:10],
        "jobs": machine.conversion_jobs.order_by("-id")[:10],
    }
    return page(request, "frontend/p2v_machine.html", context, live="p2v")


@operator_page
def event_list(request: HttpRequest) -> HttpResponse:
    events = ConversionEvent.objects.select_related("machine", "decided_by")
    # Waiting ones first and all of them: they are what an admin comes here for.
    waiting = list(events.filter(status=ConversionEventStatus.PENDING_APPROVAL).order_by("id"))
    others = paginate(request, events.exclude(status=ConversionEventStatus.PENDING_APPROVAL).order_by("-id"))
    return page(request, "frontend/p2v_events.html", {"waiting": waiting, "page_obj": others}, live="p2v")


@operator_page
def event_decide(request: HttpRequest, pk: int) -> HttpResponse:
    """POST decision=approve|reject (with an optional note): the p2v services decide and start."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    event = get_object_or_404(ConversionEvent, pk=pk)
    decision = request.POST.get("decision")
    note = request.POST.get("note", "").strip()[:500]
    try:
        if decision == "approve":
            p2v_services.approve_event(event, request.user, note)
            messages.success(
                request, f"Event #{event.pk} approved: the conversion of {event.machine} started."
            )
        elif decision == "reject":
            p2v_services.reject_event(event, request.user, note)
            messages.success(request, f"Event #{event.pk} rejected.")
        else:
            messages.error(request, f"{decision!r} is not a decision; use approve or reject.")
    except (p2v_services.EventStateError, p2v_services.ConversionStartError) as exc:
        messages.error(request, f"Event #{event.pk}: {exc}")
    return redirect("frontend:p2v-events")


def stage_bars(job: ConversionJob) -> list[dict]:
    """One bar per stage: done ones full, the current one at its measured progress (copy) or
    indeterminate (other stages while running), the rest empty."""
    order = [s for s in STAGE_ORDER if s != JobStage.DONE]
    current = order.index(job.stage) if job.stage in order else len(order)
    bars = []
    for index, stage in enumerate(order):
        if index < current or job.state == JobState.SUCCEEDED:
            percent, state = 100.0, "done"
        elif index == current:
            # Only the copy stage measures its progress (job.percent); a running other stage has
            # no measure, so its bar is indeterminate rather than a made-up number.
            if stage == JobStage.COPY or job.state != JobState.RUNNING:
                percent = job.percent if stage == JobStage.COPY else 0.0
            else:
                percent = None
            state = job.state
        else:
            percent, state = 0.0, "waiting"
        bars.append({"stage": stage, "label": JobStage(stage).label, "percent": percent, "state": state})
    return bars


@operator_page
def job_list(request: HttpRequest) -> HttpResponse:
    page_obj = paginate(
        request, ConversionJob.objects.select_related("machine", "hypervisor").order_by("-id")
    )
    rows = [{"job": job, "bars": stage_bars(job)} for job in page_obj]
    return page(request, "frontend/p2v_jobs.html", {"page_obj": page_obj, "rows": rows}, live="p2v")


@operator_page
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(
        ConversionJob.objects.select_related("machine", "hypervisor", "assessment"), pk=pk
    )
    logs = list(job.logs.order_by("-id")[:LOG_LINES_SHOWN])[::-1]
    context = {"job": job, "bars": stage_bars(job), "logs": logs}
    return page(request, "frontend/p2v_job.html", context, live=f"job:{job.pk}")
