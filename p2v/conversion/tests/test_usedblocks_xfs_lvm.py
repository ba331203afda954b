"""Used blocks of XFS filesystems and of filesystems on linear LVM volumes.

The real case runs xfs_db and fsfreeze on a mounted XFS filesystem of a loop device here, through a
local shell standing in for the SSH session (the commands are the ones sent to a source): a file
written and deleted must come back free, a file still there must not.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from p2v.conversion import disk_layout, usedblocks
from p2v.facts import CommandOutput
from tests.environment import need_binary, need_root

MiB = 1024 * 1024
XFS_DB_OUTPUT = """blocksize = 4096
agblocks = 38400
    agno    agbno      len
       0        6        1
       0     7704    30696
       1       10    38390
   from      to extents  blocks    pct
      1       1      16      16   0.01
  16384   32767       2   52702  40.70
"""


def test_xfs_free_extents_are_counted_from_the_filesystem_start():
    block_size, ranges = usedblocks.parse_xfs_freesp(XFS_DB_OUTPUT)
    assert block_size == 4096
    assert ranges == [(6, 1), (7704, 30696), (38400 + 10, 38390)]  # the histogram rows are not extents


def test_xfs_db_without_a_superblock_answer_is_an_error():
    with pytest.raises(ValueError, match="blocksize/agblocks"):
        usedblocks.parse_xfs_freesp("    agno    agbno      len\n       0        6        1\n")


SEGMENTS = [  # an LV of 3 extents of 4 MiB: LV extents 0-1 at PV extent 10, LV extent 2 at PV extent 2
    {"type": "linear", "start_bytes": 0, "size_bytes": 8 * MiB, "pv": "/dev/sda2", "first_pe": 10},
    {"type": "linear", "start_bytes": 8 * MiB, "size_bytes": 4 * MiB, "pv": "/dev/sda2", "first_pe": 2},
]
for _segment in SEGMENTS:
    _segment["extent_bytes"] = 4 * MiB


def test_lv_ranges_map_onto_the_disk_through_each_segment():
    pv_starts = {"/dev/sda2": 100 * MiB}  # partition start + pe_start
    mapped = usedblocks.map_lv_ranges([(MiB, MiB), (7 * MiB, 2 * MiB)], SEGMENTS, pv_starts)
    assert mapped == [
        (100 * MiB + 40 * MiB + MiB, MiB),
        (100 * MiB + 40 * MiB + 7 * MiB, MiB),  # the range crossing into the second segment is split
        (100 * MiB + 8 * MiB, MiB),
    ]


def test_lv_on_another_disk_or_not_linear_maps_nothing():
    assert usedblocks.map_lv_ranges([(0, MiB)], SEGMENTS, {"/dev/sdb1": 0}) is None
    striped = [{**SEGMENTS[0], "type": "striped"}]
    assert usedblocks.map_lv_ranges([(0, MiB)], striped, {"/dev/sda2": 0}) is None


def local_run(command: str) -> CommandOutput:
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, check=False)
    return CommandOutput(command, done.returncode, done.stdout, done.stderr)


def test_mounted_xfs_reports_a_deleted_files_blocks_free(tmp_path):
    need_root()
    need_binary("mkfs.xfs", "xfs_db", "fsfreeze", "losetup")
    image = tmp_path / "xfs.img"
    with image.open("wb") as handle:
        handle.truncate(400 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True, timeout=120)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with disk_layout.loop_device(str(image), 0, None) as loop:
        subprocess.run(["mount", "-t", "xfs", loop, str(mountpoint)], check=True, timeout=60)
        try:
            kept, deleted = os.urandom(20 * MiB), os.urandom(60 * MiB)
            (mountpoint / "kept").write_bytes(kept)
            (mountpoint / "deleted").write_bytes(deleted)
            subprocess.run(["sync"], check=True)
            (mountpoint / "deleted").unlink()
            disk = {
                "name": "loopdisk",
                "path": "/dev/loopdisk",
                "type": "disk",
                "partitions": [
                    {"name": "p1", "path": loop, "type": "part", "fstype": "xfs", "start_bytes": 0,
                     "size_bytes": 400 * MiB, "children": []}
                ],
            }  # fmt: skip
            free = usedblocks.free_space(local_run, disk, [{"device": loop, "mountpoint": str(mountpoint)}])
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True, timeout=60)
        image_bytes = image.read_bytes()
    assert free.notes == [f"{loop} (xfs): {free.free_bytes} bytes free, not sent"]
    assert 300 * MiB < free.free_bytes < 380 * MiB  # 400 MiB less the kept file and metadata
    kept_at = image_bytes.find(kept[: 64 * 1024])
    assert kept_at >= 0
    assert not any(a < kept_at + len(kept) and kept_at < a + n for a, n in free.ranges), (
        "kept file marked free"
    )
    deleted_at = image_bytes.find(deleted[: 64 * 1024])
    assert deleted_at >= 0  # its bytes are still on the disk...
    inside = sum(max(0, min(a + n, deleted_at + len(deleted)) - max(a, deleted_at)) for a, n in free.ranges)
    assert inside == len(deleted)  # ...and all of them are reported free
