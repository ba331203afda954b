"""The lease a run holds on a conversion job while it runs a stage, kept alive by a heartbeat.

Only the run holding the job's lease may run its stage; the lease (token, owner, pid, expiry) lives
in the job's row. A heartbeat thread renews it every P2V_JOB_HEARTBEAT_S seconds (5 by default) for
P2V_JOB_LEASE_S seconds (45 by default). A worker killed with SIGKILL stops renewing, so its lease
expires and the watchdog (watchdog.py) re-queues or fails the job. A run that finds its lease taken
over (the watchdog gave the job to another worker while this one was merely stuck) stops without
touching the job: the new holder owns it now.

A Celery message that arrives for a job whose lease is held and not expired is a duplicate (an
`acks_late` redelivery, or the watchdog's re-queue racing it) and is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from .choices import FINISHED_STATES
from .models import ConversionJob

logger = logging.getLogger(__name__)
DEFAULT_LEASE_S = 45.0
DEFAULT_HEARTBEAT_S = 5.0


def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from Django settings or the environment (settings first)."""
    raw = getattr(settings, name, None)
    if raw in (None, ""):
        raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def lease_seconds() -> float:
    return _seconds("P2V_JOB_LEASE_S", DEFAULT_LEASE_S)


def heartbeat_seconds() -> float:
    """How often the lease is renewed; at most a third of the lease, so two missed beats do not expire it."""
    return min(_seconds("P2V_JOB_HEARTBEAT_S", DEFAULT_HEARTBEAT_S), lease_seconds() / 3)


class JobBusy(RuntimeError):
    """A live run holds the job: the message should come back in `retry_in_s` seconds."""

    def __init__(self, why: str, retry_in_s: float) -> None:
        super().__init__(why)
        self.retry_in_s = retry_in_s


class LeaseLost(RuntimeError):
    """Another run holds this job now; this one must stop without changing the job."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who runs a stage: the Celery node name (or host name outside Celery) and the process id."""

    node: str
    pid: int

    @classmethod
    def here(cls, node: str | None = None) -> Holder:
        return cls(node=node or f"{os.getpid()}@{socket.gethostname()}", pid=os.getpid())

    def __str__(self) -> str:
        return f"{self.node} (pid {self.pid})"


@dataclasses.dataclass
class Claim:
    """The outcome of claiming: a lease, or why not. `busy_for_s` > 0: a live run holds the job (the
    message should come back after that many seconds, when the lease has either been renewed or
    expired); otherwise the message is not needed any more (finished job, stage already done)."""

    lease: JobLease | None
    why: str = ""
    busy_for_s: float = 0.0
    lost_worker: str = ""  # the previous holder that died, when this claim resumes its work


class JobLease:
    """A held lease: renews itself in a thread until released; `check()` raises LeaseLost once lost."""

    def __init__(self, job_id: int, token: str, holder: Holder) -> None:
        self.job_id = job_id
        self.token = token
        self.holder = holder
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handed_over = False

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        if self._lost.is_set():
            raise LeaseLost(f"conversion #{self.job_id}: another worker took over the job")

    def renew(self) -> bool:
        """Extend the lease if this run still holds it; False (and lost from now on) if not."""
        expires = timezone.now() + timedelta(seconds=lease_seconds())
        renewed = ConversionJob.objects.filter(pk=self.job_id, lease_token=self.token).update(
            lease_expires=expires
        )
        if not renewed:
            self._lost.set()
        return bool(renewed)

    def still_held(self) -> bool:
        """Lock the row and check the token (call inside a transaction before a decisive write)."""
        held = (
            ConversionJob.objects.select_for_update().filter(pk=self.job_id, lease_token=self.token).exists()
        )
        if not held:
            self._lost.set()
        return held

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"p2v-lease-{self.job_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = heartbeat_seconds()
        try:
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        if self._stop.is_set():
                            return  # handed over meanwhile: the next stage's run renewed it
                        logger.warning("p2v job %s: lease lost; this run stops", self.job_id)
                        return
                except Exception as exc:  # a database blip: try again next beat; expiry is the backstop
                    logger.warning("p2v job %s: could not renew the lease: %s", self.job_id, exc)
                    close_old_connections()
        finally:
            connection.close()  # this thread's own database connection

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def hand_over(self) -> str:
        """Before queueing the next stage: the lease stays with the job for one more lease period,
        held by no process (no owner) until the next stage's message takes it over with the token
        returned. A worker dying between this and the queueing leaves an expired hand-over, which
        the watchdog re-queues without counting a lost worker."""
        self.stop_heartbeat()
        ConversionJob.objects.filter(pk=self.job_id, lease_token=self.token).update(
            lease_owner="",
            lease_pid=None,
            lease_expires=timezone.now() + timedelta(seconds=lease_seconds()),
        )
        self._handed_over = True
        return self.token

    def release(self) -> None:
        """Stop the heartbeat and clear the lease (unless handed over, or no longer ours)."""
        self.stop_heartbeat()
        if self._handed_over:
            return
        ConversionJob.objects.filter(pk=self.job_id, lease_token=self.token).update(
            lease_token="", lease_owner="", lease_pid=None, lease_expires=None
        )


def claim(job_id: int, holder: Holder, stage: str | None = None, handoff: str = "") -> Claim:
    """Take the job's lease for `holder` unless it finished, the message is stale (sent for `stage`
    while the job has moved on) or a live run holds it. `handoff` is the token the previous stage's
    run passed on with this message: it may take over that lease at once."""
    now = timezone.now()
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().get(pk=job_id)
        if job.state in FINISHED_STATES:
            return Claim(None, f"the job is already {job.state}")
        if stage and job.stage != stage:
            return Claim(None, f"sent for stage {stage}, the job is at stage {job.stage}")
        held = job.lease_token and job.lease_token != handoff
        if held and job.lease_expires and job.lease_expires > now:
            holder_text = job.lease_owner or "the previous stage's hand-over"
            return Claim(
                None,
                f"held by {holder_text} until {job.lease_expires.isoformat()}",
                busy_for_s=(job.lease_expires - now).total_seconds(),
            )
        lost_worker = job.lost_worker
        if held and job.lease_owner and not lost_worker:
            # Expired before the watchdog saw it: this (redelivered) message is the first to notice.
            lost_worker = f"{job.lease_owner} (pid {job.lease_pid})"
        token = uuid.uuid4().hex
        ConversionJob.objects.filter(pk=job_id).update(
            lease_token=token,
            lease_owner=holder.node[:200],
            lease_pid=holder.pid,
            lease_expires=now + timedelta(seconds=lease_seconds()),
            lost_worker="",
        )
    return Claim(JobLease(job_id, token, holder), lost_worker=lost_worker)
