"""Finding the copied root on a linear LVM volume without device-mapper, and adjusting an XFS root.

The disk is built like a real server's (MBR, partition 1 ext4 /boot, partition 2 an LVM PV with
vg0/root XFS and vg0/swap), with `lvm --driverloaded n` on a loop device, as the conversion host
has no device-mapper. The adjust stage must find the root by its UUID through the LVM metadata,
write the NIC rule into the XFS root, and leave the rest as it was.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from p2v.conversion import adjust, disk_layout
from tests.environment import need_binary, need_root

MiB = 1024 * 1024
PV_OFFSET = 33 * MiB
NICS = [{"name": "ens4", "mac": "52:54:00:aa:bb:02"}]


def _lvm(loop: str, *args: str) -> str:
    config = "devices { use_devicesfile=0 } activation { udev_sync=0 udev_rules=0 }"
    argv = ["lvm", args[0], "--driverloaded", "n", "--devices", loop, "--config", config, *args[1:]]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture
def lvm_disk(tmp_path):
    """(image path, root UUID, root byte offset) of a 512 MiB disk with an LVM + XFS root."""
    need_root()
    need_binary("lvm", "mkfs.xfs", "mkfs.ext4", "losetup", "sfdisk", "blkid")
    path = tmp_path / "disk.raw"
    with path.open("wb") as handle:
        handle.truncate(512 * MiB)
    table = f"label: dos\nstart=2048, size={32 * MiB // 512}, type=83\nstart={PV_OFFSET // 512}, type=8e\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table.encode(), check=True, timeout=30)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", str(path), f"{32 * 1024}k"], check=True, timeout=60
    )
    root_uuid = str(uuid.uuid4())
    with disk_layout.loop_device(str(path), PV_OFFSET, None) as loop:
        _lvm(loop, "pvcreate", "-ff", "-y", loop)
        _lvm(loop, "vgcreate", "-y", "vg0", loop)
        _lvm(loop, "lvcreate", "-an", "-Zn", "-y", "-L", "64m", "-n", "swap", "vg0")  # root not at extent 0
        _lvm(loop, "lvcreate", "-an", "-Zn", "-y", "-L", "320m", "-n", "root", "vg0")
        pv = json.loads(
            _lvm(loop, "pvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "pe_start")
        )
        pe_start = int(pv["report"][0]["pv"][0]["pe_start"])
    root_offset = PV_OFFSET + pe_start + 64 * MiB  # independent arithmetic: swap takes the first 64 MiB
    with disk_layout.loop_device(str(path), root_offset, 320 * MiB) as loop:
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", f"uuid={root_uuid}", loop], check=True, timeout=120)
    location = disk_layout.FilesystemLocation(str(path), root_offset, 320 * MiB, "xfs", root_uuid, "test", 2)
    adjust.write_guest_file(location, "/etc/fstab", "/dev/mapper/vg0-root / xfs defaults 0 1\n")
    return str(path), root_uuid, root_offset


def test_linear_lv_offsets_from_the_lvm_report():
    pvs = [{"pv_name": "/dev/loop7", "pe_start": "1048576"}]
    lvs = [
        {"vg_name": "vg0", "lv_name": "root", "segtype": "linear", "seg_size": "8388608",
         "seg_pe_ranges": "/dev/loop7:3-4", "vg_extent_size": "4194304"},
        {"vg_name": "vg0", "lv_name": "data", "segtype": "striped", "seg_size": "8388608",
         "seg_pe_ranges": "/dev/loop7:5-5 /dev/loop8:0-0", "vg_extent_size": "4194304"},
        {"vg_name": "vg0", "lv_name": "split", "segtype": "linear", "seg_size": "4194304",
         "seg_pe_ranges": "/dev/loop7:6-6", "vg_extent_size": "4194304"},
        {"vg_name": "vg0", "lv_name": "split", "segtype": "linear", "seg_size": "4194304",
         "seg_pe_ranges": "/dev/loop7:9-9", "vg_extent_size": "4194304"},
    ]  # fmt: skip
    volumes = {lv.name: lv for lv in disk_layout.parse_logical_volumes(pvs, lvs, "/dev/loop7")}
    assert volumes["root"].offset_bytes == MiB + 3 * 4 * MiB
    assert volumes["root"].size_bytes == 8 * MiB
    assert not volumes["data"].linear
    assert not volumes["split"].linear  # two segments: not one byte range
    assert volumes["split"].segment_types == ("linear", "linear")


def test_root_on_lvm_xfs_is_found_by_uuid_and_adjusted(lvm_disk):
    path, root_uuid, root_offset = lvm_disk
    facts = {
        "kernel": {"virtio_modules": ["virtio_blk", "virtio_pci", "virtio_net"]},
        "filesystems": [
            {"device": "/dev/mapper/vg0-root", "mountpoint": "/", "fstype": "xfs", "uuid": root_uuid}
        ],
    }
    location = disk_layout.find_root_filesystem([path], facts)
    assert (location.offset_bytes, location.fstype, location.uuid, location.lv) == (
        root_offset,
        "xfs",
        root_uuid,
        "vg0/root",
    )
    changes = adjust.adjust_guest([path], facts, NICS)
    assert [c.path for c in changes] == [adjust.UDEV_RULES_PATH]  # fstab by /dev/mapper: left alone
    assert "LVM vg0/root" in changes[0].summary
    # Read back independently of the product: the XFS filesystem's own view through xfs_db.
    with disk_layout.loop_device(path, root_offset, 320 * MiB, read_only=True) as loop:
        dump = subprocess.run(
            ["xfs_db", "-r", "-c", "ls /etc/udev/rules.d", loop], capture_output=True, text=True, timeout=60
        )
    assert "70-p2v-net-names.rules" in dump.stdout, dump.stdout + dump.stderr
    assert 'NAME="ens4"' in adjust.read_guest_file(location, adjust.UDEV_RULES_PATH)
    assert adjust.read_guest_file(location, "/etc/fstab") == "/dev/mapper/vg0-root / xfs defaults 0 1\n"
    assert adjust.adjust_guest([path], facts, NICS) == []  # nothing left to do


def test_root_without_a_matching_uuid_is_found_by_its_fstab(lvm_disk):
    path, root_uuid, _ = lvm_disk
    location = disk_layout.find_root_filesystem([path], {"filesystems": []})
    assert (location.uuid, location.lv) == (root_uuid, "vg0/root")


def test_no_root_names_what_was_looked_at(tmp_path):
    need_binary("sfdisk", "mkfs.ext4", "blkid")
    path = tmp_path / "empty.raw"
    with path.open("wb") as handle:
        handle.truncate(40 * MiB)
    subprocess.run(
        ["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, type=83\n", check=True, timeout=30
    )
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", str(path), f"{39 * 1024}k"], check=True)
    with pytest.raises(
        adjust.AdjustError, match=r"no root filesystem .* looked at: empty.raw partition 1 \(ext4\)"
    ):
        disk_layout.find_root_filesystem([str(path)], {"filesystems": [{"mountpoint": "/", "uuid": "nope"}]})
