"""P2V of the real Debian 12 server whose initramfs is host-only (`MODULES=dep`), end to end.

The source (tests/realguest/variants.py) boots from AHCI disks and its initramfs holds ahci but no
virtio_blk: copied as it is, the VM stops in the initramfs shell. The assessment must warn and say
the conversion will rebuild it; the conversion must rebuild it natively (the guest's own
update-initramfs in a bubblewrap sandbox on this host), and the VM must boot and verify green,
its own probes finding virtio_blk in the initramfs it booted from. The source stays as it was.

Costs: one boot of the source under emulation, a 2 GiB copy, one boot of the VM; the first run on
a machine also builds the variant image (one more emulated boot and update-initramfs, cached).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v.conversion.choices import JobState
from p2v.conversion.initramfs import INITRAMFS_TOOLS_CONF
from p2v.conversion.models import ConversionJob
from p2v.conversion.services import remove_converted_vm
from tests.environment import need_binary, need_root
from tests.p2v_conversion.conftest import leftovers
from tests.p2v_real.test_real_guest import JOB_TIMEOUT_S, assess, hypervisor  # noqa: F401 (fixture)
from tests.services import wait_until

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.guest_variants,  # minutes each under emulation: `make guest-variants`, not `make test`
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(3600),  # the first run on a machine also builds the variant under emulation
]


@pytest.fixture(scope="module")
def modules_dep_guest() -> Iterator:
    """The "physical" server with a host-only initramfs, booted under QEMU on AHCI + e1000e."""
    need_root()
    need_binary(
        "qemu-system-x86_64", "debootstrap", "mkfs.ext4", "mcopy", "syslinux", "sfdisk", "debugfs", "bwrap"
    )
    from tests.realguest.machine import start_real_guest
    from tests.realguest.variants import modules_dep_image

    guest = start_real_guest(image=modules_dep_image())
    try:
        guest.wait_settled()
        yield guest
    finally:
        guest.close()


def source_initramfs_has(guest, module: str) -> bool:
    release = guest.ssh("uname -r").stdout.strip()
    done = guest.ssh(f"lsinitramfs /boot/initrd.img-{release}", timeout_s=600)
    assert done.returncode == 0, done.stderr
    return re.search(rf"/{module}\.ko", done.stdout) is not None


def test_host_only_initramfs_is_rebuilt_natively_and_the_vm_boots(
    celery_worker,
    hypervisor,  # noqa: F811 (the fixture imported above)
    modules_dep_guest,
    libvirt_conn,
    p2v_pool,
    p2v_prefix,
):
    machine = assess(modules_dep_guest)
    assessment = machine.latest_assessment
    facts = assessment.facts
    assert "virtio_blk" in facts["kernel"]["virtio_modules"]  # the kernel has the module...
    assert not {"virtio_blk", "virtio_scsi"} & set(facts["initramfs"]["virtio_modules"])  # ...not inside
    assert facts["initramfs"]["rebuild_tool"] == "update-initramfs"
    assert assessment.blockers == []
    [warning] = [w for w in assessment.warnings if w["rule"] == "initramfs_virtio"]
    assert "will rebuild it natively with the guest's own update-initramfs" in warning["message"]

    admin = APIClient()
    admin.force_authenticate(get_user_model().objects.create_user("p2v-admin", password="x", is_staff=True))
    response = admin.post(f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "test"}, format="json")
    assert response.status_code == 201, response.content
    job_id = response.json()["job"]["id"]
    job = wait_until(
        lambda: ConversionJob.objects.filter(
            pk=job_id, state__in=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
        ).first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=1,
        what="the conversion of the MODULES=dep guest",
    )
    try:
        logs = "\n".join(f"[{line.stage}/{line.level}] {line.message}" for line in job.logs.all())
        assert job.state == JobState.SUCCEEDED, f"{job.error}\n{logs}"
        rebuilt = re.search(
            r"initramfs: rebuilt natively in ([0-9.]+) s by the guest's own `update-initramfs", logs
        )
        assert rebuilt, logs
        # The sandbox shows the guest's tools the root by its fstab UUID: the fsck hook put fsck in.
        assert "Couldn't identify type of root file system" not in logs, logs
        changes = {c["path"]: c for c in job.changes}
        assert "MODULES=most" in changes[INITRAMFS_TOOLS_CONF]["after"]
        image = f"/boot/initrd.img-{facts['kernel']['release']}"
        assert "virtio_blk" in changes[image]["after"].split(", ")
        result = job.verification
        assert (result["method"], result["compared"], result["matches"], result["differences"]) == (
            "ssh",
            True,
            True,
            [],
        )
        # The VM's own probes: its root is on a virtio disk, which the host-only initramfs could not
        # have found (it would have stopped in the initramfs shell): it booted from the rebuilt one.
        guest = result["guest"]
        assert {d["name"][:2] for d in guest["disks"]} == {"vd"}
        assert guest["kernel"]["release"] == facts["kernel"]["release"]
        print(f"\nP2V-NATIVE-INITRAMFS rebuild_s={float(rebuilt.group(1)):.1f}")
    finally:
        assert remove_converted_vm(job) == []
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []
    assert not source_initramfs_has(modules_dep_guest, "virtio_blk")  # the source was never changed
