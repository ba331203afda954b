"""Kill -9 the Celery worker running a P2V conversion, in each stage, and watch the job survive.

Real workers (separate processes on the hypervisor's queue), real Celery beat running the lease
watchdog, real libvirtd, and a real conversion of the stand-in machine. Each stage is held at a
fault-injection point (p2v/conversion/faults.py) so the kill lands mid-stage at a known moment; the
worker holding the job's lease is found from the job's row (lease owner and pid) and killed by PID.

- One job is killed once in every stage (copy, build, adjust, verify): each time another worker
  resumes it at its stage, and it ends `succeeded` with the verification passed (the VM boots from
  the resumed copy and matches the assessment), then nothing is left behind.
- One job is killed in verify when no resume is allowed: it ends `failed` with the reason, and the
  rollback removes the twin VM, its isolated network, the domain and the volumes.
"""

from __future__ import annotations

import re
import subprocess
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from p2v.choices import AssessmentStatus, ConversionEventKind, ConversionEventStatus
from p2v.conversion import isolation, services, watchdog
from p2v.conversion.choices import FINISHED_STATES, JobState
from p2v.conversion.models import ConversionJob, Hypervisor, JobLog
from p2v.models import ConversionEvent, Machine
from p2v.services import queue_assessment
from tests.chaos import p2v_workers
from tests.chaos.p2v_workers import LEASE_S, Crew
from tests.p2v_conversion.conftest import MiB, leftovers
from tests.services import wait_until

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.slow,
    pytest.mark.libvirt,
    pytest.mark.standin,
    pytest.mark.django_db(transaction=True),
]
# The crew's fixtures, used by name below.
p2v_crew = p2v_workers.p2v_crew
chaos_standin = p2v_workers.chaos_standin
libvirt_conn = p2v_workers.libvirt_conn
p2v_pool = p2v_workers.p2v_pool
p2v_prefix = p2v_workers.p2v_prefix
STAGE_TIMEOUT_S = 240  # from the previous event to a stage's hold, under a busy machine
RESUME_TIMEOUT_S = 120  # lease (8 s) + watchdog period (2 s) + a worker taking the job, with room
JOB_TIMEOUT_S = 300


@pytest.fixture
def hypervisor(p2v_crew, p2v_pool, p2v_prefix, tmp_path) -> Hypervisor:
    with override_settings(P2V_HYPERVISOR_QUEUES=True):  # this process queues to the crew's queue
        yield Hypervisor.objects.create(
            name=p2v_crew.hypervisor_name,
            uri="qemu:///system",
            storage_pool=p2v_pool.name(),
            network="user",
            memory_cap_bytes=256 * MiB,
            name_prefix=p2v_prefix[:16],
            console_dir=str(tmp_path / "console"),
            boot_timeout_s=150,
        )


@pytest.fixture
def watchdog_beat(p2v_crew: Crew):
    p2v_crew.start_beat()
    try:
        yield p2v_crew.beat
    finally:
        p2v_crew.stop_beat()


def start_job(standin, hypervisor: Hypervisor, name: str) -> ConversionJob:
    """Assess the stand-in for real (on the crew), then start its conversion."""
    endpoint = standin.endpoint()
    machine = Machine(
        name=name,
        address=endpoint["address"],
        ssh_port=endpoint["port"],
        ssh_user=endpoint["user"],
        host_key_fingerprint=endpoint["host_key_fingerprint"],
    )
    machine.set_private_key(endpoint["private_key"])
    machine.save()
    assessment = queue_assessment(machine)
    wait_until(
        lambda: (
            type(assessment).objects.get(pk=assessment.pk).status
            in (AssessmentStatus.SUCCEEDED, AssessmentStatus.FAILED)
        ),
        timeout_s=120,
        what="the assessment",
    )
    assessment.refresh_from_db()
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    event = ConversionEvent.objects.create(
        machine=machine,
        kind=ConversionEventKind.MANUAL,
        status=ConversionEventStatus.STARTED,
        raised_by="chaos test",
        assessment=assessment,
    )
    return services.start_conversion(event, hypervisor=hypervisor)


def messages(job: ConversionJob) -> list[str]:
    return list(JobLog.objects.filter(job=job).order_by("pk").values_list("message", flat=True))


def wait_for_hold(job: ConversionJob, point: str) -> None:
    wait_until(
        lambda: JobLog.objects.filter(
            job=job, message__startswith=f"fault injection: holding in {point}"
        ).exists(),
        timeout_s=STAGE_TIMEOUT_S,
        interval_s=0.2,
        what=f"job {job.pk} to hold in {point}",
    )


def kill_the_holder(crew: Crew, job: ConversionJob, point: str) -> tuple[str, int]:
    """Kill -9 the worker holding the job's lease (the job holds at `point`); (its name, pid)."""
    row = ConversionJob.objects.get(pk=job.pk)
    assert (row.state, row.stage) == (JobState.RUNNING, point)
    worker = crew.worker_by_pid(row.lease_pid)
    assert worker is not None, f"lease held by pid {row.lease_pid}, none of the crew's workers"
    assert worker.alive()
    assert row.lease_owner == worker.name
    worker.kill9()
    return worker.name, worker.pid


def wait_for_resume(job: ConversionJob, name: str, pid: int, stage: str) -> str:
    """The log line of the run that resumed the job after `name` was lost; the resuming worker."""
    pattern = re.compile(rf"^worker {re.escape(name)} \(pid {pid}\) lost during {stage}; resumed on (\S+) ")
    line = wait_until(
        lambda: next((m for m in messages(job) if pattern.match(m)), None),
        timeout_s=RESUME_TIMEOUT_S,
        interval_s=0.2,
        what=f"job {job.pk} to resume after its worker was killed in {stage}",
    )
    return pattern.match(line).group(1)


def wait_finished(job: ConversionJob) -> ConversionJob:
    return wait_until(
        lambda: ConversionJob.objects.filter(pk=job.pk, state__in=FINISHED_STATES).first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=0.5,
        what=f"job {job.pk} to finish",
    )


def netns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def loop_devices_over(path: str) -> str:
    listed = subprocess.run(["losetup", "--list", "--noheadings"], capture_output=True, text=True, check=True)
    return "\n".join(line for line in listed.stdout.splitlines() if path in line)


def test_a_job_killed_in_every_stage_resumes_each_time_and_ends_verified(
    p2v_crew, watchdog_beat, hypervisor, chaos_standin, libvirt_conn, p2v_pool, p2v_prefix
):
    for point in ("copy", "build", "adjust", "verify"):
        p2v_crew.hold(point)
    job = start_job(chaos_standin, hypervisor, "chaos-every-stage")
    killed = {}
    for point in ("copy", "build", "adjust", "verify"):
        wait_for_hold(job, point)
        if point == "verify":  # the twin VM and its isolated network are up: the lost run leaves them
            # The twin's state is not asserted: it is transient, and the stand-in powers off (so
            # the twin vanishes) once it has printed its report, which a busy machine reaches first.
            row = ConversionJob.objects.get(pk=job.pk)
            assert isolation.names_for(services._isolation_prefix(row))["netns"] in netns_names()
        name, pid = kill_the_holder(p2v_crew, job, point)
        p2v_crew.release(point)
        p2v_crew.start_worker(wait=False)  # as a supervisor would; the job does not wait for it
        resumed_on = wait_for_resume(job, name, pid, point)
        assert resumed_on != name
        assert any(w.name == resumed_on and w.alive() for w in p2v_crew.workers)
        killed[point] = name

    job = wait_finished(job)
    log = messages(job)
    assert job.state == JobState.SUCCEEDED, f"{job.error}\n" + "\n".join(log)
    assert job.resumes == 4
    assert job.lease_token == ""
    # The copy resumed at its last checkpoint (mid-disk), and the volume it finished passed the
    # read-back checksum against the source's digests (a wrong byte fails the stage).
    resume_at = [int(m.split()[-1]) for m in log if re.match(r"^\S+: resuming at offset \d+$", m)]
    assert len(resume_at) == 1
    assert 0 < resume_at[0] < job.bytes_total
    assert all(state["verified"] for state in job.copy_state.values())
    # The lost verification's network was removed before the new one came up. Its twin was gone
    # too: stopped by the clean-up, or already ended on its own (the stand-in powers off once it
    # has printed its report, which on a busy machine can come before the lease expires). The new
    # twin has the same name, so it could not have booted while the old one ran.
    assert any(m.startswith("lost run clean-up: isolated network") for m in log), log
    twin_stopped = any(m.startswith("lost run clean-up: verification domain") for m in log)
    print(f"\nlost twin stopped by the clean-up: {twin_stopped} (else it had powered off by itself)")
    # The VM proves it is the stand-in: booted from the copied root, matching the assessment.
    facts = job.assessment.facts
    report = job.verification["report"]
    assert job.verification["matches"] is True
    assert report["marker"] == chaos_standin.image.marker
    assert report["root_mounted"] is True
    assert [d["size_bytes"] for d in report["disks"]] == [d["size_bytes"] for d in facts["disks"]]
    assert {n["mac"] for n in report["nics"]} == {n["mac"] for n in facts["nics"]}
    assert report["fstab_uuid_entries"] == 2  # adjust's edits, made once, by the resumed run
    assert [c["path"] for c in job.changes] == ["/etc/fstab", "/etc/udev/rules.d/70-p2v-net-names.rules"]
    job.event.refresh_from_db()
    assert job.event.status == ConversionEventStatus.SUCCEEDED
    # Nothing stuck: no job waits or runs; nothing duplicated: one finish line.
    assert not ConversionJob.objects.exclude(state__in=FINISHED_STATES).exists()
    assert log.count("conversion finished: the VM boots and matches the assessment") == 1
    assert isolation.names_for(services._isolation_prefix(job))["netns"] not in netns_names()
    assert loop_devices_over(job.plan["pool_path"]) == ""

    assert services.remove_converted_vm(job) == []
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []


def test_a_job_whose_worker_dies_with_no_resume_left_fails_and_rolls_back_everything(
    p2v_crew, hypervisor, chaos_standin, libvirt_conn, p2v_pool, p2v_prefix
):
    p2v_crew.hold("verify")
    job = start_job(chaos_standin, hypervisor, "chaos-gives-up")
    wait_for_hold(job, "verify")
    name, pid = kill_the_holder(p2v_crew, job, "verify")
    p2v_crew.release("verify")
    row = ConversionJob.objects.get(pk=job.pk)
    prefix = services._isolation_prefix(row)
    assert isolation.names_for(prefix)["netns"] in netns_names()  # what the dead run left up
    # The twin is transient: running, or gone by itself once the stand-in has printed its report
    # (a busy machine gets there first); the clean-up must cope with both, even mid-call.
    assert row.lease_expires <= timezone.now() + timedelta(seconds=LEASE_S)

    # No beat in this test: the watchdog is run here, once the lease has run out, as beat would.
    wait_until(
        lambda: ConversionJob.objects.get(pk=job.pk).lease_expires <= timezone.now(),
        timeout_s=RESUME_TIMEOUT_S,
        what="the dead worker's lease to expire",
    )
    with override_settings(P2V_JOB_MAX_RESUMES=0):
        assert watchdog.check_leases() == {"resumed": [], "requeued": [], "failed": [job.pk]}

    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.error.startswith(f"worker {name} (pid {pid}) lost during verify")
    assert job.error.endswith("the most P2V_JOB_MAX_RESUMES allows (0): rolled back")  # no problems
    assert "does not answer pings" in job.error
    assert job.resources == {}
    job.event.refresh_from_db()
    assert job.event.status == ConversionEventStatus.FAILED
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []
    assert isolation.names_for(prefix)["netns"] not in netns_names()
    assert loop_devices_over(row.plan["pool_path"]) == ""
    assert not ConversionJob.objects.exclude(state__in=FINISHED_STATES).exists()
