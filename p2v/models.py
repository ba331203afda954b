"""Physical machines, their assessments, conversion events, the policy that decides, security events."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from . import ssh
from .choices import (
    AssessmentStatus,
    AssessmentTrigger,
    ConversionEventKind,
    ConversionEventStatus,
    ConversionMode,
    HostKeySource,
    SecurityEventKind,
)
from .credentials import decrypt_secret, encrypt_secret

MiB = 1024 * 1024
GiB = 1024 * MiB


def default_firmware() -> list[str]:
    return ["bios", "uefi"]


class ConversionPolicy(models.Model):
    """What happens when a conversion event is raised, and what the target can offer.

    The policy marked `is_default` applies to machines without one of their own.
    """

    name = models.CharField(max_length=100, unique=True)
    is_default = models.BooleanField(default=False)
    mode = models.CharField(
        max_length=16,
        choices=ConversionMode.choices,
        default=ConversionMode.APPROVAL,
        help_text="For schedule and health events; an admin's own request always starts.",
    )
    assessment_interval_s = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(60)],
        help_text="Re-assess machines this often (celery beat); empty: only on request.",
    )
    io_error_increase_threshold = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Raise a health event when kernel-log I/O errors grew by this many since the "
        "last assessment.",
    )
    ecc_ce_increase_threshold = models.PositiveIntegerField(
        default=10,
        validators=[MinValueValidator(1)],
        help_text="Raise a health event when corrected ECC errors grew by this many (any "
        "uncorrected error raises).",
    )
    memory_cap_bytes = models.PositiveBigIntegerField(
        default=16 * GiB,
        validators=[MinValueValidator(64 * MiB)],
        help_text="Largest memory a VM gets; a larger machine is converted with this much (warning).",
    )
    supported_firmware = models.JSONField(
        default=default_firmware, help_text='Firmware the hypervisor offers: ["bios", "uefi"].'
    )
    target_pool_free_bytes = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Free space in the target storage pool; empty: unknown."
    )
    min_boot_free_bytes = models.PositiveBigIntegerField(
        default=100 * MiB, help_text="Free space needed on /boot (or /) to rebuild the initramfs."
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "conversion policies"
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=models.Q(is_default=True), name="p2v_policy_single_default"
            )
        ]

    def __str__(self) -> str:
        return self.name


class Machine(models.Model):
    """A physical machine reachable over SSH, with its credential encrypted and its host key pinned."""

    name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=200, blank=True)
    address = models.CharField(max_length=255, help_text="Hostname or IP address of the SSH server.")
    ssh_port = models.PositiveIntegerField(
        default=22, validators=[MinValueValidator(1), MaxValueValidator(65535)]
    )
    ssh_user = models.CharField(max_length=64, default="root")
    credential_ciphertext = models.TextField(
        blank=True, editable=False, help_text="The private key, Fernet-encrypted."
    )
    credential_public_key = models.CharField(max_length=1000, blank=True, editable=False)
    sudo_password_ciphertext = models.TextField(
        blank=True,
        editable=False,
        help_text="For an ssh_user other than root without NOPASSWD sudo: its sudo password, "
        "Fernet-encrypted.",
    )
    host_key_fingerprint = models.CharField(
        max_length=60, blank=True, help_text="SHA256 fingerprint of the pinned SSH host key."
    )
    host_key_source = models.CharField(
        max_length=16, choices=HostKeySource.choices, blank=True, default=HostKeySource.NONE
    )
    host_key_pinned_at = models.DateTimeField(null=True, blank=True)
    tenant = models.ForeignKey(
        "tenancy.Tenant", on_delete=models.SET_NULL, null=True, blank=True, related_name="p2v_machines"
    )
    policy = models.ForeignKey(
        ConversionPolicy,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="machines",
        help_text="Empty: the default policy.",
    )
    connect_timeout_s = models.FloatField(
        default=10.0, validators=[MinValueValidator(0.5), MaxValueValidator(120)]
    )
    command_timeout_s = models.FloatField(
        default=30.0, validators=[MinValueValidator(0.5), MaxValueValidator(600)]
    )
    scheduled_conversion_at = models.DateTimeField(
        null=True, blank=True, help_text="Raise a scheduled conversion event at this time (celery beat)."
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def set_private_key(self, pem: str) -> None:
        """Validate and store the private key encrypted (raises ValueError naming the problem)."""
        key = ssh.load_private_key(pem)
        self.credential_ciphertext = encrypt_secret(pem)
        self.credential_public_key = ssh.public_key_line(key)

    def private_key(self) -> str:
        return decrypt_secret(self.credential_ciphertext)

    def set_sudo_password(self, password: str) -> None:
        """Store the sudo password encrypted; an empty one removes it (then only NOPASSWD sudo works)."""
        if "\n" in password or "\r" in password:
            raise ValueError("the sudo password must be one line (sudo reads it up to the line end)")
        self.sudo_password_ciphertext = encrypt_secret(password) if password else ""

    def endpoint(self) -> ssh.Endpoint:
        return ssh.Endpoint(
            address=self.address,
            port=self.ssh_port,
            user=self.ssh_user,
            private_key=self.private_key(),
            host_key_fingerprint=self.host_key_fingerprint or None,
            sudo_password=(
                decrypt_secret(self.sudo_password_ciphertext) if self.sudo_password_ciphertext else None
            ),
        )

    def effective_policy(self) -> ConversionPolicy:
        if self.policy_id:
            return self.policy
        return ConversionPolicy.objects.filter(is_default=True).first() or ConversionPolicy(name="built-in")

    @property
    def latest_assessment(self) -> Assessment | None:
        return self.assessments.filter(status=AssessmentStatus.SUCCEEDED).order_by("-finished", "-id").first()


class Assessment(models.Model):
    """One look at a machine. Facts, score and findings are written together or not at all."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="assessments")
    status = models.CharField(
        max_length=16, choices=AssessmentStatus.choices, default=AssessmentStatus.QUEUED, db_index=True
    )
    trigger = models.CharField(
        max_length=16, choices=AssessmentTrigger.choices, default=AssessmentTrigger.MANUAL
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    facts_schema = models.PositiveSmallIntegerField(null=True, blank=True)
    facts = models.JSONField(null=True, blank=True)
    compatibility_score = models.PositiveSmallIntegerField(null=True, blank=True)
    compatible = models.BooleanField(null=True, blank=True)
    blockers = models.JSONField(default=list, blank=True)
    warnings = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True, help_text="Why the assessment failed.")
    host_key_fingerprint = models.CharField(max_length=60, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    duration_s = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"assessment #{self.pk} of {self.machine} ({self.status})"


class ConversionEvent(models.Model):
    """A reason to convert a machine, and what was decided about it."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="conversion_events")
    kind = models.CharField(max_length=16, choices=ConversionEventKind.choices)
    status = models.CharField(max_length=20, choices=ConversionEventStatus.choices, db_index=True)
    details = models.JSONField(default=dict, blank=True)
    raised_by = models.CharField(max_length=200, help_text="Username, 'schedule' or 'health: assessment #N'.")
    raised_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    assessment = models.ForeignKey(
        Assessment, on_delete=models.SET_NULL, null=True, blank=True, related_name="conversion_events"
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.kind} conversion event #{self.pk} for {self.machine} ({self.status})"


class SecurityEvent(models.Model):
    """Something an admin must look at, e.g. a machine presenting a host key other than the pinned one."""

    kind = models.CharField(max_length=32, choices=SecurityEventKind.choices)
    machine = models.ForeignKey(
        Machine, on_delete=models.SET_NULL, null=True, blank=True, related_name="security_events"
    )
    assessment = models.ForeignKey(
        Assessment, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    address = models.CharField(max_length=255)
    port = models.PositiveIntegerField()
    expected_fingerprint = models.CharField(max_length=60, blank=True)
    presented_fingerprint = models.CharField(max_length=60, blank=True)
    message = models.TextField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.kind} at {self.address}:{self.port}"
