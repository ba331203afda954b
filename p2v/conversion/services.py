"""Conversion jobs: start, cancel, run one stage, roll back. Called by the API, tasks and triggers.

A job walks plan -> copy -> build -> adjust -> verify -> done; `run_stage` runs exactly the job's
current stage and persists the outcome, so a Celery task per stage can pick up where the last one
stopped. Anything created on the hypervisor is written into `job.resources` *before* it is created
(names carry the hypervisor's prefix and the job id), so a rollback after any failure or a cancel
removes exactly what this job made: the domain (with its NVRAM), the volumes, the console log. The
source machine is only ever read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import paramiko
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from p2v import ssh
from p2v.facts import iter_devices

from . import adjust as adjust_mod
from . import copy as copy_mod
from . import domain_xml, faults, isolation, usedblocks, verify, verify_boot, workers
from . import lease as lease_mod
from .choices import FINISHED_STATES, STAGE_ORDER, JobStage, JobState, LogLevel
from .libvirt_binding import libvirt
from .models import ConversionJob, Hypervisor, JobLog

logger = logging.getLogger(__name__)
SLUG_RE = re.compile(r"[^a-z0-9-]+")
PROGRESS_SAVE_INTERVAL_S = 0.5
# Settings (or environment variables of the same name) for the copy's retries, in seconds.
COPY_RETRY_SETTINGS = {
    "initial_delay_s": "P2V_COPY_RETRY_INITIAL_S",
    "max_delay_s": "P2V_COPY_RETRY_MAX_S",
    "window_s": "P2V_COPY_RETRY_WINDOW_S",
}


def copy_retry_policy() -> copy_mod.RetryPolicy:
    """The copy's backoff from Django settings or the environment; defaults ride out a reboot.

    A value that is not a positive number raises ValueError naming the setting and the value.
    """
    values: dict[str, float] = {}
    for field, name in COPY_RETRY_SETTINGS.items():
        raw = getattr(settings, name, None) or os.environ.get(name)
        if raw in (None, ""):
            continue
        try:
            values[field] = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
        if values[field] <= 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return copy_mod.RetryPolicy(**values)


class ConversionError(RuntimeError):
    """A conversion cannot start or a stage failed; the message names what and why."""


class JobCancelled(ConversionError):
    pass


# --- starting and cancelling ----------------------------------------------------------------------


def default_hypervisor() -> Hypervisor:
    hypervisor = Hypervisor.objects.order_by("id").first()
    if hypervisor is None:
        raise ConversionError("no hypervisor is registered (POST /api/p2v/hypervisors/ first)")
    return hypervisor


def start_conversion(event, hypervisor: Hypervisor | None = None, requested_by=None) -> ConversionJob:
    """Create a job for a conversion event and queue its first stage (after the transaction commits).

    Uses the event's assessment, or the machine's latest successful one. Raises ConversionError when
    there is no usable assessment, no hypervisor, or the machine already has a job in progress.
    """
    machine = event.machine
    assessment = event.assessment or machine.latest_assessment
    if assessment is None or not assessment.facts:
        raise ConversionError(f"machine {machine.name!r} has no successful assessment to convert from")
    if assessment.blockers:
        raise ConversionError(
            f"assessment #{assessment.pk} of {machine.name!r} has blockers: "
            + "; ".join(str(b.get("message", b) if isinstance(b, dict) else b) for b in assessment.blockers)[
                :500
            ]
        )
    if hypervisor is None and (event.details or {}).get("hypervisor_id"):
        hypervisor = Hypervisor.objects.filter(pk=event.details["hypervisor_id"]).first()
    hypervisor = hypervisor or default_hypervisor()
    with transaction.atomic():
        busy = (
            ConversionJob.objects.select_for_update()
            .filter(machine=machine)
            .exclude(state__in=FINISHED_STATES)
        )
        if busy.exists():
            raise ConversionError(
                f"machine {machine.name!r} already has conversion #{busy.first().pk} in progress"
            )
        job = ConversionJob.objects.create(
            machine=machine,
            assessment=assessment,
            event=event,
            hypervisor=hypervisor,
            requested_by=requested_by,
        )
        log(
            job,
            f"conversion of {machine.name} from assessment #{assessment.pk} queued "
            f"on hypervisor {hypervisor.name}, queue {workers.job_queue(hypervisor)} "
            f"({event.kind} event #{event.pk})",
        )
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def cancel_job(job: ConversionJob) -> ConversionJob:
    """Ask a job to stop; the running stage notices within about a second and rolls back."""
    with transaction.atomic():
        job = ConversionJob.objects.select_for_update().get(pk=job.pk)
        if job.state in FINISHED_STATES:
            raise ConversionError(f"conversion #{job.pk} has already finished ({job.state})")
        job.cancel_requested = True
        job.save(update_fields=["cancel_requested", "updated"])
    # No extra task: the queued or running stage task sees the flag (at its start, or within about a
    # second while copying or booting) and rolls back; a second task could race it.
    log(job, "cancel requested", LogLevel.WARNING)
    return job


def _enqueue(job_id: int) -> None:
    """Send the job's first stage to its hypervisor's queue (p2v.conversion.workers); the task sends
    each next stage to the queue it came from."""
    from .tasks import run_conversion_stage

    hypervisor = Hypervisor.objects.get(jobs__pk=job_id)
    run_conversion_stage.apply_async((job_id,), queue=workers.job_queue(hypervisor))


# --- publishing -------------------------------------------------------------------------------------


def job_snapshot(job: ConversionJob) -> dict:
    return {
        "id": job.pk,
        "state": job.state,
        "stage": job.stage,
        "percent": round(job.percent, 1),
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "wire_bytes": job.wire_bytes,
        "rate_bytes_per_s": round(job.rate_bytes_per_s),
        "error": job.error,
    }


def _publish(job: ConversionJob, message_type: str, data: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(job.group_name, {"type": message_type, "data": data})
    except Exception as exc:  # a live-update outage must not fail the conversion; it is logged
        logger.warning("could not publish %s for job %s: %s", message_type, job.pk, exc)


def log(job: ConversionJob, message: str, level: str = LogLevel.INFO) -> JobLog:
    line = JobLog.objects.create(job=job, stage=job.stage, level=level, message=message)
    logger.log(
        logging.WARNING if level != LogLevel.INFO else logging.INFO,
        "p2v job %s [%s] %s",
        job.pk,
        job.stage,
        message,
    )
    _publish(
        job,
        "job.log",
        {
            "id": line.pk,
            "job": job.pk,
            "at": line.at.isoformat(),
            "stage": line.stage,
            "level": line.level,
            "message": line.message,
        },
    )
    return line


def save_progress(job: ConversionJob, *fields: str) -> None:
    job.save(update_fields=[*fields, "updated"])
    _publish(job, "job.update", job_snapshot(job))


# --- running ----------------------------------------------------------------------------------------


# Runs holding a job's lease in this process, by job id: checked wherever the stages already look
# for a cancel, so a run whose job was given to another worker stops there.
_LEASES: dict[int, lease_mod.JobLease] = {}


def run_stage(
    job_id: int,
    *,
    stage: str | None = None,
    holder: lease_mod.Holder | None = None,
    handoff: str = "",
    enqueue_next: Callable[[str, str], None] | None = None,
) -> bool:
    """Run the job's current stage under its lease; True if another stage should be queued.

    `stage` is the stage the message was sent for (a stale message is dropped), `handoff` the lease
    token the previous stage passed on. With `enqueue_next(stage, token)`, the next stage is queued
    while this run still holds the lease, so no moment exists where the job is running, unleased
    and unqueued. Raises lease_mod.JobBusy when a live run holds the job (the caller retries later).
    """
    holder = holder or lease_mod.Holder.here()
    claimed = lease_mod.claim(job_id, holder, stage, handoff)
    if claimed.lease is None:
        if claimed.busy_for_s > 0:
            raise lease_mod.JobBusy(claimed.why, claimed.busy_for_s)
        logger.info("p2v job %s: message dropped: %s", job_id, claimed.why)
        return False
    lease = claimed.lease
    _LEASES[job_id] = lease
    lease.start_heartbeat()
    try:
        return _run_leased_stage(job_id, lease, claimed.lost_worker, enqueue_next)
    except lease_mod.LeaseLost:
        job = ConversionJob.objects.get(pk=job_id)
        log(job, f"the run on {holder} stops: the job was given to another worker", LogLevel.WARNING)
        return False
    finally:
        _LEASES.pop(job_id, None)
        lease.release()


def _run_leased_stage(
    job_id: int,
    lease: lease_mod.JobLease,
    lost_worker: str,
    enqueue_next: Callable[[str, str], None] | None,
) -> bool:
    job = ConversionJob.objects.select_related("machine", "assessment", "hypervisor").get(pk=job_id)
    if job.cancel_requested:
        _finish_with_rollback(job, JobState.CANCELLED, "cancelled by an admin")
        return False
    if job.state == JobState.QUEUED:
        job.state, job.started = JobState.RUNNING, job.started or timezone.now()
        save_progress(job, "state", "started")
    stage = JobStage(job.stage)
    if stage == JobStage.DONE:
        return False
    if lost_worker:
        log(
            job,
            f"worker {lost_worker} lost during {stage.value}; resumed on {lease.holder}",
            LogLevel.WARNING,
        )
    log(job, f"stage {stage.label} started on {lease.holder}")
    started = time.monotonic()
    try:
        if lost_worker:
            _clean_up_lost_run(job, stage)
        STAGES[stage](job)
        lease.check()
    except lease_mod.LeaseLost:
        raise
    except JobCancelled:
        if lease.lost:  # the verify stage reports a taken-over lease as a stop request
            raise lease_mod.LeaseLost(f"conversion #{job.pk}") from None
        _finish_with_rollback(job, JobState.CANCELLED, "cancelled by an admin")
        return False
    except Exception as exc:  # every failure ends the job with its reason and a rollback
        if lease.lost:  # failed because another worker took over (its rollback is not ours to do)
            raise lease_mod.LeaseLost(f"conversion #{job.pk}") from exc
        reason = f"{stage.label} failed: {exc}"
        logger.exception("p2v job %s: %s", job.pk, reason)
        _finish_with_rollback(job, JobState.FAILED, reason)
        return False
    next_stage = STAGE_ORDER[STAGE_ORDER.index(stage) + 1]
    with transaction.atomic():
        if not lease.still_held():
            raise lease_mod.LeaseLost(f"conversion #{job.pk}")
        log(job, f"stage {stage.label} finished in {time.monotonic() - started:.1f} s")
        job.stage = next_stage
        job.percent = 0.0
        if next_stage == JobStage.DONE:
            job.state, job.percent, job.finished = JobState.SUCCEEDED, 100.0, timezone.now()
            save_progress(job, "stage", "state", "percent", "finished")
            _event_follows(job)
            unread = [n["field"] for n in (job.verification or {}).get("not_compared") or []]
            log(
                job,
                "conversion finished: the VM boots and matches the assessment"
                + (f" on every compared field (not compared: {', '.join(unread)})" if unread else ""),
            )
            return False
        save_progress(job, "stage", "percent")
    if enqueue_next is not None:
        enqueue_next(next_stage, lease.hand_over())
    return True


def _clean_up_lost_run(job: ConversionJob, stage: JobStage) -> None:
    """What a killed worker left mid-stage that would stand in the re-run's way. The copy resumes at
    its last checkpoint and build redefines the same domain, so they need nothing; adjust must not
    share the volumes with the dead run's e2fsck or debugfs; verify boots a new twin on a new
    isolated network, so the old ones go first (the twin through libvirt, before anything else
    holding the volumes is killed)."""
    resources = job.resources or {}
    if stage == JobStage.VERIFY:
        if resources.get("verify_domain"):
            try:
                with _libvirt(job) as conn:
                    problems = _remove_verify_domain(
                        job, conn, resources["verify_domain"], "lost run clean-up"
                    )
            except ConversionError as exc:
                problems = [str(exc)]
            if problems:
                raise ConversionError("cannot clean up the lost run's verification: " + "; ".join(problems))
        if resources.get("isolation"):
            problems = isolation.remove(resources["isolation"])
            if problems:
                raise ConversionError("cannot remove the lost run's isolated network: " + "; ".join(problems))
            log(
                job, f"lost run clean-up: isolated network {resources['isolation']} removed", LogLevel.WARNING
            )
    if stage in (JobStage.ADJUST, JobStage.VERIFY):
        for note in release_volumes(job):
            log(job, f"lost run clean-up: {note}", LogLevel.WARNING)


def _finish_with_rollback(job: ConversionJob, state: str, reason: str) -> None:
    job.refresh_from_db()
    log(job, reason, LogLevel.ERROR if state == JobState.FAILED else LogLevel.WARNING)
    problems = rollback(job)
    job.state, job.finished = state, timezone.now()
    job.error = reason + (f" (rollback problems: {'; '.join(problems)})" if problems else "")
    job.lease_token, job.lease_owner, job.lease_pid, job.lease_expires = "", "", None, None
    save_progress(
        job, "state", "finished", "error", "lease_token", "lease_owner", "lease_pid", "lease_expires"
    )
    _event_follows(job)


def _event_follows(job: ConversionJob) -> None:
    """The conversion event that started this job ends the way the job did."""
    from p2v.choices import ConversionEventStatus
    from p2v.models import ConversionEvent

    status = {
        JobState.SUCCEEDED: ConversionEventStatus.SUCCEEDED,
        JobState.FAILED: ConversionEventStatus.FAILED,
        JobState.CANCELLED: ConversionEventStatus.CANCELLED,
    }.get(job.state)
    if job.event_id and status:
        ConversionEvent.objects.filter(pk=job.event_id, status=ConversionEventStatus.STARTED).update(
            status=status
        )


def _check_cancel(job: ConversionJob) -> None:
    """Stop the stage if an admin cancelled the job, or another worker took it over."""
    lease = _LEASES.get(job.pk)
    if lease is not None:
        lease.check()
    if ConversionJob.objects.filter(pk=job.pk, cancel_requested=True).exists():
        raise JobCancelled("cancelled")


def _fault_point(job: ConversionJob, point: str) -> None:
    """A place where the chaos tests may hold this stage (faults.py; off in production)."""
    faults.hold(point, lambda message: log(job, message, LogLevel.WARNING), lambda: _check_cancel(job))


def release_volumes(job: ConversionJob) -> list[str]:
    """Free the job's volumes from what a lost run left holding them: processes with a volume (or a
    loop device over it) open are killed by PID, loop devices detached. What was done, as notes."""
    pool_path = (job.plan or {}).get("pool_path")
    if not pool_path:
        return []
    paths = {str(Path(pool_path) / v["volume"]) for v in job.plan.get("volumes") or []}
    notes: list[str] = []
    loops: dict[str, str] = {}
    for path in sorted(paths):
        if not Path(path).exists():
            continue
        try:
            listed = subprocess.run(
                ["losetup", "--associated", path], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError as exc:
            notes.append(f"could not list loop devices: {exc}")
            continue
        for line in listed.stdout.splitlines():
            loops[line.split(":", 1)[0]] = path
    held = paths | set(loops)
    for pid, name, what in _processes_holding(held):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            notes.append(f"killed {name} (pid {pid}) still holding {what}")
    for loop, path in loops.items():
        done = subprocess.run(
            ["losetup", "-d", loop], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0:
            notes.append(f"detached {loop} from {Path(path).name}")
        else:
            notes.append(f"could not detach {loop}: {done.stderr.strip()}")
    return notes


def _processes_holding(paths: set[str]) -> list[tuple[int, str, str]]:
    """(pid, command name, path) of other processes with one of `paths` open (from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target in paths:
                    found.append((int(proc.name), (proc / "comm").read_text().strip(), target))
                    break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@contextlib.contextmanager
def _libvirt(job: ConversionJob):
    try:
        conn = libvirt.open(job.hypervisor.uri)
    except libvirt.libvirtError as exc:
        raise ConversionError(
            f"cannot connect to hypervisor {job.hypervisor.name} at {job.hypervisor.uri}: "
            f"{exc.get_error_message()}"
        ) from exc
    try:
        yield conn
    finally:
        conn.close()


def _pool(conn: libvirt.virConnect, job: ConversionJob) -> libvirt.virStoragePool:
    name = job.hypervisor.storage_pool
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        raise ConversionError(f"storage pool {name!r} does not exist on {job.hypervisor.uri}") from exc
    if not pool.isActive():
        raise ConversionError(f"storage pool {name!r} is not active")
    return pool


def _pool_path(pool: libvirt.virStoragePool) -> str:
    path = ET.fromstring(pool.XMLDesc()).findtext("target/path")  # noqa: S314 (libvirt's own XML)
    if not path:
        raise ConversionError(f"storage pool {pool.name()!r} has no target path (use a 'dir' pool)")
    return path


def console_dir(hypervisor: Hypervisor) -> Path:
    return Path(hypervisor.console_dir or Path(settings.VAR_DIR) / "p2v-console")


def _holds_boot(disk: dict, facts: dict) -> bool:
    """Whether /boot (or / when /boot is not separate) lives on this disk: the firmware boots the
    VM's first disk, while the source's disk order (sda, sdb) is only the order the kernel found them."""
    mounts = {fs["mountpoint"]: fs["device"] for fs in facts.get("filesystems") or []}
    boot_device = mounts.get("/boot") or mounts.get("/")
    if boot_device is None:
        return False
    return any(device["path"] == boot_device for device in iter_devices([disk]))


def plan_stage(job: ConversionJob) -> None:
    """Check the facts and the hypervisor's capacity; decide every name and size."""
    facts = job.assessment.facts or {}
    hypervisor = job.hypervisor
    if facts.get("schema") != 1:
        raise ConversionError(
            f"assessment #{job.assessment_id} has facts schema {facts.get('schema')!r}, expected 1"
        )
    disks = [d for d in facts.get("disks") or [] if d.get("size_bytes")]
    if not disks:
        raise ConversionError("the assessment lists no disks with a size")
    disks.sort(key=lambda disk: not _holds_boot(disk, facts))  # the VM boots from its first disk
    for disk in disks:
        if not str(disk.get("path", "")).startswith("/dev/"):
            raise ConversionError(f"disk {disk.get('name')!r} has no /dev path in the assessment")
    firmware = facts.get("firmware")
    if firmware not in ("bios", "uefi"):
        raise ConversionError(f"the assessment could not tell the firmware (got {firmware!r})")
    if firmware == "uefi" and not Path(domain_xml.OVMF_CODE).exists():
        raise ConversionError(f"UEFI guest but {domain_xml.OVMF_CODE} is missing (install ovmf)")
    policy_cap = job.machine.effective_policy().memory_cap_bytes
    memory_cap = min(hypervisor.memory_cap_bytes, policy_cap)
    memory = domain_xml.cap_memory(facts.get("memory_bytes"), memory_cap)
    if facts.get("memory_bytes") and memory < facts["memory_bytes"]:
        log(job, f"memory capped by policy: {facts['memory_bytes']} -> {memory} bytes", LogLevel.WARNING)
    vcpus, sockets, cores, threads = domain_xml.cpu_topology(facts.get("cpu"))
    nics = [
        {"name": n["name"], "mac": domain_xml.validate_mac(n["mac"])} for n in domain_xml.physical_nics(facts)
    ]
    base = f"{hypervisor.name_prefix}{SLUG_RE.sub('-', job.machine.name.lower()).strip('-')[:40]}-{job.pk}"
    with _libvirt(job) as conn:
        pool = _pool(conn, job)
        pool.refresh(0)
        _state, _capacity, _allocation, available = pool.info()
        need = sum(d["size_bytes"] for d in disks)
        if need > available:
            raise ConversionError(
                f"storage pool {pool.name()!r} has {available} bytes free, the disks need {need}"
            )
        _model, host_memory_mib, host_cpus, *_ = conn.getInfo()
        running_kib = sum(d.maxMemory() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        allowed = host_memory_mib * 1024 * 1024 * hypervisor.memory_overcommit
        if running_kib * 1024 + memory > allowed:
            raise ConversionError(
                f"not enough memory on {hypervisor.name}: running VMs use {running_kib * 1024} "
                f"bytes, this VM needs {memory}, policy allows {int(allowed)}"
            )
        if vcpus > host_cpus * hypervisor.vcpu_overcommit:
            raise ConversionError(
                f"{vcpus} vCPUs exceed {host_cpus} host CPUs x overcommit {hypervisor.vcpu_overcommit}"
            )
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(base)
            raise ConversionError(f"a domain named {base!r} already exists on {hypervisor.name}")
        volumes = []
        for index, disk in enumerate(disks):
            name = f"{base}-{SLUG_RE.sub('-', disk['name'].lower())}.raw"
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(name)
                raise ConversionError(f"a volume named {name!r} already exists in pool {pool.name()!r}")
            volumes.append(
                {
                    "disk": disk["name"],
                    "device": disk["path"],
                    "size_bytes": disk["size_bytes"],
                    "volume": name,
                    "target": domain_xml.target_dev(index),
                }
            )
        pool_path = _pool_path(pool)
    job.plan = {
        "domain": base,
        "uuid": str(uuid.uuid4()),
        "firmware": firmware,
        "memory_bytes": memory,
        "vcpus": vcpus,
        "sockets": sockets,
        "cores": cores,
        "threads": threads,
        "volumes": volumes,
        "nics": nics,
        "pool": hypervisor.storage_pool,
        "pool_path": pool_path,
        "console_log": str(console_dir(hypervisor) / f"{base}.console.log"),
        "nvram": f"{pool_path}/{base}_VARS.fd" if firmware == "uefi" else None,
    }
    job.bytes_total = need
    save_progress(job, "plan", "bytes_total")
    log(
        job,
        f"plan: domain {base}, {vcpus} vCPUs ({sockets}x{cores}x{threads}), {memory} bytes memory, "
        f"{firmware}, disks {[v['disk'] for v in volumes]}, NICs {[n['mac'] for n in nics]}",
    )


def _record_resource(job: ConversionJob, kind: str, value) -> None:
    resources = dict(job.resources)
    if kind == "volumes":
        resources.setdefault("volumes", [])
        if value not in resources["volumes"]:
            resources["volumes"].append(value)
    else:
        resources[kind] = value
    job.resources = resources
    job.save(update_fields=["resources", "updated"])


def _free_space(job: ConversionJob, endpoint: ssh.Endpoint, disk_name: str) -> usedblocks.FreeSpace:
    """What the disk's filesystems hold free (not to be sent); nothing when it cannot be asked."""
    facts = job.assessment.facts or {}
    disk = next((d for d in facts.get("disks") or [] if d.get("name") == disk_name), None)
    if disk is None:
        return usedblocks.FreeSpace([], [])
    try:
        with ssh.connect(endpoint) as session:
            free = usedblocks.free_space(session.run, disk, facts.get("filesystems") or [])
    except ssh.SSHError as exc:
        log(
            job,
            f"{disk_name}: could not ask which blocks are free ({exc}); non-zero blocks copied",
            LogLevel.WARNING,
        )
        return usedblocks.FreeSpace([], [])
    for note in free.notes:
        log(job, f"{disk_name}: {note}")
    return free


class _CurrentPrivilege:
    """The privilege the latest connection found (a reconnect asks again: sudo rules may change)."""

    def __init__(self, holder: list) -> None:
        self.holder = holder

    def _current(self) -> ssh.Privilege:
        return self.holder[0] or ssh.Privilege(ssh.PRIVILEGE_ROOT)

    def wrap(self, command: str) -> str:
        return self._current().wrap(command)

    def stdin(self) -> bytes | None:
        return self._current().stdin()


def _copy_broke(
    job: ConversionJob, progress: copy_mod.CopyProgress, exc: BaseException, retry: copy_mod.RetryPolicy
) -> None:
    """Before each backoff wait: a cancel requested meanwhile ends the job now, not after the window."""
    _check_cancel(job)
    log(
        job,
        f"{progress.disk}: connection broke at {progress.checkpoint} ({exc}); retrying with backoff "
        f"up to {retry.max_delay_s:g} s for {retry.window_s:g} s without progress, then resuming there",
        LogLevel.WARNING,
    )


def copy_stage(job: ConversionJob) -> None:
    """Copy every disk into a new sparse volume; resume after breaks; verify by read-back checksum."""
    plan = job.plan
    endpoint = job.machine.endpoint()
    retryable = (ssh.HostUnreachable, ssh.ConnectionLost, paramiko.SSHException, OSError, EOFError)
    retry = copy_retry_policy()

    privilege: list[ssh.Privilege | None] = [None]

    def open_ssh() -> paramiko.SSHClient:
        try:
            session = ssh.connect(endpoint)  # root, or sudo for a non-root login (raises if neither)
        except (ssh.HostUnreachable, ssh.ConnectionLost) as exc:
            raise copy_mod.ConnectionBroken(str(exc)) from exc
        privilege[0] = session.privilege
        return session.client

    done_before = 0
    with _libvirt(job) as conn:
        pool = _pool(conn, job)
        for entry in plan["volumes"]:
            _check_cancel(job)
            state = job.copy_state.get(entry["volume"], {})
            if state.get("verified"):
                done_before += entry["size_bytes"]
                continue
            _record_resource(job, "volumes", {"pool": plan["pool"], "name": entry["volume"]})
            try:
                vol = pool.storageVolLookupByName(entry["volume"])
            except libvirt.libvirtError:
                vol = pool.createXML(
                    f"<volume><name>{entry['volume']}</name>"
                    f"<capacity unit='bytes'>{entry['size_bytes']}</capacity>"
                    "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>",
                    0,
                )
            resume = None
            if state.get("checkpoint"):
                resume = copy_mod.CopyProgress(
                    disk=entry["disk"],
                    size_bytes=entry["size_bytes"],
                    checkpoint=state["checkpoint"],
                    position=state["checkpoint"],
                    segment_digests={int(k): v for k, v in state["digests"].items()},
                )
                log(job, f"{entry['disk']}: resuming at offset {state['checkpoint']}")
            last_save = [0.0]

            def on_progress(
                progress: copy_mod.CopyProgress,
                base: int = done_before,
                entry: dict = entry,
                last_save: list[float] = last_save,
            ) -> None:
                now = time.monotonic()
                # A chaos test holding the copy mid-disk needs this checkpoint saved before it holds.
                hold = 0 < progress.checkpoint < progress.size_bytes and faults.armed("copy")
                if (
                    not hold
                    and now - last_save[0] < PROGRESS_SAVE_INTERVAL_S
                    and progress.position < progress.size_bytes
                ):
                    return
                last_save[0] = now
                _check_cancel(job)
                job.bytes_done = base + progress.position
                job.percent = 100.0 * job.bytes_done / max(job.bytes_total, 1)
                job.wire_bytes = progress.wire_bytes + sum(
                    s.get("wire_bytes", 0) for k, s in job.copy_state.items() if k != entry["volume"]
                )
                job.rate_bytes_per_s = progress.rate_bytes_per_s
                job.copy_state = {
                    **job.copy_state,
                    entry["volume"]: {
                        "checkpoint": progress.checkpoint,
                        "digests": progress.segment_digests,
                        "wire_bytes": progress.wire_bytes,
                        "data_bytes": progress.data_bytes,
                        "resumes": progress.resumes,
                        "verified": False,
                    },
                }
                save_progress(job, "bytes_done", "percent", "wire_bytes", "rate_bytes_per_s", "copy_state")
                if hold:
                    _fault_point(job, "copy")

            free = _free_space(job, endpoint, entry["disk"])
            log(
                job,
                f"{entry['disk']}: copying {entry['device']} ({entry['size_bytes']} bytes) into "
                f"{entry['volume']}; {free.free_bytes} bytes free in its filesystems are not sent",
            )
            started = time.monotonic()
            try:
                progress = copy_mod.copy_disk(
                    open_ssh,
                    entry["device"],
                    conn,
                    vol,
                    entry["size_bytes"],
                    disk_name=entry["disk"],
                    resume=resume,
                    on_progress=on_progress,
                    retryable=retryable,
                    retry=retry,
                    free_ranges=free.ranges,
                    privilege=_CurrentPrivilege(privilege),
                    openssh=copy_mod.OpenSSHLogin(
                        endpoint.address, endpoint.port, endpoint.user, endpoint.private_key
                    ),
                    on_retry=lambda p, exc: _copy_broke(job, p, exc, retry),
                )
            except ssh.HostKeyMismatch as exc:
                raise ConversionError(f"host key changed, refusing to copy: {exc}") from exc
            seconds = time.monotonic() - started
            copy_mod.verify_volume(conn, vol, progress)
            job.copy_state = {
                **job.copy_state,
                entry["volume"]: {
                    "checkpoint": progress.checkpoint,
                    "digests": progress.segment_digests,
                    "wire_bytes": progress.wire_bytes,
                    "data_bytes": progress.data_bytes,
                    "resent_bytes": progress.resent_bytes,
                    "resumes": progress.resumes,
                    "verified": True,
                    "sha256_tree": copy_mod.overall_digest(progress),
                    "seconds": round(seconds, 3),
                },
            }
            done_before += entry["size_bytes"]
            job.bytes_done = done_before
            job.percent = 100.0 * done_before / max(job.bytes_total, 1)
            save_progress(job, "copy_state", "bytes_done", "percent")
            allocation = vol.info()[2]
            log(
                job,
                f"{entry['disk']}: copied in {seconds:.1f} s; {progress.wire_bytes} bytes over SSH, "
                f"{progress.data_bytes} data bytes, volume allocation {allocation} of {entry['size_bytes']}, "
                f"{progress.resumes} resumes; checksum verified ({copy_mod.overall_digest(progress)[:16]}); "
                f"{copy_mod.reader_description(progress)}",
            )


def _expected_spec(job: ConversionJob, pool: libvirt.virStoragePool) -> domain_xml.DomainSpec:
    plan = job.plan
    disks = tuple(
        domain_xml.DiskSpec(
            source_path=pool.storageVolLookupByName(v["volume"]).path(),
            target_dev=v["target"],
            size_bytes=v["size_bytes"],
            source_name=v["disk"],
        )
        for v in plan["volumes"]
    )
    return domain_xml.DomainSpec(
        name=plan["domain"],
        domain_type=job.hypervisor.domain_type,
        vcpus=plan["vcpus"],
        sockets=plan["sockets"],
        cores=plan["cores"],
        threads=plan["threads"],
        memory_bytes=plan["memory_bytes"],
        firmware=plan["firmware"],
        disks=disks,
        nics=tuple(domain_xml.NicSpec(mac=n["mac"], source_name=n["name"]) for n in plan["nics"]),
        network=job.hypervisor.network,
        console_log=plan["console_log"],
        nvram_path=plan["nvram"],
        description=f"P2V conversion #{job.pk} of machine {job.machine.name} "
        f"(assessment #{job.assessment_id})",
    )


def build_stage(job: ConversionJob) -> None:
    """Define the domain from the plan (the domain XML carries the job's UUID, never reusing a name)."""
    with _libvirt(job) as conn:
        spec = _expected_spec(job, _pool(conn, job))
        xml = domain_xml.render_domain_xml(spec)
        root = ET.fromstring(xml)  # noqa: S314 (XML we just rendered)
        ET.SubElement(root, "uuid").text = job.plan["uuid"]
        xml = ET.tostring(root, encoding="unicode")
        Path(spec.console_log).parent.mkdir(parents=True, exist_ok=True)
        _record_resource(job, "domain", {"name": spec.name, "uuid": job.plan["uuid"]})
        _record_resource(job, "console_log", spec.console_log)
        try:
            conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise ConversionError(
                f"libvirt refused the domain definition: {exc.get_error_message()}"
            ) from exc
    log(
        job,
        f"domain {spec.name} defined ({spec.domain_type}, {spec.firmware}, {len(spec.disks)} virtio disks, "
        f"{len(spec.nics)} virtio NICs)",
    )
    _fault_point(job, "build")


def adjust_stage(job: ConversionJob) -> None:
    """Host-side guest changes on the copied volumes (never on the source)."""
    with _libvirt(job) as conn:
        pool = _pool(conn, job)
        paths = [pool.storageVolLookupByName(v["volume"]).path() for v in job.plan["volumes"]]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConversionError(f"volumes {missing} are not visible from this worker; run it on the hypervisor")
    for note in adjust_mod.repair_filesystems(paths):
        log(job, f"filesystem check: {note}")
    _fault_point(job, "adjust")
    changes = adjust_mod.adjust_guest(
        paths, job.assessment.facts or {}, job.plan["nics"], note=lambda text, level: log(job, text, level)
    )
    job.changes = [
        {"path": c.path, "summary": c.summary, "after": c.after, "applied": c.applied, "reason": c.reason}
        for c in changes
    ]
    save_progress(job, "changes")
    if not changes:
        log(job, "guest needs no changes")
    for change in changes:
        if change.applied:  # what was not applied was logged as a warning by adjust_guest's note
            log(job, f"changed {change.path}: {change.summary}")


def expected_hardware(job: ConversionJob) -> verify.ExpectedHardware:
    plan = job.plan
    return verify.ExpectedHardware(
        vcpus=plan["vcpus"],
        memory_bytes=plan["memory_bytes"],
        firmware=plan["firmware"],
        disk_sizes=tuple(v["size_bytes"] for v in plan["volumes"]),
        macs=tuple(n["mac"] for n in plan["nics"]),
        nic_names={n["mac"]: n["name"] for n in plan["nics"]},
    )


VERIFY_SETTLE_TIMEOUT_S = 180


def _verify_domain_xml(xml: str, bridge: str) -> str:
    """The converted domain as a transient twin for the proof: its own name, no UUID (libvirt makes
    one), and every NIC, MAC and model unchanged, on the isolated bridge."""
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own XML)
    root.find("name").text = root.findtext("name") + "-verify"
    for element in root.findall("uuid"):
        root.remove(element)
    devices = root.find("devices")
    for interface in devices.findall("interface"):
        mac, model = interface.find("mac"), interface.find("model")
        interface.clear()
        interface.set("type", "bridge")
        interface.append(mac)
        ET.SubElement(interface, "source", bridge=bridge)
        if model is not None:
            interface.append(model)
    return ET.tostring(root, encoding="unicode")


def _isolation_prefix(job: ConversionJob) -> str:
    """Unique per hypervisor and job (two portals, or test sessions, may both have a job #1) and
    short enough for Linux interface names."""
    digest = hashlib.sha256(f"{job.hypervisor.name_prefix}{job.hypervisor_id}-{job.pk}".encode()).hexdigest()
    return f"p2v{digest[:8]}"


def verify_stage(job: ConversionJob) -> None:
    """Boot the VM on an isolated network and prove, from inside it, that it is the source.

    A guest with sshd is logged into with the machine's own credential and pinned host key, probed
    like the assessment, and diffed against it (the verdict is that diff); the stand-in's console
    report is compared with the plan's hardware. Any difference fails the stage, naming the fields.
    """
    console_log = Path(job.plan["console_log"])
    console_log.unlink(missing_ok=True)
    source_facts = job.assessment.facts or {}
    reach = isolation.reachable_address(source_facts)
    prefix = _isolation_prefix(job)
    _record_resource(job, "isolation", prefix)
    endpoint = None
    if reach is not None:
        nic_name, vm_address, probe_address = reach
        network = isolation.create(prefix, vm_address, probe_address)
        endpoint = dataclasses.replace(job.machine.endpoint(), address=vm_address, netns=network.netns)
        log(
            job,
            f"isolated network {network.bridge}: the VM keeps {vm_address} on {nic_name}, "
            f"probed from {probe_address} in namespace {network.netns}",
        )
    else:
        network = isolation.create(prefix, None, None)  # the VM still must not meet the source's LAN
        log(
            job,
            "the assessment has no static IPv4 address to reach the VM at: only its console can prove it",
            LogLevel.WARNING,
        )
    with _libvirt(job) as conn:
        domain = conn.lookupByName(job.plan["domain"])
        paths = [_pool(conn, job).storageVolLookupByName(v["volume"]).path() for v in job.plan["volumes"]]
        relaxed = _relax_start_timeouts(job, paths)
        bridge = network.bridge
        twin_xml = _verify_domain_xml(domain.XMLDesc(0), bridge)
        twin_name = job.plan["domain"] + "-verify"
        _record_resource(job, "verify_domain", twin_name)
        try:
            twin = conn.createXML(twin_xml, libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            raise ConversionError(
                f"libvirt refused the verification domain: {exc.get_error_message()}"
            ) from exc
        last_check = [0.0]

        def should_stop() -> bool:
            lease = _LEASES.get(job.pk)
            if lease is not None and lease.lost:
                return True  # another worker took the job over: this boot is not ours any more
            try:
                _fault_point(job, "verify")
            except (JobCancelled, lease_mod.LeaseLost):
                return True
            if time.monotonic() - last_check[0] < 1.0:
                return False
            last_check[0] = time.monotonic()
            return ConversionJob.objects.filter(pk=job.pk, cancel_requested=True).exists()

        def try_login():
            try:
                return ssh.connect(endpoint, connect_timeout_s=10)
            except (ssh.HostUnreachable, ssh.ConnectionLost):
                return None  # not up yet

        try:
            result = verify.boot_and_wait(
                _PausedDomain(twin),
                console_log,
                job.hypervisor.boot_timeout_s,
                should_stop,
                probe=try_login if endpoint is not None else None,
            )
            if result.session is not None:
                with result.session as session:
                    guest_facts = _guest_facts(job, session)
        except verify.VerifyError as exc:
            if "cancelled" in str(exc):
                raise JobCancelled(str(exc)) from exc
            raise
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                verify.stop_domain(twin)
            lease = _LEASES.get(job.pk)
            # A run that lost the job leaves the network (same names) to the run that took it over.
            problems = isolation.remove(prefix) if lease is None or not lease.lost else []
            if problems:
                log(job, "isolated network cleanup: " + "; ".join(problems), LogLevel.WARNING)
            if relaxed and (lease is None or not lease.lost):
                _restore_start_timeouts(job, paths, failing=sys.exc_info()[0] is not None)
    log(job, f"proof of life after {result.seconds_to_proof:.1f} s")
    job.verification = {
        "seconds_to_proof": round(result.seconds_to_proof, 2),
        "report": result.report,
        "expected": dataclasses.asdict(expected_hardware(job)),
    }
    if result.session is not None:
        comparison = verify.compare_facts(source_facts, guest_facts, job.plan)
        differences = comparison.differences
        not_compared = "; ".join(f"{n.field} ({n.reason})" for n in comparison.not_compared)
        job.verification.update(
            {
                "method": "ssh",
                "compared": True,
                "matches": comparison.matches,
                "differences": [d.as_dict() for d in differences],
                "compared_fields": comparison.compared,
                "not_compared": [n.as_dict() for n in comparison.not_compared],
                "guest": {k: guest_facts.get(k) for k in VERIFIED_FIELDS},
            }
        )
        save_progress(job, "verification")
        if differences:
            raise verify.VerifyError(
                "the VM does not match the assessment: " + "; ".join(d.message() for d in differences)
            )
        if not comparison.matches:
            raise verify.VerifyError(
                "the VM could not be compared with the assessment on the hardware the conversion sets: "
                f"not compared: {not_compared}"
            )
        if comparison.not_compared:
            log(job, f"not compared: {not_compared}", LogLevel.WARNING)
        log(
            job,
            f"logged into the VM as {endpoint.user} (host key {job.machine.host_key_fingerprint}); "
            f"its own probes match the assessment on {', '.join(comparison.compared)}: "
            f"{(guest_facts.get('cpu') or {}).get('vcpus')} vCPUs, {guest_facts.get('memory_bytes')} bytes, "
            f"{len(guest_facts.get('disks') or [])} disks, {len(guest_facts.get('filesystems') or [])} "
            f"filesystems, NICs {[(n['name'], n['mac']) for n in guest_facts.get('nics') or []]}, "
            f"{guest_facts.get('hostname')}, {(guest_facts.get('kernel') or {}).get('release')}, "
            f"{(guest_facts.get('packages') or {}).get('count')} packages, "
            f"{len(guest_facts.get('services') or [])} running services",
        )
        return
    if result.report is None:
        job.verification.update({"compared": False, "matches": False})
        save_progress(job, "verification")
        raise verify.VerifyError(
            "the guest reached a login prompt but could not be compared (no SSH login on the isolated "
            "network, no console report): nothing proves it matches the assessment"
        )
    problems = verify.compare_hardware(result.report, expected_hardware(job))
    job.verification.update(
        {"method": "console", "compared": True, "matches": not problems, "problems": problems}
    )
    save_progress(job, "verification")
    if problems:
        raise verify.VerifyError("the VM does not match the assessment: " + "; ".join(problems))
    log(
        job,
        f"guest reports {result.report.get('vcpus')} vCPUs, disks "
        f"{[d.get('size_bytes') for d in result.report.get('disks', [])]}, NICs "
        f"{[n.get('mac') for n in result.report.get('nics', [])]}, {result.report.get('firmware')}: "
        "matches the assessment",
    )


VERIFIED_FIELDS = (
    "hostname",
    "cpu",
    "memory_bytes",
    "memory_total_bytes",
    "memory_source",
    "disks",
    "filesystems",
    "nics",
    "firmware",
    "os",
    "kernel",
    "services",
    "default_route",
)


def _relax_start_timeouts(job: ConversionJob, paths: list[str]) -> bool:
    """Stretch systemd's start timeouts in the copy for the proof boot (verify_boot.py says why);
    whether the guest was changed (and must be restored)."""
    try:
        note = verify_boot.relax_start_timeouts(
            paths, job.assessment.facts or {}, job.hypervisor.boot_timeout_s
        )
    except adjust_mod.AdjustError as exc:
        log(job, f"start timeouts left as they are: {exc}", LogLevel.WARNING)
        return False
    log(job, note)
    return note.startswith("systemd start timeouts set")


def _restore_start_timeouts(job: ConversionJob, paths: list[str], failing: bool) -> None:
    """The guest's system.conf as it was, after the twin stopped (perhaps forced: e2fsck first).
    Not restored is an error of the stage unless the stage is failing anyway (then a warning: the
    rollback removes the volumes)."""
    try:
        adjust_mod.repair_filesystems(paths)
        note = verify_boot.restore_start_timeouts(paths, job.assessment.facts or {})
    except adjust_mod.AdjustError as exc:
        if failing:
            log(job, f"could not restore the guest's start timeouts: {exc}", LogLevel.WARNING)
            return
        raise ConversionError(
            f"could not restore the guest's start timeouts after the proof boot: {exc}"
        ) from exc
    if note:
        log(job, note)


class _PausedDomain:
    """boot_and_wait starts its domain; the twin was created paused, so 'start' means resume."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self._domain = domain

    def create(self) -> None:
        self._domain.resume()

    def isActive(self) -> bool:
        try:
            return bool(self._domain.isActive())
        except libvirt.libvirtError:
            return False  # a transient domain that powered off no longer exists


def _guest_facts(job: ConversionJob, session: ssh.SSHSession) -> dict:
    """Let the guest finish starting its services, then run the assessment's own probes."""
    settled = session.run(
        f"timeout {VERIFY_SETTLE_TIMEOUT_S} systemctl is-system-running --wait 2>/dev/null || true",
        timeout_s=VERIFY_SETTLE_TIMEOUT_S + 30,
    )
    log(job, f"logged into the VM over SSH; systemd says: {settled.stdout.strip() or 'n/a'}")
    from p2v import facts as facts_mod

    return facts_mod.collect_facts(session.run, session.run_many)


STAGES: dict[JobStage, Callable[[ConversionJob], None]] = {
    JobStage.PLAN: plan_stage,
    JobStage.COPY: copy_stage,
    JobStage.BUILD: build_stage,
    JobStage.ADJUST: adjust_stage,
    JobStage.VERIFY: verify_stage,
}


# --- rollback ---------------------------------------------------------------------------------------


def rollback(job: ConversionJob) -> list[str]:
    """Remove what this job created (recorded in job.resources); return problems, never raise."""
    resources = job.resources or {}
    problems: list[str] = []
    if not resources:
        return problems
    try:
        with _libvirt(job) as conn:
            if resources.get("verify_domain"):
                problems += _remove_verify_domain(job, conn, resources["verify_domain"])
            domain_info = resources.get("domain")
            if domain_info:
                problems += _remove_domain(job, conn, domain_info)
            if resources.get("volumes"):
                for note in release_volumes(job):
                    log(job, f"rollback: {note}")
            for vol in resources.get("volumes", []):
                problems += _remove_volume(job, conn, vol)
    except ConversionError as exc:
        problems.append(str(exc))
    if resources.get("isolation"):
        problems += isolation.remove(resources["isolation"])
    console_log = resources.get("console_log")
    if console_log:
        Path(console_log).unlink(missing_ok=True)
    job.resources = {}
    job.save(update_fields=["resources", "updated"])
    return problems


def _remove_domain(job: ConversionJob, conn: libvirt.virConnect, info: dict) -> list[str]:
    try:
        domain = conn.lookupByName(info["name"])
    except libvirt.libvirtError:
        return []  # never defined
    if domain.UUIDString() != info["uuid"]:
        return [f"domain {info['name']} has another UUID ({domain.UUIDString()}): not ours, left alone"]
    try:
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as exc:
        return [f"could not remove domain {info['name']}: {exc.get_error_message()}"]
    log(job, f"rollback: domain {info['name']} undefined (with NVRAM)")
    return []


def _remove_verify_domain(
    job: ConversionJob, conn: libvirt.virConnect, name: str, why: str = "rollback"
) -> list[str]:
    """The transient twin the verify stage booted: destroying it removes it. It may power off by
    itself (and, being transient, vanish) at any moment, even between two calls here: a domain
    that is gone needs no clean-up."""
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return []
    try:
        if domain.isPersistent():
            return [f"domain {name} is persistent: not the verification twin, left alone"]
        if domain.isActive():
            domain.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return []  # ended by itself meanwhile
        return [f"could not stop the verification domain {name}: {exc.get_error_message()}"]
    log(job, f"{why}: verification domain {name} stopped")
    return []


def _remove_volume(job: ConversionJob, conn: libvirt.virConnect, info: dict) -> list[str]:
    try:
        pool = conn.storagePoolLookupByName(info["pool"])
        vol = pool.storageVolLookupByName(info["name"])
    except libvirt.libvirtError:
        return []  # never created
    try:
        vol.delete(0)
    except libvirt.libvirtError as exc:
        return [f"could not delete volume {info['name']}: {exc.get_error_message()}"]
    log(job, f"rollback: volume {info['name']} deleted")
    return []


def remove_converted_vm(job: ConversionJob) -> list[str]:
    """Delete a finished job's VM and volumes (used by tests and by an admin discarding a conversion)."""
    return rollback(job)


# --- what the target offers (used by the assessment's compatibility rules) --------------------------


def target_profile(machine, profile):
    """Refine the assessment's TargetProfile with the default hypervisor: its memory cap and the
    storage pool's real free space. Unchanged when no hypervisor is registered or it cannot be reached."""
    hypervisor = Hypervisor.objects.order_by("id").first()
    if hypervisor is None:
        return profile
    memory_cap = min(filter(None, [profile.memory_cap_bytes, hypervisor.memory_cap_bytes]))
    pool_free = profile.pool_free_bytes
    try:
        conn = libvirt.open(hypervisor.uri)
        try:
            pool = conn.storagePoolLookupByName(hypervisor.storage_pool)
            pool_free = pool.info()[3]
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        logger.warning("p2v: hypervisor %s not reachable for the target profile: %s", hypervisor.name, exc)
    return dataclasses.replace(profile, memory_cap_bytes=memory_cap, pool_free_bytes=pool_free)
