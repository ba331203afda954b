"""P2V of the real Debian server without python3 (issue 13, acceptance 3, first half).

The base real guest with /usr/bin/python3* removed from this session's copy of its disk. The
assessment must say so with its reason and the method the copy will use (a warning, not a
blocker); the conversion must copy the disks with the sh + dd fallback reader (only used blocks,
same checksums) and the VM must be verified green with its NIC name kept.
"""

from __future__ import annotations

import pytest

from p2v.conversion.services import remove_converted_vm
from tests.p2v_conversion.conftest import leftovers
from tests.p2v_real.realguest_flow import (
    assert_verified_with_nic_names_kept,
    assess,
    booted_guest,
    convert,
    job_logs,
)
from tests.p2v_real.test_real_guest import hypervisor  # noqa: F401 (fixture)
from tests.realguest.machine import start_real_guest
from tests.realguest.variants_lvm import remove_python3

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.guest_variants,  # minutes each under emulation: `make guest-variants`, not `make test`
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(2400),
]
# The sh reader sends whole 64 KiB sub-blocks, so the ext4 free ranges are rounded inwards.
WIRE_SLACK = 1.10


@pytest.fixture(scope="module")
def guest_without_python():
    yield from booted_guest(lambda: start_real_guest(prepare=remove_python3))


@pytest.mark.usefixtures("hypervisor")  # the target Hypervisor row convert/ picks
def test_source_without_python3_is_assessed_with_its_reason_and_converted_by_the_fallback(
    celery_worker,
    guest_without_python,
    libvirt_conn,
    p2v_pool,
    p2v_prefix,
):
    done = guest_without_python.ssh("command -v python3 || echo absent")
    assert done.stdout.strip() == "absent", done.stdout  # the premise, checked on the source itself
    machine = assess(guest_without_python)
    assessment = machine.latest_assessment
    facts = assessment.facts
    assert "python3" not in facts["tools"]
    assert assessment.blockers == []
    [warning] = [w for w in assessment.warnings if w["rule"] == "python3"]
    assert "python3 is not installed" in warning["message"]
    assert "sh + dd fallback reader" in warning["message"]

    job = convert(machine)
    try:
        logs = job_logs(job)
        assert_verified_with_nic_names_kept(job, facts)
        copies = [line for line in logs.splitlines() if ": copied in " in line]
        assert len(copies) == len(facts["disks"]), logs
        assert all("sh + dd fallback reader" in line for line in copies), copies
        used = sum(fs["used_bytes"] for fs in facts["filesystems"])
        print(f"\nP2V-BYTES no-python3 wire={job.wire_bytes} used={used} ratio={job.wire_bytes / used:.3f}")
        assert job.wire_bytes <= used * WIRE_SLACK  # still only used blocks, not the whole disk
    finally:
        assert remove_converted_vm(job) == []
    assert leftovers(libvirt_conn, p2v_pool, p2v_prefix) == []
