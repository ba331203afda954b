"""Steps shared by the real-guest variant tests: boot a variant, assess it, convert it through the API.

Same path as tests/p2v_real/test_real_guest.py (queue_assessment, POST convert/, a real Celery
worker and libvirtd); kept here so each variant's test reads as what it proves.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v.conversion.choices import JobState
from p2v.conversion.models import ConversionJob
from tests.environment import need, need_binary, need_root
from tests.p2v_real.test_real_guest import JOB_TIMEOUT_S, assess  # noqa: F401 (re-exported)
from tests.services import wait_until


def booted_guest(start: Callable[[], object]) -> Iterator:
    """A variant guest for one module: booted, settled, closed (its QEMU, tap and files) afterwards."""
    need_root()
    need_binary("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "mcopy", "syslinux", "sfdisk", "debugfs")
    need(shutil.which("ssh-keygen") is not None, "needs ssh-keygen (openssh-client)")
    guest = start()
    try:
        guest.wait_settled()
        yield guest
    finally:
        guest.close()


def convert(machine) -> ConversionJob:
    """POST convert/ as an admin and wait for the job to end (any final state)."""
    admin = APIClient()
    admin.force_authenticate(get_user_model().objects.create_user("p2v-admin", password="x", is_staff=True))
    response = admin.post(f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "test"}, format="json")
    assert response.status_code == 201, response.content
    job_id = response.json()["job"]["id"]
    return wait_until(
        lambda: ConversionJob.objects.filter(
            pk=job_id, state__in=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
        ).first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=1,
        what="the conversion of the real guest",
    )


def job_logs(job: ConversionJob) -> str:
    return "\n".join(line.message for line in job.logs.all())


def assert_verified_with_nic_names_kept(job: ConversionJob, facts: dict) -> dict:
    """The job is green: the VM's own probes match the assessment, each NIC under its old name."""
    assert job.state == JobState.SUCCEEDED, f"{job.error}\n{job_logs(job)}"
    result = job.verification
    assert (result["method"], result["compared"], result["matches"], result["differences"]) == (
        "ssh",
        True,
        True,
        [],
    )
    guest = result["guest"]
    assert {(n["name"], n["mac"]) for n in guest["nics"]} == {(n["name"], n["mac"]) for n in facts["nics"]}
    assert {d["name"][:2] for d in guest["disks"]} == {"vd"}  # it really is the VM (virtio disks)
    assert {fs["mountpoint"]: fs["uuid"] for fs in guest["filesystems"]} == {
        fs["mountpoint"]: fs["uuid"] for fs in facts["filesystems"]
    }
    return guest
