"""Hypervisors that receive converted machines, conversion jobs and their log lines."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from .choices import DomainType, JobStage, JobState, LogLevel

MiB = 1024 * 1024
GiB = 1024 * MiB
NETWORK_VALIDATOR = RegexValidator(
    r"^(user|network:[A-Za-z0-9_.-]+|bridge:[A-Za-z0-9_.-]+)$",
    "Use 'user', 'network:<libvirt network>' or 'bridge:<bridge>'.",
)
PREFIX_VALIDATOR = RegexValidator(r"^[a-z][a-z0-9-]{0,15}$", "1-16 of a-z, 0-9, '-', starting with a letter.")


class Hypervisor(models.Model):
    """A libvirt host: where converted machines' volumes and domains are created, and how much fits."""

    name = models.CharField(max_length=100, unique=True)
    uri = models.CharField(max_length=255, default="qemu:///system", help_text="libvirt connection URI.")
    storage_pool = models.CharField(max_length=100, help_text="Name of the libvirt storage pool for volumes.")
    network = models.CharField(
        max_length=120,
        default="user",
        validators=[NETWORK_VALIDATOR],
        help_text="'user', 'network:<libvirt network>' or 'bridge:<bridge>'.",
    )
    domain_type = models.CharField(
        max_length=16,
        choices=DomainType.choices,
        default=DomainType.QEMU,
        help_text="qemu unless KVM really works for ordinary guests here.",
    )
    memory_cap_bytes = models.PositiveBigIntegerField(
        default=4 * GiB,
        validators=[MinValueValidator(64 * MiB)],
        help_text="Largest memory a converted VM gets.",
    )
    memory_overcommit = models.FloatField(
        default=1.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(10.0)],
        help_text="Running VMs may use up to host memory x this.",
    )
    vcpu_overcommit = models.FloatField(
        default=4.0,
        validators=[MinValueValidator(0.1), MaxValueValidator(64.0)],
        help_text="A VM may have up to host CPUs x this vCPUs.",
    )
    name_prefix = models.CharField(
        max_length=16,
        default="p2v-",
        validators=[PREFIX_VALIDATOR],
        help_text="Prefix of every domain and volume this portal creates.",
    )
    console_dir = models.CharField(
        max_length=255, blank=True, help_text="Where serial-console logs go; empty: <var>/p2v-console."
    )
    boot_timeout_s = models.PositiveIntegerField(default=180, validators=[MinValueValidator(5)])
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ConversionJob(models.Model):
    """One conversion of a machine into a VM, run stage by stage; its state survives restarts."""

    machine = models.ForeignKey("p2v.Machine", on_delete=models.PROTECT, related_name="conversion_jobs")
    assessment = models.ForeignKey("p2v.Assessment", on_delete=models.PROTECT, related_name="conversion_jobs")
    event = models.ForeignKey(
        "p2v.ConversionEvent",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="conversion_jobs",
    )
    hypervisor = models.ForeignKey(Hypervisor, on_delete=models.PROTECT, related_name="jobs")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED, db_index=True)
    stage = models.CharField(max_length=16, choices=JobStage.choices, default=JobStage.PLAN)
    percent = models.FloatField(default=0.0)
    bytes_done = models.PositiveBigIntegerField(default=0, help_text="Disk bytes copied (logical).")
    bytes_total = models.PositiveBigIntegerField(default=0)
    wire_bytes = models.PositiveBigIntegerField(default=0, help_text="Bytes that crossed SSH.")
    rate_bytes_per_s = models.FloatField(default=0.0)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    plan = models.JSONField(
        default=dict, blank=True, help_text="Names, sizes, memory, vCPUs decided by plan."
    )
    resources = models.JSONField(
        default=dict, blank=True, help_text="What this job created on the hypervisor (removed on rollback)."
    )
    copy_state = models.JSONField(default=dict, blank=True, help_text="Per-disk checkpoints and digests.")
    changes = models.JSONField(default=list, blank=True, help_text="Guest changes made by adjust.")
    verification = models.JSONField(default=dict, blank=True, help_text="What the booted guest reported.")
    # The lease of the run that holds the job (services.JobLease): renewed by a heartbeat while a
    # stage runs, cleared between stages; an expired one means its worker is gone (watchdog.py).
    lease_token = models.CharField(max_length=32, blank=True, db_index=True)
    lease_owner = models.CharField(max_length=200, blank=True, help_text="Celery node name of the holder.")
    lease_pid = models.PositiveIntegerField(null=True, blank=True, help_text="Process id of the holder.")
    lease_expires = models.DateTimeField(null=True, blank=True)
    resumes = models.PositiveSmallIntegerField(default=0, help_text="Times re-queued after a lost worker.")
    lost_worker = models.CharField(
        max_length=200, blank=True, help_text="The worker the watchdog found lost, until a run resumes."
    )
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"conversion #{self.pk} of {self.machine_id} ({self.state}/{self.stage})"

    @property
    def group_name(self) -> str:
        return f"p2v-job-{self.pk}"


class JobLog(models.Model):
    """One log line of a job; also published live to the job's Channels group."""

    job = models.ForeignKey(ConversionJob, on_delete=models.CASCADE, related_name="logs")
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    stage = models.CharField(max_length=16, choices=JobStage.choices)
    level = models.CharField(max_length=8, choices=LogLevel.choices, default=LogLevel.INFO)
    message = models.TextField()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"[{self.stage}] {self.message[:60]}"
