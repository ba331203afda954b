"""P2V assessment end to end: a real Celery worker on Redis assesses the stand-in machine over SSH.

The stand-in (tests/standin/machine.py) is sshd in its own network and mount namespaces with one
disk (a bootable image on a loop device). Every expected value below is read without the
assessment's tools: from /sys and /proc on the host, the image builder's record, `ip` in the
namespace, and `ssh-keygen`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v import services
from p2v.choices import AssessmentStatus, ConversionEventKind, ConversionEventStatus, ConversionMode
from p2v.models import Assessment, ConversionEvent, ConversionPolicy, Machine, SecurityEvent
from tests.services import wait_until

pytestmark = [pytest.mark.standin, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ASSESSMENT_TIMEOUT_S = 60
# What OpenSSH's sshd logs (LogLevel VERBOSE) once a client tries to authenticate in any way.
AUTH_LOG_MARKERS = (
    "Accepted",
    "Failed",
    "publickey",
    "Postponed",
    "userauth",
    "Invalid user",
    "Authentication",
)


def failing_smartctl(device: str) -> str:
    """smartctl 7.3's JSON for `smartctl -H -j` on an ATA disk whose health check fails (exit bit 3)."""
    doc = {
        "json_format_version": [1, 0],
        "smartctl": {
            "version": [7, 3],
            "svn_revision": "5338",
            "platform_info": "x86_64-linux-6.1.0-13-amd64",
            "build_info": "(local build)",
            "argv": ["smartctl", "-H", "-j", device],
            "exit_status": 8,
        },
        "local_time": {"time_t": 1795717398, "asctime": "Thu Nov 26 18:23:18 2026 UTC"},
        "device": {"name": device, "info_name": f"{device} [SAT]", "type": "sat", "protocol": "ATA"},
        "smart_status": {"passed": False},
    }
    return f"cat <<'JSON'\n{json.dumps(doc, indent=2)}\nJSON\nexit 8\n"


def make_machine(standin, *, pin: bool = False, private_key: str | None = None, **fields) -> Machine:
    values = {
        "name": f"standin-{secrets.token_hex(3)}",
        "address": standin.address,
        "ssh_port": standin.port,
        "ssh_user": standin.user,
        "host_key_fingerprint": standin.host_key_fingerprint if pin else "",
    }
    machine = Machine(**{**values, **fields})
    machine.set_private_key(private_key or standin.private_key)
    machine.save()
    return machine


def finished(assessment_id: int) -> Assessment | None:
    assessment = Assessment.objects.get(pk=assessment_id)
    return assessment if assessment.status in (AssessmentStatus.SUCCEEDED, AssessmentStatus.FAILED) else None


def assess(machine: Machine) -> Assessment:
    queued = services.queue_assessment(machine)  # autocommit: the task is sent at once
    return wait_until(
        lambda: finished(queued.pk),
        timeout_s=ASSESSMENT_TIMEOUT_S,
        what=f"assessment {queued.pk} of {machine.name} to finish",
    )


def assert_failed_cleanly(assessment: Assessment, *reason_parts: str) -> None:
    """Failed with a reason naming the problem, and nothing half-written."""
    assert assessment.status == AssessmentStatus.FAILED, assessment.error
    for part in reason_parts:
        assert part in assessment.error, f"{part!r} not in {assessment.error!r}"
    assert assessment.facts is None
    assert assessment.facts_schema is None
    assert assessment.compatibility_score is None
    assert assessment.compatible is None
    assert assessment.blockers == []
    assert assessment.warnings == []
    assert assessment.finished is not None
    assert not ConversionEvent.objects.filter(machine=assessment.machine).exists()


def host_meminfo_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.fixture
def admin_client() -> APIClient:
    user = get_user_model().objects.create_user(f"admin-{secrets.token_hex(3)}", is_staff=True)
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_facts_match_the_machine_read_independently(celery_worker, standin_machine, admin_client):
    standin = standin_machine
    created = admin_client.post(
        "/api/p2v/machines/",
        {
            "name": "standin-bios",
            "address": standin.address,
            "ssh_port": standin.port,
            "ssh_user": standin.user,
            "private_key": standin.private_key,
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    machine_id = created.json()["id"]
    log_offset = standin.log_offset()
    memory_before = host_meminfo_bytes()  # virtio-mem may resize this VM: accept either side of the run

    queued = admin_client.post(f"/api/p2v/machines/{machine_id}/assess/")
    assert queued.status_code == 202, queued.content
    assessment = wait_until(
        lambda: finished(queued.json()["id"]),
        timeout_s=ASSESSMENT_TIMEOUT_S,
        what="the assessment of the stand-in",
    )
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    facts = assessment.facts

    assert facts["schema"] == 1
    assert facts["cpu"]["vcpus"] == os.cpu_count()
    assert facts["memory_total_bytes"] in (memory_before, host_meminfo_bytes())
    # Installed memory: this host has no DMI, so the kernel's boot-time count (never below MemTotal).
    boot_line = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"Memory: \d+K/(\d+)K available", boot_line)
    if match:
        assert (facts["memory_bytes"], facts["memory_source"]) == (int(match.group(1)) * 1024, "kernel")
    else:  # the boot line has left the kernel log: MemTotal is all there is
        assert (facts["memory_bytes"], facts["memory_source"]) == (facts["memory_total_bytes"], "meminfo")
    assert facts["memory_bytes"] >= facts["memory_total_bytes"]
    # Exactly the stand-in's disk, with its real size (the host's own disk is not visible to it).
    sysfs_size = int(Path(f"/sys/block/{standin.loop_name}/size").read_text()) * 512
    assert [(d["path"], d["size_bytes"]) for d in facts["disks"]] == [(standin.loop_device, sysfs_size)]
    assert sysfs_size == standin.image_path.stat().st_size
    partitions = facts["disks"][0]["partitions"]
    assert [(p["start_bytes"], p["size_bytes"], p["fstype"], p["uuid"].lower()) for p in partitions] == [
        (p.start_bytes, p.size_bytes, p.fstype, p.uuid.lower()) for p in standin.image.partitions
    ]
    assert {nic["name"]: nic["mac"] for nic in facts["nics"]} == standin.nic_macs()
    assert facts["nics"][0]["addresses"] == [f"{standin.address}/30"]
    assert facts["firmware"] == "bios"
    assert facts["os"]["name"] == platform.freedesktop_os_release()["NAME"]
    assert facts["kernel"]["release"] == os.uname().release

    # Pinned on first contact, to the key sshd really has.
    machine = Machine.objects.get(pk=machine_id)
    assert machine.host_key_fingerprint == standin.host_key_fingerprint
    assert machine.host_key_source == "first-contact"
    # The control for the host-key test: a normal assessment does show up as an authentication.
    assert "Accepted publickey for root" in standin.log_since(log_offset)

    body = admin_client.get(f"/api/p2v/assessments/{assessment.pk}/").json()
    assert body["compatibility_score"] == assessment.compatibility_score
    assert body["compatible"] is True
    assert body["blockers"] == []
    assert any(w["rule"] == "memory_cap" for w in body["warnings"])  # the host has more than the 16 GiB cap


def test_uefi_machine_is_assessed_as_uefi(celery_worker, standin_uefi):
    assessment = assess(make_machine(standin_uefi))
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    facts = assessment.facts
    assert facts["firmware"] == "uefi"
    assert facts["disks"][0]["pttype"] == "gpt"
    assert [p["fstype"] for p in facts["disks"][0]["partitions"]] == [
        p.fstype for p in standin_uefi.image.partitions
    ]


def test_changed_host_key_refuses_before_any_credential(celery_worker, standin_machine):
    standin = standin_machine
    machine = make_machine(standin, pin=True)
    pinned = machine.host_key_fingerprint
    presented = standin.swap_host_key()
    try:
        log_offset = standin.log_offset()
        assessment = assess(machine)
        sshd_log = standin.log_since(log_offset)
    finally:
        standin.restore_host_key()

    assert_failed_cleanly(assessment, "host key", pinned, presented, "no credential sent")
    event = SecurityEvent.objects.get(machine=machine)
    assert (event.kind, event.expected_fingerprint, event.presented_fingerprint) == (
        "host-key-mismatch",
        pinned,
        presented,
    )
    assert event.assessment_id == assessment.pk
    # sshd saw the connection, and nothing that would mean an authentication attempt.
    assert f"Connection from {standin.host_address}" in sshd_log
    assert not [line for line in sshd_log.splitlines() if any(m in line for m in AUTH_LOG_MARKERS)], sshd_log
    machine.refresh_from_db()
    assert machine.host_key_fingerprint == pinned  # a mismatch never re-pins


def test_failing_smart_waits_for_approval_then_starts(
    celery_worker, standin_machine, admin_client, monkeypatch
):
    policy = ConversionPolicy.objects.create(name="approve-first", mode=ConversionMode.APPROVAL)
    machine = make_machine(standin_machine, pin=True, policy=policy)
    with standin_machine.fake_tool("smartctl", failing_smartctl(standin_machine.loop_device)):
        assessment = assess(machine)
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    assert assessment.facts["health"]["smart"][0]["passed"] is False
    event = ConversionEvent.objects.get(machine=machine)
    assert (event.kind, event.status) == (ConversionEventKind.HEALTH, ConversionEventStatus.PENDING_APPROVAL)
    assert event.details["signals"] == [f"SMART health check failed on {standin_machine.loop_device}"]
    assert event.assessment_id == assessment.pk
    assert [e["id"] for e in admin_client.get("/api/p2v/approvals/").json()["results"]] == [event.pk]

    # The conversion engine is issue 7's (p2v.conversion); here we check that approval hands it the event.
    handed_over = []
    monkeypatch.setattr(
        services, "_conversion_hook", lambda name: handed_over.append if name == "start_conversion" else None
    )
    approved = admin_client.post(
        f"/api/p2v/events/{event.pk}/approve/", {"note": "disk is dying"}, format="json"
    )
    assert approved.status_code == 200, approved.content
    assert approved.json()["status"] == ConversionEventStatus.STARTED
    assert [e.pk for e in handed_over] == [event.pk]


def test_failing_smart_with_auto_policy_starts_without_an_admin(celery_worker, standin_machine):
    policy = ConversionPolicy.objects.create(name="auto", mode=ConversionMode.AUTO)
    machine = make_machine(standin_machine, pin=True, policy=policy)
    with standin_machine.fake_tool("smartctl", failing_smartctl(standin_machine.loop_device)):
        assessment = assess(machine)
    assert assessment.status == AssessmentStatus.SUCCEEDED, assessment.error
    event = ConversionEvent.objects.get(machine=machine)
    assert event.kind == ConversionEventKind.HEALTH
    assert event.decided_by is None
    assert "auto-convert" in event.decision_note
    # Handed to the conversion engine without an admin: with a hypervisor registered it starts a
    # job; with none (this test registers none) the engine's own refusal is kept on the event.
    from p2v.conversion.models import ConversionJob, Hypervisor

    if Hypervisor.objects.exists():
        assert event.status == ConversionEventStatus.STARTED, event.details
        assert ConversionJob.objects.filter(event=event).count() == 1
    else:
        assert event.status == ConversionEventStatus.APPROVED, event.details
        assert "no hypervisor is registered" in event.details["start_error"]
        assert not ConversionJob.objects.filter(event=event).exists()


def test_unreachable_host_fails_with_reason(celery_worker, standin_machine):
    machine = make_machine(standin_machine, ssh_port=1, connect_timeout_s=2)
    assert_failed_cleanly(assess(machine), f"cannot reach {standin_machine.address}:1", "refused")


def test_wrong_key_fails_with_reason(celery_worker, standin_machine, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    machine = make_machine(standin_machine, pin=True, private_key=(tmp_path / "k").read_text())
    assert_failed_cleanly(assess(machine), f"root@{standin_machine.address}:22 rejected the machine's key")
    assert not SecurityEvent.objects.filter(machine=machine).exists()


def test_command_timeout_fails_with_reason(celery_worker, standin_machine):
    machine = make_machine(standin_machine, pin=True, command_timeout_s=1.5)
    # Without the deadline lscpu would end after 20 s with no output ("not JSON"): the reason below
    # proves the deadline fired, with no wall-clock threshold.
    with standin_machine.fake_tool("lscpu", "exec sleep 20\n"):
        assessment = assess(machine)
    assert_failed_cleanly(assessment, "`lscpu -J` did not finish within 1.5 s")


def test_garbage_output_fails_with_reason(celery_worker, standin_machine):
    machine = make_machine(standin_machine, pin=True)
    with standin_machine.fake_tool("lsblk", "echo 'NAME MAJ:MIN RM SIZE'; echo 'sda 8:0 0 1T'\n"):
        assessment = assess(machine)
    assert_failed_cleanly(assessment, "`lsblk -J -b", "output is not JSON", "NAME MAJ:MIN")
