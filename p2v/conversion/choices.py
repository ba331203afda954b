"""States, stages and log levels of conversion jobs, in one place."""

from django.db import models


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed (rolled back)"
    CANCELLED = "cancelled", "Cancelled (rolled back)"


FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobStage(models.TextChoices):
    PLAN = "plan", "Plan"
    COPY = "copy", "Copy disks"
    BUILD = "build", "Build VM"
    ADJUST = "adjust", "Adjust guest"
    VERIFY = "verify", "Verify boot"
    DONE = "done", "Done"


STAGE_ORDER = (JobStage.PLAN, JobStage.COPY, JobStage.BUILD, JobStage.ADJUST, JobStage.VERIFY, JobStage.DONE)


class LogLevel(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    ERROR = "error", "Error"


class DomainType(models.TextChoices):
    QEMU = "qemu", "QEMU (software emulation)"
    KVM = "kvm", "KVM"
