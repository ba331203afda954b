"""Host-side guest changes on a raw disk image: fstab to UUIDs, NIC names pinned, only when needed."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from p2v.conversion import adjust
from tests.environment import need_binary

MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path):
    """A raw disk: MBR, partition 1 ext4 root with an fstab naming /dev/sda1, no loop device."""
    need_binary("sfdisk", "mkfs.ext4", "debugfs", "blkid")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_text(
        "# static\n/dev/sda1 / ext4 defaults 0 1\nproc /proc proc defaults 0 0\n"
    )
    path = tmp_path / "disk.raw"
    with path.open("wb") as handle:
        handle.truncate(48 * MiB)
    subprocess.run(
        ["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, type=83\n", check=True, timeout=30
    )
    fs_uuid = str(uuid.uuid4())
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-U",
            fs_uuid,
            "-E",
            f"offset={MiB}",
            "-d",
            str(root),
            str(path),
            f"{47 * 1024}k",
        ],
        check=True,
        timeout=30,
    )
    return str(path), fs_uuid


FACTS = {"kernel": {"virtio_modules": ["virtio_blk", "virtio_pci", "virtio_net"]}}
NICS = [{"name": "eth0", "mac": "52:54:00:aa:bb:01"}]


def test_fstab_by_uuid_and_pinned_nic_names_are_written_and_recorded(disk):
    path, fs_uuid = disk
    changes = adjust.adjust_guest([path], FACTS, NICS)
    assert [c.path for c in changes] == ["/etc/fstab", adjust.UDEV_RULES_PATH]
    root = adjust.find_root([path], FACTS).as_partition()
    fstab = adjust.read_file(path, root, "/etc/fstab")
    assert f"UUID={fs_uuid} / ext4 defaults 0 1" in fstab
    assert "proc /proc proc" in fstab
    rules = adjust.read_file(path, root, adjust.UDEV_RULES_PATH)
    assert 'ATTR{address}=="52:54:00:aa:bb:01", NAME="eth0"' in rules
    if shutil.which("e2fsck"):
        assert (
            subprocess.run(
                ["e2fsck", "-fn", f"{path}?offset={MiB}"], capture_output=True, timeout=60, check=False
            ).returncode
            == 0
        )
    # A second run finds nothing left to do.
    assert adjust.adjust_guest([path], FACTS, NICS) == []


def test_kernel_without_virtio_stops_the_conversion_with_the_reason(disk):
    path, _ = disk
    with pytest.raises(adjust.AdjustError, match=r"lacks virtio drivers \['virtio_net'\]"):
        adjust.adjust_guest([path], {"kernel": {"virtio_modules": ["virtio_blk", "virtio_pci"]}}, NICS)


def test_fstab_naming_a_disk_that_was_not_copied_is_an_error(disk):
    path, _ = disk
    with pytest.raises(adjust.AdjustError, match="/dev/sdb1"):
        adjust.rewrite_fstab("/dev/sdb1 /data ext4 defaults 0 2\n", [path])


def test_unsafe_nic_names_are_refused():
    with pytest.raises(adjust.AdjustError, match="cannot be pinned"):
        adjust.udev_rules_for([{"name": 'eth0", RUN+="/bin/sh', "mac": "52:54:00:aa:bb:01"}])


def test_a_nic_pin_that_cannot_be_written_is_reported_and_the_rest_applied(disk):
    """A NIC name the pin refuses does not stop the fstab fix; it is reported with the reason."""
    path, fs_uuid = disk
    warnings = []
    bad = [{"name": "a name with spaces", "mac": "52:54:00:aa:bb:01"}]
    changes = adjust.adjust_guest([path], FACTS, bad, note=lambda text, level: warnings.append((level, text)))
    assert [(c.path, c.applied) for c in changes] == [("/etc/fstab", True), (adjust.UDEV_RULES_PATH, False)]
    assert "cannot be pinned" in changes[1].reason
    assert [level for level, _ in warnings] == ["warning"]
    assert "not changed /etc/udev/rules.d/70-p2v-net-names.rules" in warnings[0][1]
    root = adjust.find_root([path], FACTS).as_partition()
    assert f"UUID={fs_uuid} / ext4" in adjust.read_file(path, root, "/etc/fstab")
    assert adjust.read_file(path, root, adjust.UDEV_RULES_PATH) is None


def test_an_fstab_line_the_boot_does_not_wait_for_is_left_and_reported(disk):
    """/dev/sdb1 (not copied) marked nofail: the VM boots without it; the rest is rewritten."""
    path, fs_uuid = disk
    root = adjust.find_root([path], FACTS).as_partition()
    adjust.write_file(
        path,
        root,
        "/etc/fstab",
        "/dev/sda1 / ext4 defaults 0 1\n/dev/sdb1 /backup ext4 defaults,nofail 0 2\n",
    )
    changes = adjust.adjust_guest([path], FACTS, [])
    assert [(c.path, c.applied) for c in changes] == [("/etc/fstab", True), ("/etc/fstab", False)]
    assert "/dev/sdb1 /backup" in changes[1].summary
    assert adjust.read_file(path, root, "/etc/fstab") == (
        f"UUID={fs_uuid} / ext4 defaults 0 1\n/dev/sdb1 /backup ext4 defaults,nofail 0 2\n"
    )


def test_an_fstab_line_the_boot_waits_for_that_cannot_be_rewritten_fails_the_stage(disk):
    """Without the rewrite systemd would wait for /dev/sdb1 and enter emergency mode: the stage fails
    before writing anything (the job's rollback removes the volumes anyway)."""
    path, _ = disk
    root = adjust.find_root([path], FACTS).as_partition()
    fstab = "/dev/sda1 / ext4 defaults 0 1\n/dev/sdb1 /srv ext4 defaults 0 2\n"
    adjust.write_file(path, root, "/etc/fstab", fstab)
    with pytest.raises(adjust.AdjustError, match=r"/dev/sdb1, mounted at boot.*emergency mode"):
        adjust.adjust_guest([path], FACTS, NICS)
    assert adjust.read_file(path, root, "/etc/fstab") == fstab
