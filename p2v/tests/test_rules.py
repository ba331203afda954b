"""Compatibility rules: each finding appears exactly when its condition holds."""

from __future__ import annotations

import copy

import pytest

from p2v import rules

GiB = 1024**3
MiB = 1024**2


def healthy_facts() -> dict:
    return {
        "schema": 1,
        "cpu": {"vcpus": 2, "architecture": "x86_64"},
        "memory_bytes": 4 * GiB,
        "disks": [
            {
                "name": "sda",
                "path": "/dev/sda",
                "size_bytes": 20 * GiB,
                "partitions": [
                    {
                        "name": "sda1",
                        "path": "/dev/sda1",
                        "size_bytes": 20 * GiB,
                        "fstype": "ext4",
                        "uuid": "u-1",
                        "children": [],
                    }
                ],
            }
        ],
        "filesystems": [
            {
                "device": "/dev/sda1",
                "mountpoint": "/",
                "fstype": "ext4",
                "size_bytes": 20 * GiB,
                "used_bytes": 5 * GiB,
                "avail_bytes": 14 * GiB,
            }
        ],
        "nics": [{"name": "eth0", "mac": "52:54:00:00:00:01"}],
        "firmware": "bios",
        "os": {"id": "debian", "name": "Debian GNU/Linux"},
        "kernel": {"sysname": "Linux", "machine": "x86_64", "virtio_modules": ["virtio_blk", "virtio_net"]},
        "encrypted_volumes": [],
        "health": {"smart": [{"disk": "/dev/sda", "passed": True}], "io_errors": 0, "edac": None},
    }


TARGET = rules.TargetProfile(
    supported_firmware=("bios", "uefi"),
    memory_cap_bytes=16 * GiB,
    pool_free_bytes=100 * GiB,
    min_boot_free_bytes=100 * MiB,
)


def rules_hit(verdict: rules.Verdict) -> tuple[list[str], list[str]]:
    return [b["rule"] for b in verdict.blockers], [w["rule"] for w in verdict.warnings]


def test_initramfs_without_virtio_is_fine_when_the_kernel_has_it_built_in():
    facts = changed("initramfs", {"path": "/boot/initrd.img-6.1", "has_modules": True, "virtio_modules": []})
    facts["kernel"]["virtio_builtin"] = ["virtio_blk"]
    assert rules.evaluate(facts, TARGET).blockers == []


def test_initramfs_without_virtio_blocks_when_the_kernel_has_no_module_to_put_in_it():
    facts = changed(
        "initramfs",
        {"path": "/boot/initrd.img-6.1", "has_modules": True, "virtio_modules": [], "rebuild_tool": "dracut"},
    )
    facts["kernel"]["virtio_modules"] = ["virtio_net"]
    verdict = rules.evaluate(facts, TARGET)
    messages = [b["message"] for b in verdict.blockers if b["rule"] == "initramfs_virtio"]
    assert len(messages) == 1
    assert "no virtio disk driver module" in messages[0]


def test_healthy_machine_scores_100():
    verdict = rules.evaluate(healthy_facts(), TARGET)
    assert (verdict.score, verdict.compatible, verdict.blockers, verdict.warnings) == (100, True, [], [])


def changed(path: str, value) -> dict:
    facts = copy.deepcopy(healthy_facts())
    *parents, last = path.split(".")
    node = facts
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return facts


def lvm_root(segment_type: str | None) -> dict:
    """Root on /dev/mapper/vg0-root (XFS) in a PV on sda2; segment_type None: lvs was not readable."""
    facts = changed("filesystems.0.device", "/dev/mapper/vg0-root")
    facts["filesystems"][0]["fstype"] = "xfs"
    pv = facts["disks"][0]["partitions"][0]
    pv.update(path="/dev/sda2", name="sda2", fstype="LVM2_member")
    pv["children"] = [
        {
            "name": "vg0-root",
            "path": "/dev/mapper/vg0-root",
            "type": "lvm",
            "fstype": "xfs",
            "uuid": "u-2",
            "size_bytes": GiB,
        }
    ]
    segment = {"type": segment_type, "start_bytes": 0, "size_bytes": GiB, "extent_bytes": 4 * MiB}
    if segment_type == "linear":
        segment.update(pv="/dev/sda2", first_pe=0)
    facts["lvm"] = (
        None
        if segment_type is None
        else {
            "logical_volumes": [
                {"path": "/dev/vg0/root", "dm_path": "/dev/mapper/vg0-root", "vg": "vg0", "name": "root",
                 "segments": [segment]}
            ],
            "physical_volumes": [{"device": "/dev/sda2", "vg": "vg0", "pe_start_bytes": MiB}],
        }
    )  # fmt: skip
    return facts


@pytest.mark.parametrize(
    ("facts", "blockers", "warnings", "text"),
    [
        (changed("os", None), ["known_os"], [], "could not be identified"),
        (changed("kernel.sysname", "FreeBSD"), ["known_os"], [], "FreeBSD"),
        (changed("kernel.machine", "aarch64"), ["architecture"], [], "aarch64"),
        (changed("kernel.virtio_modules", ["virtio_net"]), ["virtio_drivers"], [], "virtio disk driver"),
        (changed("kernel.virtio_modules", ["virtio_blk"]), [], ["virtio_drivers"], "virtio_net"),
        (changed("kernel.virtio_modules", None), [], ["virtio_drivers"], "could not tell"),
        (changed("filesystems.0.avail_bytes", 50 * MiB), ["initramfs_space"], [], "/ has 50 MiB free"),
        (changed("filesystems", []), [], ["initramfs_space"], "not checked"),
        (changed("tools", ["lsblk", "ip"]), [], ["python3"], "sh + dd fallback reader"),
        (
            changed("initramfs", {"path": "/boot/initrd.img-6.1", "has_modules": True, "virtio_modules": []}),
            ["initramfs_virtio"],
            [],
            "neither update-initramfs nor dracut",
        ),
        (
            changed(
                "initramfs",
                {
                    "path": "/boot/initrd.img-6.1",
                    "has_modules": True,
                    "virtio_modules": [],
                    "rebuild_tool": "update-initramfs",
                },
            ),
            [],
            ["initramfs_virtio"],
            "the conversion will rebuild it natively with the guest's own update-initramfs",
        ),
        (changed("filesystems.0.fstype", "btrfs"), ["root_filesystem"], [], "root filesystem is btrfs"),
        (changed("filesystems.0.fstype", "xfs"), [], [], ""),
        (lvm_root("linear"), [], ["root_filesystem"], "vg0/root (linear, 1 segment(s))"),
        (lvm_root("striped"), ["root_filesystem"], [], "with striped segments: only linear"),
        (lvm_root("thin"), ["root_filesystem"], [], "with thin segments"),
        (lvm_root(None), [], ["root_filesystem"], "its layout could not be read"),
        (changed("filesystems.0.device", "/dev/mapper/vg0-root"), ["root_filesystem"], [], "device-mapper"),
        (
            changed("encrypted_volumes", [{"device": "/dev/sda2", "fstype": "crypto_LUKS"}]),
            ["encrypted_volumes"],
            [],
            "/dev/sda2 is encrypted",
        ),
        (changed("firmware", None), ["firmware"], [], "unknown"),
        (changed("memory_bytes", 64 * GiB), [], ["memory_cap"], "cap of 16.0 GiB"),
        (changed("disks.0.size_bytes", 200 * GiB), ["disk_capacity"], [], "100.0 GiB free"),
        (changed("disks", []), ["disk_capacity"], [], "no disks"),
        (changed("health.smart", [{"disk": "/dev/sda", "passed": False}]), [], ["disk_health"], "FAILED"),
        (changed("disks.0.partitions.0.uuid", None), [], ["partitions_known"], "/dev/sda1"),
    ],
)
def test_each_rule_fires_on_its_condition(facts, blockers, warnings, text):
    verdict = rules.evaluate(facts, TARGET)
    assert rules_hit(verdict) == (blockers, warnings)
    assert text in " ".join(f["message"] for f in verdict.blockers + verdict.warnings)
    assert verdict.compatible is (not blockers)
    assert verdict.score == 100 - 40 * len(blockers) - 10 * len(warnings)


def test_firmware_the_hypervisor_cannot_offer():
    verdict = rules.evaluate(changed("firmware", "uefi"), rules.TargetProfile(supported_firmware=("bios",)))
    assert "firmware" in rules_hit(verdict)[0]
    assert "UEFI" in verdict.blockers[0]["message"]


def test_separate_boot_filesystem_is_the_one_checked():
    facts = healthy_facts()
    facts["filesystems"].append(
        {
            "device": "/dev/sda2",
            "mountpoint": "/boot",
            "fstype": "ext2",
            "size_bytes": 200 * MiB,
            "used_bytes": 150 * MiB,
            "avail_bytes": 40 * MiB,
        }
    )
    assert rules_hit(rules.evaluate(facts, TARGET))[0] == ["initramfs_space"]


def test_unknown_pool_space_is_a_warning_and_score_never_negative():
    target = rules.TargetProfile(pool_free_bytes=None)
    assert "disk_capacity" in rules_hit(rules.evaluate(healthy_facts(), target))[1]
    worst = {"schema": 1, "disks": [], "kernel": {"sysname": "SunOS", "machine": "sparc"}}
    assert rules.evaluate(worst, target).score == 0


def test_every_rule_documents_its_reason():
    for rule in rules.RULES:
        assert len((rule.__doc__ or "").split()) > 8, rule.__name__
