"""End to end under a real Celery worker and real libvirtd: assess the stand-in physical machine over
SSH, POST convert, and watch the job copy the disk, build the VM, adjust the guest and boot it; the
guest's own hardware report (from its serial console) must match the assessment. Failures roll back.

Domains are `type='qemu'` (KVM is not usable here, PLATFORM-NOTES): each boot takes 5-15 s.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v.choices import AssessmentStatus
from p2v.conversion.choices import JobState
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.conversion.services import remove_converted_vm
from p2v.models import Machine
from p2v.services import queue_assessment
from tests.p2v_conversion.conftest import MiB, leftovers
from tests.services import wait_until

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.standin,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]
JOB_TIMEOUT_S = 200


@pytest.fixture
def hypervisor(p2v_pool, p2v_prefix, tmp_path) -> Hypervisor:
    return Hypervisor.objects.create(
        name="local",
        uri="qemu:///system",
        storage_pool=p2v_pool.name(),
        network="user",
        memory_cap_bytes=256 * MiB,
        name_prefix=p2v_prefix[:16],
        console_dir=str(tmp_path / "console"),
        boot_timeout_s=150,
    )


@pytest.fixture
def admin_client() -> APIClient:
    admin = get_user_model().objects.create_user("p2v-admin", password="x", is_staff=True)
    client = APIClient()
    client.force_authenticate(admin)
    return client


def assessed_machine(standin, name: str) -> Machine:
    """Register the stand-in and assess it for real (the assessment task on the worker)."""
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
            Machine.objects.get(pk=machine.pk).assessments.get(pk=assessment.pk).status
            in (AssessmentStatus.SUCCEEDED, AssessmentStatus.FAILED)
        ),
        timeout_s=60,
        what="assessment",
    )
    assessment.refresh_from_db()
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    return machine


def convert(admin_client, machine: Machine) -> ConversionJob:
    """POST convert (a manual conversion event, which starts a job) and wait for the job to finish."""
    response = admin_client.post(
        f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "test"}, format="json"
    )
    assert response.status_code == 201, response.content
    event_id = response.json()["id"]
    jobs = admin_client.get("/api/p2v/jobs/", {"event": event_id}).json()
    jobs = jobs.get("results", jobs)
    assert len(jobs) == 1, jobs
    assert response.json()["job"]["id"] == jobs[0]["id"]  # convert/ answers with the job it started
    return wait_until(
        lambda: ConversionJob.objects.filter(
            pk=jobs[0]["id"], state__in=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
        ).first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=0.5,
        what=f"conversion job {jobs[0]['id']} to finish",
    )


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_converted_vm_boots_from_the_copied_disk_and_matches_the_assessment(
    firmware, request, celery_worker, hypervisor, admin_client, libvirt_conn, p2v_pool, p2v_prefix
):
    standin = request.getfixturevalue(f"conversion_standin_{firmware}")
    machine = assessed_machine(standin, f"standin-{firmware}")
    facts = machine.latest_assessment.facts

    job = convert(admin_client, machine)
    logs = [line.message for line in job.logs.all()]
    assert job.state == JobState.SUCCEEDED, f"{job.error}\n" + "\n".join(logs)
    try:
        report = job.verification["report"]
        # The guest's own view, compared with the assessment (the job did this too; check it independently).
        assert report["vcpus"] == facts["cpu"]["vcpus"]
        assert [d["size_bytes"] for d in report["disks"]] == [d["size_bytes"] for d in facts["disks"]]
        assert {n["mac"] for n in report["nics"]} == {n["mac"] for n in facts["nics"]}
        assert report["firmware"] == facts["firmware"] == firmware
        assert report["memory_bytes"] <= 256 * MiB  # capped by the hypervisor's policy
        # It booted from the copied volume: the root it mounted carries the stand-in image's marker.
        assert report["root_mounted"] is True
        assert report["marker"] == standin.image.marker
        # Adjust rewrote fstab to UUIDs and pinned the NIC name.
        assert report["fstab_uuid_entries"] == 2
        assert report["fstab_device_entries"] == 0
        assert {n["name"] for n in report["nics"]} == {n["name"] for n in facts["nics"]}
        assert [c["path"] for c in job.changes] == ["/etc/fstab", "/etc/udev/rules.d/70-p2v-net-names.rules"]
        # Progress and stages as the API shows them.
        detail = admin_client.get(f"/api/p2v/jobs/{job.pk}/").json()
        assert [s["status"] for s in detail["stages"]] == ["done"] * 5
        assert detail["percent"] == 100.0
        assert detail["wire_bytes"] < facts["disks"][0]["size_bytes"] / 4  # only used data crossed
        log_lines = admin_client.get(f"/api/p2v/jobs/{job.pk}/logs/").json()
        assert any("matches the assessment" in line["message"] for line in log_lines)
        domain = libvirt_conn.lookupByName(job.plan["domain"])
        assert not domain.isActive()  # verified, then shut off
    finally:
        assert remove_converted_vm(job) == []
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []


def test_libvirt_error_at_define_rolls_back_everything(
    celery_worker, hypervisor, admin_client, libvirt_conn, p2v_pool, p2v_prefix, conversion_standin_bios
):
    machine = assessed_machine(conversion_standin_bios, "standin-define-fails")
    # A hypervisor whose libvirt cannot run this domain type: libvirt itself refuses the definition.
    Hypervisor.objects.filter(pk=hypervisor.pk).update(domain_type="xen")
    job = convert(admin_client, machine)
    assert job.state == JobState.FAILED
    assert job.stage == "build"
    assert "libvirt refused the domain definition" in job.error
    messages = [line.message for line in job.logs.all()]
    assert any(m.startswith("rollback: volume") for m in messages), messages
    assert job.resources == {}
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []


def test_source_gone_during_copy_fails_with_reason_and_leaves_nothing(
    celery_worker, hypervisor, admin_client, libvirt_conn, p2v_pool, p2v_prefix, conversion_standin_bios
):
    machine = assessed_machine(conversion_standin_bios, "standin-vanishes")
    conversion_standin_bios.stop_sshd(kill_sessions=True)  # the machine dies after its assessment
    try:
        job = convert(admin_client, machine)
    finally:
        conversion_standin_bios.start_sshd()
    assert job.state == JobState.FAILED
    assert job.stage == "copy"
    assert "gave up after" in job.error
    job.event.refresh_from_db()
    assert job.event.status == "failed"  # the event no longer says "started" once its job ended
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []


def test_jobs_and_hypervisors_are_for_admins_only(db):
    api = APIClient()
    api.force_authenticate(get_user_model().objects.create_user("tenant-user", password="x"))
    assert api.get("/api/p2v/jobs/").status_code == 403
    assert (
        api.post("/api/p2v/hypervisors/", {"name": "x", "storage_pool": "y"}, format="json").status_code
        == 403
    )


def test_cancel_during_verify_rolls_back_the_booting_vm(
    celery_worker, hypervisor, admin_client, libvirt_conn, p2v_pool, p2v_prefix, conversion_standin_bios
):
    machine = assessed_machine(conversion_standin_bios, "standin-cancelled")
    response = admin_client.post(
        f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "test"}, format="json"
    )
    assert response.status_code == 201, response.content
    job = wait_until(
        lambda: ConversionJob.objects.filter(event_id=response.json()["id"], stage="verify").first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=0.2,
        what="the job to reach verify",
    )
    cancelled = admin_client.post(f"/api/p2v/jobs/{job.pk}/cancel/")
    assert cancelled.status_code == 202, cancelled.content
    job = wait_until(
        lambda: ConversionJob.objects.filter(
            pk=job.pk, state__in=[JobState.CANCELLED, JobState.SUCCEEDED]
        ).first(),
        timeout_s=60,
        what="the cancelled job to finish",
    )
    assert job.state == JobState.CANCELLED
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []
    assert admin_client.post(f"/api/p2v/jobs/{job.pk}/cancel/").status_code == 409  # already finished
