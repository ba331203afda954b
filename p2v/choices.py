"""Status and kind enumerations of the P2V app, in one place."""

from django.db import models


class AssessmentStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class AssessmentTrigger(models.TextChoices):
    MANUAL = "manual", "Requested by an admin"
    SCHEDULE = "schedule", "Periodic (celery beat)"
    CONVERSION = "conversion", "Before a conversion"


class ConversionEventKind(models.TextChoices):
    MANUAL = "manual", "Admin request"
    SCHEDULE = "schedule", "Schedule"
    HEALTH = "health", "Hardware health"


class ConversionEventStatus(models.TextChoices):
    PENDING_APPROVAL = "pending-approval", "Waiting for approval"
    APPROVED = "approved", "Approved"
    STARTED = "started", "Conversion started"
    REJECTED = "rejected", "Rejected"
    # Once its job has ended, the event says how (the job's own state; set by the job's last stage).
    SUCCEEDED = "succeeded", "Converted"
    FAILED = "failed", "Conversion failed"
    CANCELLED = "cancelled", "Conversion cancelled"


class ConversionMode(models.TextChoices):
    AUTO = "auto", "Start conversions at once"
    APPROVAL = "approval", "Wait for an admin's approval"


class HostKeySource(models.TextChoices):
    NONE = "", "Not pinned yet"
    FIRST_CONTACT = "first-contact", "Pinned on first contact"
    ADMIN = "admin", "Supplied by an admin"


class SecurityEventKind(models.TextChoices):
    HOST_KEY_MISMATCH = "host-key-mismatch", "Host key mismatch"


class Firmware(models.TextChoices):
    BIOS = "bios", "BIOS"
    UEFI = "uefi", "UEFI"
