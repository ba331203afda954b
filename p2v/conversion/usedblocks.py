"""Which byte ranges of a source disk its filesystems hold free, so the copy neither reads nor sends
them: a deleted file's blocks still hold its bytes, and a non-zero-block copy would carry them.

ext2/3/4 only, from the source's own e2fsprogs: `dumpe2fs` lists each block group's free blocks from
the on-disk bitmaps. Those lag behind a mounted filesystem (ext4 keeps recent allocations in its
journal until a checkpoint), so a mounted filesystem is first frozen and thawed at once
(`fsfreeze -f` then `-u`: the kernel writes the journal back to its final place, bitmaps
included), and only then read. A filesystem that cannot be frozen or read is copied as before
(non-zero blocks). Blocks the source allocates after this moment are a live copy's usual risk.

Other filesystems (XFS, FAT, swap...) and space outside partitions keep the non-zero-block copy.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable

from p2v.facts import CommandOutput, iter_devices

EXT_FSTYPES = ("ext2", "ext3", "ext4")
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


def free_space(run: Callable[[str], CommandOutput], disk: dict, filesystems: list[dict]) -> FreeSpace:
    """The free byte ranges of `disk` (a facts disk) that its ext filesystems report."""
    mounted = {fs["device"]: fs["mountpoint"] for fs in filesystems}
    ranges: list[tuple[int, int]] = []
    notes: list[str] = []
    for device in iter_devices([disk]):
        if device is disk or device.get("fstype") not in EXT_FSTYPES or device.get("type") != "part":
            continue
        path = device["path"]
        start = device.get("start_bytes")
        if start is None:
            name = path.rsplit("/", 1)[-1]
            answer = run(f"cat /sys/class/block/{shlex.quote(name)}/start")
            if answer.exit_status != 0 or not answer.stdout.strip().isdigit():
                notes.append(f"{path}: partition start unknown, non-zero blocks copied")
                continue
            start = int(answer.stdout.strip()) * 512
        mountpoint = mounted.get(path)
        if mountpoint:
            quoted = shlex.quote(mountpoint)
            frozen = run(
                f"sync && fsfreeze -f {quoted}; status=$?; fsfreeze -u {quoted} 2>/dev/null; exit $status"
            )
            if frozen.exit_status != 0:
                notes.append(
                    f"{path}: could not flush its journal ({frozen.first_error_line}); non-zero blocks copied"
                )
                continue
        dump = run(f"dumpe2fs {shlex.quote(path)} 2>/dev/null")
        if dump.exit_status != 0:
            notes.append(f"{path}: dumpe2fs failed ({dump.first_error_line}); non-zero blocks copied")
            continue
        try:
            block_size, blocks = parse_dumpe2fs_free(dump.stdout)
        except ValueError as exc:
            notes.append(f"{path}: {exc}; non-zero blocks copied")
            continue
        size = device.get("size_bytes") or 0
        own = [(start + b * block_size, n * block_size) for b, n in blocks if (b + n) * block_size <= size]
        notes.append(f"{path} ({device['fstype']}): {sum(n for _, n in own)} bytes free, not sent")
        ranges += own
    ranges.sort()
    if len(ranges) > MAX_RANGES:
        ranges = sorted(sorted(ranges, key=lambda r: -r[1])[:MAX_RANGES])
    return FreeSpace(ranges, notes)
