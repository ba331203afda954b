"""Serializers of hypervisors, conversion jobs (with stages and progress) and job log lines."""

from __future__ import annotations

from rest_framework import serializers

from datacenter.api.serializers import BaseModelSerializer

from ..choices import STAGE_ORDER, JobStage, JobState
from ..models import ConversionJob, Hypervisor, JobLog


class HypervisorSerializer(BaseModelSerializer):
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
