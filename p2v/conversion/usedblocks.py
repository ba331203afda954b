"""Which byte ranges of a source disk its filesystems hold free, so the copy neither reads nor sends
them: a deleted file's blocks still hold its bytes, and a non-zero-block copy would carry them.

ext2/3/4 from the source's own e2fsprogs: `dumpe2fs` lists each block group's free blocks from
the on-disk bitmaps. XFS from xfsprogs: `xfs_db -r -c "freesp -d"` lists every free extent of
each allocation group's free-space btree. Those lag behind a mounted filesystem (ext4 keeps
recent allocations in its journal until a checkpoint), so a mounted filesystem is first frozen and
thawed at once (`fsfreeze -f` then `-u`: the kernel writes the journal back to its final place,
bitmaps and free-space btrees included), and only then read. A filesystem that cannot be frozen
or read is copied as before (non-zero blocks). Blocks the source allocates after this moment are
a live copy's usual risk.

Both on partitions and on linear LVM volumes (the LV's ranges are mapped onto the disk through
its segments, from `lvs`/`pvs` on the source at copy time). Other filesystems (FAT, btrfs, swap...),
non-linear volumes and space outside them keep the non-zero-block copy.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable

from p2v.facts import CMD_LVS, CMD_PVS, CommandOutput, FactsParseError, iter_devices, parse_lvs

EXT_FSTYPES = ("ext2", "ext3", "ext4")
FREE_SPACE_FSTYPES = (*EXT_FSTYPES, "xfs")
# One argv string on Linux is at most 128 KiB: keep the largest free ranges if a filesystem is
# that fragmented (sending a free block is harmless, skipping a used one never happens).
MAX_RANGES = 4000
FREE_RE = re.compile(r"^\s*Free blocks: (.*)$")
GROUP_RE = re.compile(r"^Group \d+:")


@dataclasses.dataclass
class FreeSpace:
    ranges: list[tuple[int, int]]  # (disk offset, length) in bytes, sorted
    notes: list[str]  # per filesystem: what was found, or why it keeps the non-zero copy

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.ranges)


def parse_dumpe2fs_free(text: str) -> tuple[int, list[tuple[int, int]]]:
    """`dumpe2fs` output → (block size, [(first block, count)]) of the free blocks of every group."""
    block_size = None
    ranges: list[tuple[int, int]] = []
    for line in text.splitlines():
        if line.startswith("Block size:"):
            block_size = int(line.split(":", 1)[1])
            continue
        match = FREE_RE.match(line)
        if not match or not line.startswith("  "):  # the header's "Free blocks: N" is a count
            continue
        for part in match.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            first, _, last = part.partition("-")
            start, end = int(first), int(last or first)
            ranges.append((start, end - start + 1))
    if block_size is None:
        raise ValueError("dumpe2fs printed no 'Block size:' line")
    return block_size, ranges


XFS_FREESP_ROW_RE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$")


def parse_xfs_freesp(text: str) -> tuple[int, list[tuple[int, int]]]:
    """`xfs_db -r -c "sb 0" -c "p blocksize agblocks" -c "freesp -d"` → (block size, [(first block
    counted from the filesystem's start, count)]) of every free extent in every allocation group."""
    values = dict(re.findall(r"^(blocksize|agblocks) = (\d+)$", text, re.MULTILINE))
    if "blocksize" not in values or "agblocks" not in values:
        raise ValueError("xfs_db printed no blocksize/agblocks")
    block_size, ag_blocks = int(values["blocksize"]), int(values["agblocks"])
    ranges = []
    for line in text.splitlines():
        match = XFS_FREESP_ROW_RE.match(line)
        if match:  # agno agbno len (the histogram after them has 5 columns)
            agno, agbno, length = (int(g) for g in match.groups())
            ranges.append((agno * ag_blocks + agbno, length))
    return block_size, ranges


def _flush_journal(run: Callable[[str], CommandOutput], mountpoint: str) -> CommandOutput:
    """Freeze and thaw at once: the kernel writes the journal/log back to its final place, so the
    on-disk free-space maps are current when read next."""
    quoted = shlex.quote(mountpoint)
    return run(f"sync && fsfreeze -f {quoted}; status=$?; fsfreeze -u {quoted} 2>/dev/null; exit $status")


def _fs_free_blocks(
    run: Callable[[str], CommandOutput], path: str, fstype: str, mountpoint: str | None
) -> tuple[list[tuple[int, int]], str | None]:
    """(free byte ranges counted from the filesystem's start, None) or ([], why not)."""
    if mountpoint:
        frozen = _flush_journal(run, mountpoint)
        if frozen.exit_status != 0:
            return [], f"could not flush its journal ({frozen.first_error_line})"
    quoted = shlex.quote(path)
    if fstype in EXT_FSTYPES:
        dump = run(f"dumpe2fs {quoted} 2>/dev/null")
        if dump.exit_status != 0:
            return [], f"dumpe2fs failed ({dump.first_error_line})"
        try:
            block_size, blocks = parse_dumpe2fs_free(dump.stdout)
        except ValueError as exc:
            return [], str(exc)
    else:
        # The block device's page cache may hold blocks read before the flush: drop it first.
        dump = run(
            f"blockdev --flushbufs {quoted} 2>/dev/null; "
            f'xfs_db -r -c "sb 0" -c "p blocksize agblocks" -c "freesp -d" {quoted}'
        )
        if dump.exit_status != 0:
            return [], f"xfs_db failed ({dump.first_error_line})"
        try:
            block_size, blocks = parse_xfs_freesp(dump.stdout)
        except ValueError as exc:
            return [], str(exc)
    return [(b * block_size, n * block_size) for b, n in blocks], None


def _partition_start(run: Callable[[str], CommandOutput], device: dict) -> int | None:
    if device.get("start_bytes") is not None:
        return device["start_bytes"]
    name = device["path"].rsplit("/", 1)[-1]
    answer = run(f"cat /sys/class/block/{shlex.quote(name)}/start")
    if answer.exit_status != 0 or not answer.stdout.strip().isdigit():
        return None
    return int(answer.stdout.strip()) * 512


def map_lv_ranges(
    ranges: list[tuple[int, int]], segments: list[dict], pv_starts: dict[str, int]
) -> list[tuple[int, int]] | None:
    """Byte ranges inside an LV → the same bytes on the disk, through its linear segments.

    pv_starts: each PV on this disk → where its extent 0 lies on the disk (partition start +
    pe_start). None when a segment is not linear or not on this disk (nothing is mapped then)."""
    placed = []
    for seg in segments:
        if seg.get("type") != "linear" or seg.get("pv") not in pv_starts:
            return None
        disk_at = pv_starts[seg["pv"]] + seg["first_pe"] * seg["extent_bytes"]
        placed.append((seg["start_bytes"], seg["start_bytes"] + seg["size_bytes"], disk_at))
    mapped = []
    for start, length in ranges:
        end = start + length
        for seg_start, seg_end, disk_at in placed:
            a, b = max(start, seg_start), min(end, seg_end)
            if a < b:
                mapped.append((disk_at + a - seg_start, b - a))
    return mapped


def free_space(run: Callable[[str], CommandOutput], disk: dict, filesystems: list[dict]) -> FreeSpace:
    """The free byte ranges of `disk` (a facts disk) that its ext2/3/4 and XFS filesystems report,
    on partitions and on linear LVM volumes whose PV is a partition of this disk."""
    mounted = {fs["device"]: fs["mountpoint"] for fs in filesystems}
    ranges: list[tuple[int, int]] = []
    notes: list[str] = []
    lvm_layout: dict | None = None
    pv_starts: dict[str, int] = {}
    for device in iter_devices([disk]):
        if device is disk or device.get("fstype") not in FREE_SPACE_FSTYPES:
            continue
        path = device["path"]
        if device.get("type") == "part":
            start = _partition_start(run, device)
            if start is None:
                notes.append(f"{path}: partition start unknown, non-zero blocks copied")
                continue
            own, why = _fs_free_blocks(run, path, device["fstype"], mounted.get(path))
            if why:
                notes.append(f"{path}: {why}; non-zero blocks copied")
                continue
            size = device.get("size_bytes") or 0
            own = [(start + a, n) for a, n in own if a + n <= size]
        elif device.get("type") == "lvm":
            if lvm_layout is None:
                lvm_layout, pv_starts = _lvm_layout(run, disk)
            lv = next(
                (
                    lv
                    for lv in lvm_layout.get("logical_volumes", [])
                    if path in (lv.get("dm_path"), lv.get("path"))
                ),
                None,
            )
            if lv is None:
                notes.append(f"{path}: LVM layout unknown (lvs), non-zero blocks copied")
                continue
            if map_lv_ranges([], lv["segments"], pv_starts) is None:
                notes.append(f"{path}: not a linear volume on this disk, non-zero blocks copied")
                continue
            own, why = _fs_free_blocks(run, path, device["fstype"], mounted.get(path))
            if why:
                notes.append(f"{path}: {why}; non-zero blocks copied")
                continue
            size = device.get("size_bytes") or 0
            own = map_lv_ranges([(a, n) for a, n in own if a + n <= size], lv["segments"], pv_starts) or []
        else:
            continue
        notes.append(f"{path} ({device['fstype']}): {sum(n for _, n in own)} bytes free, not sent")
        ranges += own
    ranges.sort()
    if len(ranges) > MAX_RANGES:
        ranges = sorted(sorted(ranges, key=lambda r: -r[1])[:MAX_RANGES])
    return FreeSpace(ranges, notes)


def _lvm_layout(run: Callable[[str], CommandOutput], disk: dict) -> tuple[dict, dict[str, int]]:
    """The source's LVM layout now (not the assessment's: volumes may have moved), and where each PV
    that is a partition of `disk` has its extent 0 on the disk."""
    lvs, pvs = run(CMD_LVS), run(CMD_PVS)
    if lvs.exit_status != 0 or pvs.exit_status != 0:
        return {}, {}
    try:
        layout = parse_lvs(lvs.stdout, pvs.stdout)
    except FactsParseError:
        return {}, {}
    partitions = {d["path"]: d for d in iter_devices([disk]) if d.get("type") == "part"}
    pv_starts = {}
    for pv in layout["physical_volumes"]:
        part = partitions.get(pv["device"])
        start = _partition_start(run, part) if part else None
        if start is not None:
            pv_starts[pv["device"]] = start + pv["pe_start_bytes"]
    return layout, pv_starts
