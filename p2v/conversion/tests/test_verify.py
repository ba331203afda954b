"""Comparing what the booted guest reports with what the assessment says the VM must be."""

from __future__ import annotations

import pytest

from p2v.conversion.verify import ExpectedHardware, VerifyError, compare_hardware, parse_report

MiB = 1024 * 1024
EXPECTED = ExpectedHardware(
    vcpus=2,
    memory_bytes=256 * MiB,
    firmware="uefi",
    disk_sizes=(1024 * MiB,),
    macs=("52:54:00:aa:bb:01",),
    nic_names={"52:54:00:aa:bb:01": "eth0"},
)
GOOD = {
    "vcpus": 2,
    "memory_bytes": 230 * MiB,
    "firmware": "uefi",
    "disks": [{"name": "vda", "size_bytes": 1024 * MiB}],
    "nics": [{"name": "eth0", "mac": "52:54:00:aa:bb:01"}],
}


def test_matching_report_has_no_problems():
    assert compare_hardware(GOOD, EXPECTED) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"vcpus": 1}, "vCPUs"),
        ({"memory_bytes": 512 * MiB}, "memory"),
        ({"memory_bytes": 64 * MiB}, "memory"),
        ({"firmware": "bios"}, "firmware"),
        ({"disks": [{"name": "vda", "size_bytes": 512 * MiB}]}, "disks"),
        ({"disks": []}, "disks"),
        ({"nics": [{"name": "eth0", "mac": "52:54:00:aa:bb:02"}]}, "NIC MACs"),
        ({"nics": [{"name": "ens3", "mac": "52:54:00:aa:bb:01"}]}, "named it ens3"),
    ],
)
def test_each_difference_is_named(change, problem):
    problems = compare_hardware({**GOOD, **change}, EXPECTED)
    assert len(problems) == 1
    assert problem in problems[0]


def test_report_line_is_found_among_console_noise():
    console = (
        'SYSLINUX 6.04\r\n[    3.9] random\r\nP2V-REPORT {"vcpus": 2}\r\n[    4.0] reboot: Power down\r\n'
    )
    assert parse_report(console) == {"vcpus": 2}
    assert parse_report("booting...\n") is None
    with pytest.raises(VerifyError, match="not JSON"):
        parse_report("P2V-REPORT {broken\n")
