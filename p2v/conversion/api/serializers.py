"""Serializers of hypervisors, conversion jobs (with stages and progress) and job log lines."""

from __future__ import annotations

from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer

from .. import workers
from ..choices import STAGE_ORDER, JobStage, JobState
from ..models import ConversionJob, Hypervisor, JobLog


class HypervisorSerializer(BaseModelSerializer):
    """`queue`: where this hypervisor's jobs are sent; `workers`: the Celery workers consuming that
    queue that answered just now; `worker_live`: whether there is one (null when the broker could
    not be asked, e.g. the embedded in-memory broker)."""

    queue = serializers.SerializerMethodField()
    workers = serializers.SerializerMethodField()
    worker_live = serializers.SerializerMethodField()

    def get_queue(self, obj: Hypervisor) -> str:
        return workers.job_queue(obj)

    def _live(self) -> dict[str, list[str]] | None:
        # One broadcast per request, however many hypervisors are listed.
        if "live_workers" not in self.context:
            self.context["live_workers"] = workers.live_workers_by_queue()
        return self.context["live_workers"]

    def get_workers(self, obj: Hypervisor) -> list[str] | None:
        live = self._live()
        return None if live is None else live.get(workers.job_queue(obj), [])

    def get_worker_live(self, obj: Hypervisor) -> bool | None:
        nodes = self.get_workers(obj)
        return None if nodes is None else bool(nodes)

    def validate_name(self, value: str) -> str:
        try:
            queue = workers.hypervisor_queue(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        others = Hypervisor.objects.exclude(pk=getattr(self.instance, "pk", None))
        for other in others.only("name"):
            if workers.hypervisor_queue(other.name) == queue:
                raise serializers.ValidationError(
                    f"{value!r} would share the job queue {queue!r} with hypervisor {other.name!r}"
                )
        return value

    class Meta:
        model = Hypervisor
        fields = [
            "id",
            "display",
            "name",
            "uri",
            "storage_pool",
            "network",
            "domain_type",
            "memory_cap_bytes",
            "memory_overcommit",
            "vcpu_overcommit",
            "name_prefix",
            "console_dir",
            "boot_timeout_s",
            "queue",
            "workers",
            "worker_live",
            "created",
            "updated",
        ]
        read_only_fields = ["created", "updated"]


class JobLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobLog
        fields = ["id", "at", "stage", "level", "message"]


class StageSerializer(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()
    status = serializers.ChoiceField(choices=["pending", "running", "done", "failed", "cancelled"])


class ConversionJobSerializer(BaseModelSerializer):
    stages = serializers.SerializerMethodField()
    machine_name = serializers.CharField(source="machine.name", read_only=True)
    hypervisor_name = serializers.CharField(source="hypervisor.name", read_only=True)

    class Meta:
        model = ConversionJob
        fields = [
            "id",
            "display",
            "machine",
            "machine_name",
            "assessment",
            "event",
            "hypervisor",
            "hypervisor_name",
            "state",
            "stage",
            "stages",
            "percent",
            "bytes_done",
            "bytes_total",
            "wire_bytes",
            "rate_bytes_per_s",
            "error",
            "cancel_requested",
            "plan",
            "resources",
            "changes",
            "verification",
            "created",
            "started",
            "finished",
            "updated",
        ]
        read_only_fields = fields

    def get_stages(self, job: ConversionJob) -> list[dict]:
        """Every stage with its status, so a client can draw the pipeline without knowing the rules."""
        current = STAGE_ORDER.index(JobStage(job.stage))
        result = []
        for index, stage in enumerate(STAGE_ORDER[:-1]):
            if index < current or job.state == JobState.SUCCEEDED:
                status = "done"
            elif index == current and job.state == JobState.RUNNING:
                status = "running"
            elif index == current and job.state in (JobState.FAILED, JobState.CANCELLED):
                status = job.state
            else:
                status = "pending"
            result.append({"name": stage.value, "label": stage.label, "status": status})
        return result
