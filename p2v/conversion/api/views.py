"""REST views: hypervisors (operators), conversion jobs with stages, progress, logs and cancel.

Converting a machine starts at POST /api/p2v/machines/{id}/convert/ (p2v/api: it raises a manual
conversion event, which calls services.start_conversion); the job appears here, filterable by event.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from datacenter.api.viewsets import OperatorViewSet
from datacenter.tenancy.permissions import IsOperator

from .. import services
from ..models import ConversionJob, Hypervisor
from .serializers import ConversionJobSerializer, HypervisorSerializer, JobLogSerializer

MAX_LOG_LINES = 1000


class HypervisorViewSet(OperatorViewSet):
    queryset = Hypervisor.objects.all()
    serializer_class = HypervisorSerializer


class ConversionJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Conversion jobs: stage, progress, logs; `cancel` stops one and rolls it back."""

    queryset = ConversionJob.objects.select_related("machine", "hypervisor").all()
    serializer_class = ConversionJobSerializer
    permission_classes = [IsOperator]
    filterset_fields = ["machine", "event", "state", "stage", "hypervisor"]

    @extend_schema(
        parameters=[OpenApiParameter("after", int, description="Only lines with a larger id.")],
        responses=JobLogSerializer(many=True),
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()
        lines = job.logs.all()
        after = request.query_params.get("after")
        if after is not None:
            if not after.isdigit():
                raise ValidationError({"after": f"must be a non-negative integer, got {after!r}"})
            lines = lines.filter(pk__gt=int(after))
        return Response(JobLogSerializer(lines[:MAX_LOG_LINES], many=True).data)

    @extend_schema(request=None, responses=ConversionJobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()
        try:
            job = services.cancel_job(job)
        except services.ConversionError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(
            ConversionJobSerializer(job, context={"request": request}).data, status=status.HTTP_202_ACCEPTED
        )
