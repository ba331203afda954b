"""P2V API: admins only (operators: is_staff or superuser); everyone else gets 403."""

from __future__ import annotations

from django.db import transaction
from django.db.models import OuterRef, Subquery
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from datacenter.events.services import record_change
from datacenter.tenancy.permissions import IsOperator

from .. import services
from ..choices import AssessmentStatus, AssessmentTrigger, ConversionEventKind
from ..filtersets import (
    AssessmentFilterSet,
    ConversionEventFilterSet,
    ConversionPolicyFilterSet,
    MachineFilterSet,
    SecurityEventFilterSet,
)
from ..models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent
from . import serializers

# Never in audit entries or events, not even encrypted.
SECRET_FIELDS = {"credential_ciphertext"}


def machine_snapshot(machine: Machine) -> dict:
    data = {}
    for field in machine._meta.concrete_fields:
        if field.attname in SECRET_FIELDS:
            continue
        value = field.value_from_object(machine)
        data[field.attname] = value.isoformat() if hasattr(value, "isoformat") else value
    return data


class MachineViewSet(viewsets.ModelViewSet):
    """Physical machines to assess and convert. The private key is write-only."""

    queryset = Machine.objects.select_related("tenant", "policy").annotate(
        latest_assessment_id=Subquery(
            Assessment.objects.filter(machine=OuterRef("pk"), status=AssessmentStatus.SUCCEEDED)
            .order_by("-finished", "-id")
            .values("pk")[:1]
        )
    )
    serializer_class = serializers.MachineSerializer
    filterset_class = MachineFilterSet
    permission_classes = [IsOperator]
    ordering_fields = ["name", "created"]

    def perform_create(self, serializer):
        with transaction.atomic():
            machine = serializer.save()
            record_change(
                user=self.request.user,
                action="create",
                obj=machine,
                tenant_id=machine.tenant_id,
                before=None,
                after=machine_snapshot(machine),
            )

    def perform_update(self, serializer):
        with transaction.atomic():
            before = machine_snapshot(serializer.instance)
            machine = serializer.save()
            record_change(
                user=self.request.user,
                action="update",
                obj=machine,
                tenant_id=machine.tenant_id,
                before=before,
                after=machine_snapshot(machine),
            )

    def perform_destroy(self, instance):
        with transaction.atomic():
            record_change(
                user=self.request.user,
                action="delete",
                obj=instance,
                tenant_id=instance.tenant_id,
                before=machine_snapshot(instance),
                after=None,
            )
            instance.delete()

    @extend_schema(request=None, responses={202: serializers.AssessmentSerializer})
    @action(detail=True, methods=["post"])
    def assess(self, request, pk=None):
        """Queue an assessment over SSH; poll the returned assessment until it succeeds or fails."""
        with transaction.atomic():
            assessment = services.queue_assessment(
                self.get_object(), trigger=AssessmentTrigger.MANUAL, user=request.user
            )
        body = serializers.AssessmentSerializer(assessment, context={"request": request}).data
        return Response(body, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=serializers.ConvertRequestSerializer, responses={201: serializers.ConversionEventSerializer}
    )
    @action(detail=True, methods=["post"])
    def convert(self, request, pk=None):
        """An admin's request to convert: raises a manual conversion event, which starts at once."""
        params = serializers.ConvertRequestSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        event = services.raise_conversion_event(
            self.get_object(),
            kind=ConversionEventKind.MANUAL,
            raised_by=request.user.get_username(),
            details={"reason": params.validated_data["reason"]},
            user=request.user,
        )
        body = dict(serializers.ConversionEventSerializer(event, context={"request": request}).data)
        # The job it started (none while it waits for approval), so a client need not look it up.
        job = event.conversion_jobs.order_by("-id").first() if hasattr(event, "conversion_jobs") else None
        body["job"] = (
            {"id": job.pk, "state": job.state, "url": request.build_absolute_uri(f"/api/p2v/jobs/{job.pk}/")}
            if job is not None
            else None
        )
        return Response(body, status=status.HTTP_201_CREATED)


class AssessmentViewSet(viewsets.ReadOnlyModelViewSet):
    """Assessments: facts (schema 1), compatibility score, blockers and warnings, or why it failed."""

    queryset = Assessment.objects.all()
    serializer_class = serializers.AssessmentSerializer
    filterset_class = AssessmentFilterSet
    permission_classes = [IsOperator]
    ordering_fields = ["id", "created", "finished"]


class ConversionEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Reasons to convert (manual, schedule, health) and their approval state."""

    queryset = ConversionEvent.objects.all()
    serializer_class = serializers.ConversionEventSerializer
    filterset_class = ConversionEventFilterSet
    permission_classes = [IsOperator]
    ordering_fields = ["id", "created"]

    @extend_schema(
        request=serializers.DecisionSerializer, responses={200: serializers.ConversionEventSerializer}
    )
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Approve an event waiting for approval: the conversion starts (409 if it is not waiting)."""
        return self._decide(request, services.approve_event)

    @extend_schema(
        request=serializers.DecisionSerializer, responses={200: serializers.ConversionEventSerializer}
    )
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        """Reject an event waiting for approval (409 if it is not waiting)."""
        return self._decide(request, services.reject_event)

    def _decide(self, request, decide):
        params = serializers.DecisionSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        event = decide(self.get_object(), request.user, params.validated_data["note"])
        return Response(serializers.ConversionEventSerializer(event, context={"request": request}).data)


class ApprovalViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Conversion events waiting for an admin's approval (approve/reject them under events/)."""

    queryset = ConversionEvent.objects.filter(status="pending-approval")
    serializer_class = serializers.ConversionEventSerializer
    filterset_class = ConversionEventFilterSet
    permission_classes = [IsOperator]


class ConversionPolicyViewSet(viewsets.ModelViewSet):
    queryset = ConversionPolicy.objects.all()
    serializer_class = serializers.ConversionPolicySerializer
    filterset_class = ConversionPolicyFilterSet
    permission_classes = [IsOperator]


class SecurityEventViewSet(viewsets.ReadOnlyModelViewSet):
    """Host-key mismatches and other things an admin must look at."""

    queryset = SecurityEvent.objects.all()
    serializer_class = serializers.SecurityEventSerializer
    filterset_class = SecurityEventFilterSet
    permission_classes = [IsOperator]
