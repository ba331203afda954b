"""P2V of a real Debian 12 server (not the stand-in), end to end through the product.

The source is tests/realguest: debootstrap'd bookworm with the generic kernel, systemd, sshd and
python3, booted under QEMU (TCG) with AHCI disks, an e1000e NIC and a Dell SMBIOS. The product
assesses it over SSH, converts it (POST convert/ under a real Celery worker and real libvirtd), and
proves the VM by logging into it on an isolated network and diffing its own probes with the
assessment. Then the same VM, changed behind the product's back (less memory), must be red on
exactly that field.

Costs about two guest boots under emulation plus a 2 GiB disk copy; one guest per session.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v.choices import AssessmentStatus
from p2v.conversion import verify
from p2v.conversion.choices import JobState
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.conversion.services import remove_converted_vm, verify_stage
from p2v.models import Machine
from p2v.services import queue_assessment
from tests.p2v_conversion.conftest import leftovers
from tests.realguest.machine import DISK_SERIALS, SMBIOS, SOURCE_MAC
from tests.services import wait_until

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    # Under emulation on a shared machine: two boots of the VM, the probes inside it, a disk copy.
    pytest.mark.timeout(2400),
]
MiB = 1024 * 1024
GiB = 1024 * MiB
# Two emulated boots of a systemd guest and a 2 GiB copy on a shared 2-core machine: generous.
JOB_TIMEOUT_S = 1200


@pytest.fixture
def hypervisor(p2v_pool, p2v_prefix, tmp_path) -> Hypervisor:
    return Hypervisor.objects.create(
        name="local",
        uri="qemu:///system",
        storage_pool=p2v_pool.name(),
        network="user",
        memory_cap_bytes=2 * GiB,
        name_prefix=p2v_prefix[:16],
        console_dir=str(tmp_path / "console"),
        boot_timeout_s=600,
    )


def assess(guest) -> Machine:
    machine = Machine(
        name="dell-r640-01",
        address=guest.address,
        ssh_port=22,
        ssh_user="root",
        host_key_fingerprint=guest.host_key_fingerprint,
    )
    machine.set_private_key(guest.private_key)
    machine.save()
    assessment = queue_assessment(machine)
    wait_until(
        lambda: (
            Machine.objects.get(pk=machine.pk).assessments.get(pk=assessment.pk).status
            in (AssessmentStatus.SUCCEEDED, AssessmentStatus.FAILED)
        ),
        timeout_s=300,
        what="the assessment of the real guest",
    )
    assessment.refresh_from_db()
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    return machine


FREED_FILE_BYTES = 256 * MiB


def nonzero_bytes(path, block: int = 64 * 1024) -> int:
    """What a non-zero-block copy sends for this disk image (64 KiB blocks, as the reader cuts them)."""
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            if chunk.strip(b"\0"):
                total += len(chunk)
    return total


def test_real_server_is_assessed_converted_and_proved_from_inside(
    celery_worker, hypervisor, real_guest, libvirt_conn, p2v_pool, p2v_prefix
):
    # A large file written and deleted: its blocks still hold its bytes but the filesystem has freed them.
    done = real_guest.ssh(
        f"head -c {FREED_FILE_BYTES} /dev/urandom > /var/tmp/big && sync && rm /var/tmp/big && sync"
    )
    assert done.returncode == 0, done.stderr
    machine = assess(real_guest)
    assessment = machine.latest_assessment
    facts = assessment.facts
    # The facts the issue found wrong or missing, against what the "hardware" really is.
    assert (facts["memory_bytes"], facts["memory_source"]) == (GiB, "dmi")
    assert facts["memory_total_bytes"] < GiB  # MemTotal, beside it: the kernel keeps its share
    assert facts["dmi"] == {
        "vendor": SMBIOS["manufacturer"],
        "model": SMBIOS["product"],
        "serial": SMBIOS["serial"],
    }
    assert facts["hostname"] == real_guest.image.hostname
    assert facts["health"]["edac"] is None  # no EDAC memory controller: unknown, not zero errors
    assert any(reason.startswith("EDAC") for reason in facts["unknown"])
    [nic] = facts["nics"]
    assert (nic["mac"], nic["driver"]) == (SOURCE_MAC, "e1000e")
    assert facts["default_route"] == {"gateway": real_guest.host_address, "dev": nic["name"]}
    assert {d["transport"] for d in facts["disks"]} == {"sata"}
    assert sorted(d["serial"] for d in facts["disks"]) == sorted(DISK_SERIALS)
    assert {"ssh.service", "systemd-networkd.service", "systemd-journald.service"} <= set(facts["services"])
    assert "virtio_menu" not in facts["kernel"]["virtio_modules"]
    assert {"virtio_blk", "virtio_net"} <= set(facts["kernel"]["virtio_modules"])
    assert "virtio_blk" in facts["initramfs"]["virtio_modules"]  # Debian's default MODULES=most
    assert assessment.blockers == []

    admin = APIClient()
    admin.force_authenticate(get_user_model().objects.create_user("p2v-admin", password="x", is_staff=True))
    response = admin.post(f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "test"}, format="json")
    assert response.status_code == 201, response.content
    job_id = response.json()["job"]["id"]  # convert/ answers with the job it started
    job = wait_until(
        lambda: ConversionJob.objects.filter(
            pk=job_id,
            state__in=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED],
        ).first(),
        timeout_s=JOB_TIMEOUT_S,
        interval_s=1,
        what="the conversion of the real guest",
    )
    try:
        logs = "\n".join(line.message for line in job.logs.all())
        assert job.state == JobState.SUCCEEDED, f"{job.error}\n{logs}"
        result = job.verification
        assert (result["method"], result["compared"], result["matches"], result["differences"]) == (
            "ssh",
            True,
            True,
            [],
        )
        guest = result["guest"]  # what the VM's own probes saw, checked here independently
        assert guest["hostname"] == facts["hostname"]
        assert {(n["name"], n["mac"]) for n in guest["nics"]} == {(nic["name"], SOURCE_MAC)}  # name kept
        assert guest["memory_bytes"] == GiB
        assert sorted(d["size_bytes"] for d in guest["disks"]) == sorted(
            d["size_bytes"] for d in facts["disks"]
        )
        assert {d["name"][:2] for d in guest["disks"]} == {"vd"}  # it really is the VM (virtio disks)
        assert {fs["mountpoint"]: fs["uuid"] for fs in guest["filesystems"]} == {
            fs["mountpoint"]: fs["uuid"] for fs in facts["filesystems"]
        }
        assert guest["kernel"]["release"] == facts["kernel"]["release"]
        assert "isolated network" in logs
        # Only used blocks crossed: at most the filesystems' used bytes + 5 %, although the disks hold
        # the deleted file's bytes (what a non-zero-block copy sends, measured on the source's images).
        used = sum(fs["used_bytes"] for fs in facts["filesystems"])
        nonzero = nonzero_bytes(real_guest.system_disk) + nonzero_bytes(real_guest.data_disk)
        print(
            f"\nP2V-BYTES wire={job.wire_bytes} used={used} nonzero_copy={nonzero} "
            f"ratio_used={job.wire_bytes / used:.3f} ratio_nonzero={nonzero / used:.3f}"
        )
        assert nonzero > used + FREED_FILE_BYTES * 0.9  # the freed file is really still on the disk
        assert job.wire_bytes <= used * 1.05
        assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) != []  # the VM and its volumes stay

        # The same VM, changed after the build (as an operator editing the domain might): red, naming memory.
        domain = libvirt_conn.lookupByName(job.plan["domain"])
        root = ET.fromstring(domain.XMLDesc(0))  # noqa: S314 (libvirt's own XML)
        for tag in ("memory", "currentMemory"):
            root.find(tag).text, root.find(tag).attrib["unit"] = str(768 * 1024), "KiB"
        libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
        with pytest.raises(verify.VerifyError, match=r"memory_bytes: source 1073741824, VM 805306368"):
            verify_stage(job)
        job.refresh_from_db()
        assert job.verification["matches"] is False
        assert [d["field"] for d in job.verification["differences"]] == ["memory_bytes"]
        job.event.refresh_from_db()
        assert job.event.status == "succeeded"  # the event follows its job
    finally:
        assert remove_converted_vm(job) == []
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []
