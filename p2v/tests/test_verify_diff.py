"""The verdict of a verification is the diff between the source's facts and the VM's own: each field
that differs is named, equal documents give no difference, and expected changes (device names,
disk order) are not differences."""

from __future__ import annotations

import copy

import pytest

from p2v.conversion import isolation, verify

GiB = 1024**3
MiB = 1024**2
PLAN = {"vcpus": 2, "memory_bytes": GiB}


def source_facts() -> dict:
    return {
        "hostname": "dell-r640-01",
        "cpu": {"vcpus": 2},
        "memory_bytes": GiB,
        "memory_total_bytes": 983504 * 1024,
        "memory_source": "dmi",
        "disks": [{"name": "sda", "size_bytes": 256 * MiB}, {"name": "sdb", "size_bytes": 2 * GiB}],
        "filesystems": [
            {
                "device": "/dev/sdb2",
                "mountpoint": "/",
                "fstype": "ext4",
                "uuid": "r",
                "size_bytes": 1800 * MiB,
            },
            {
                "device": "/dev/sda1",
                "mountpoint": "/srv/data",
                "fstype": "ext4",
                "uuid": "d",
                "size_bytes": 250 * MiB,
            },
        ],
        "nics": [{"name": "enp0s3", "mac": "52:54:00:d3:11:01", "addresses": ["10.1.2.2/30"]}],
        "default_route": {"gateway": "10.1.2.1", "dev": "enp0s3"},
        "firmware": "bios",
        "os": {"id": "debian", "version_id": "12"},
        "kernel": {"release": "6.1.0-50-amd64", "machine": "x86_64"},
        "packages": {"names": ["openssh-server", "python3", "systemd"]},
        "services": ["ssh.service", "systemd-networkd.service", "systemd-fsckd.service"],
    }


def guest_facts() -> dict:
    """The same machine as a VM sees itself: other device names, disk order, a transient service gone."""
    guest = copy.deepcopy(source_facts())
    guest["disks"] = [{"name": "vda", "size_bytes": 2 * GiB}, {"name": "vdb", "size_bytes": 256 * MiB}]
    guest["filesystems"][0]["device"], guest["filesystems"][1]["device"] = "/dev/vda2", "/dev/vdb1"
    guest["memory_total_bytes"] = 984000 * 1024
    guest["services"] = ["ssh.service", "systemd-networkd.service", "serial-getty@ttyS0.service"]
    return guest


def test_the_same_machine_as_a_vm_has_no_difference():
    assert verify.diff_facts(source_facts(), guest_facts(), PLAN) == []


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("memory_bytes", lambda g: g.update(memory_bytes=768 * MiB)),
        ("cpu.vcpus", lambda g: g["cpu"].update(vcpus=1)),
        ("hostname", lambda g: g.update(hostname="localhost")),
        ("nics", lambda g: g["nics"][0].update(name="enp1s0")),
        ("disks", lambda g: g["disks"].pop()),
        ("filesystems[/srv/data]", lambda g: g["filesystems"].pop()),
        ("kernel", lambda g: g["kernel"].update(release="6.1.0-51-amd64")),
        ("os", lambda g: g["os"].update(version_id="11")),
        ("packages", lambda g: g["packages"]["names"].remove("python3")),
        ("services", lambda g: g["services"].remove("ssh.service")),
        ("memory_total_bytes", lambda g: g.update(memory_total_bytes=700 * 1024 * 1024)),
        ("firmware", lambda g: g.update(firmware="uefi")),
    ],
)
def test_each_difference_is_named(field, change):
    guest = guest_facts()
    change(guest)
    differences = verify.diff_facts(source_facts(), guest, PLAN)
    assert [d.field for d in differences] == [field]
    assert differences[0].message().startswith(f"{field}: source ")


@pytest.mark.parametrize(
    ("field", "unread"),
    [
        ("services", lambda g: g.update(services=None)),
        ("packages", lambda g: g["packages"].update(names=None)),
        ("hostname", lambda g: g.update(hostname=None)),
        ("kernel", lambda g: g.update(kernel=None)),
        ("memory_total_bytes", lambda g: g.update(memory_total_bytes=None)),
    ],
)
def test_a_fact_the_vm_could_not_read_is_not_compared_and_says_why(field, unread):
    guest = guest_facts()
    unread(guest)
    comparison = verify.compare_facts(source_facts(), guest, PLAN)
    assert comparison.differences == []
    assert [n.as_dict() for n in comparison.not_compared] == [
        {"field": field, "reason": "the VM's own probe could not read it"}
    ]
    assert field not in comparison.compared
    assert {"cpu.vcpus", "memory_bytes", "disks", "filesystems", "nics", "os"} <= set(comparison.compared)
    assert comparison.matches  # what was compared matches; the verdict names what was not


@pytest.mark.parametrize("field", ["disks", "filesystems", "nics"])
def test_the_hardware_the_conversion_sets_must_be_compared_for_a_match(field):
    guest = guest_facts()
    guest[field] = None
    comparison = verify.compare_facts(source_facts(), guest, PLAN)
    assert comparison.differences == []
    assert [n.field for n in comparison.not_compared] == [field]
    assert not comparison.matches


def test_a_fact_the_assessment_has_no_value_for_is_not_compared_either():
    source = source_facts()
    source["services"] = None
    comparison = verify.compare_facts(source, guest_facts(), PLAN)
    assert [n.as_dict() for n in comparison.not_compared] == [
        {"field": "services", "reason": "the assessment could not read it on the source"}
    ]
    assert comparison.matches


def test_every_field_of_two_complete_documents_is_compared():
    comparison = verify.compare_facts(source_facts(), guest_facts(), PLAN)
    assert comparison.compared == [
        "cpu.vcpus", "memory_bytes", "memory_total_bytes", "disks", "filesystems", "nics",
        "hostname", "firmware", "os", "kernel", "packages", "services",
    ]  # fmt: skip
    assert comparison.not_compared == []
    assert comparison.matches


def test_memory_capped_by_the_plan_is_compared_with_the_plan():
    guest = guest_facts()
    guest["memory_bytes"] = 512 * MiB
    guest["memory_total_bytes"] = (983504 - 512 * 1024) * 1024
    assert verify.diff_facts(source_facts(), guest, {"vcpus": 2, "memory_bytes": 512 * MiB}) == []


def test_console_markers_of_a_failed_boot():
    assert (
        verify.boot_failure("...\r\n(initramfs) ")
        == "the guest stopped in the initramfs shell (its root disk was not found)"
    )
    assert verify.boot_failure("Kernel panic - not syncing: VFS") == "the guest kernel panicked"
    assert verify.boot_failure("You are in emergency mode. After logging in") is not None
    assert verify.boot_failure("Debian GNU/Linux 12 host ttyS0\n\nhost login: ") is None
    text = "[\x1b[0;1;31mFAILED\x1b[0m] Failed to mount srv-data.mount - /srv/data.\nok line\n"
    assert verify.failed_lines(text) == ["[FAILED] Failed to mount srv-data.mount - /srv/data."]


def test_the_probe_takes_the_gateway_address_on_the_isolated_network():
    assert isolation.reachable_address(source_facts()) == ("enp0s3", "10.1.2.2", "10.1.2.1/30")
    facts = source_facts()
    facts["default_route"] = None
    assert isolation.reachable_address(facts) == ("enp0s3", "10.1.2.2", "10.1.2.1/30")  # first free host
    facts["nics"][0]["addresses"] = ["fe80::1/64"]
    assert isolation.reachable_address(facts) is None
