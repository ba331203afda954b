"""Where the guest's filesystems lie inside the copied raw disks: partitions, and linear LVM volumes.

The conversion host's kernel has no device-mapper (PLATFORM-NOTES), so an LVM volume cannot be
activated here. Its place is read instead from the LVM metadata on the copied PV: `lvm` with
`--driverloaded n`, restricted to one loop device over that partition (`--devices`), reports each
volume's segments and the PV's data start. A linear volume of one segment is then a plain byte
range of the disk image, which e2fsprogs (`image?offset=`), blkid (`-O`) and a loop device
(`--offset/--sizelimit`) reach directly. Striped, mirrored, thin or cached volumes and linear ones
split in several segments are reported, not located.

`find_root_filesystem` is the one entry point other stages use (adjust, initramfs rebuild).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .adjust import AdjustError, VolumePartition, read_guest_file, volume_partitions
from .adjust import _run as run_tool

LVM_CONFIG = "devices { use_devicesfile=0 } activation { udev_sync=0 udev_rules=0 }"


@dataclasses.dataclass(frozen=True)
class FilesystemLocation:
    """A filesystem as a byte range of one copied disk image."""

    volume: str  # path of the raw disk image
    offset_bytes: int
    size_bytes: int | None
    fstype: str | None
    uuid: str | None
    where: str  # for messages: "partition 2" or "LVM vg0/root on partition 2"
    partition_number: int  # the partition holding it (for an LV: its PV's partition)
    lv: str | None = None  # "vg/lv" when the filesystem is on a logical volume

    def as_partition(self) -> VolumePartition:
        """The same place in the shape the ext2/3/4 helpers (debugfs at an offset) take."""
        return VolumePartition(
            self.partition_number, self.offset_bytes, self.fstype, self.uuid, self.size_bytes
        )


@dataclasses.dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    segment_types: tuple[str, ...]
    offset_bytes: int | None  # inside the PV partition; None when not one linear segment on it
    size_bytes: int

    @property
    def linear(self) -> bool:
        return self.offset_bytes is not None


@contextlib.contextmanager
def loop_device(volume: str, offset: int, size: int | None, read_only: bool = False) -> Iterator[str]:
    """A loop device over a byte range of an image; detached afterwards (by its own name)."""
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    loop = run_tool([*argv, volume]).strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)


def _lvm_report(loop: str, command: str, fields: str, kind: str) -> list[dict]:
    out = run_tool(
        [
            "lvm",
            command,
            "--driverloaded",
            "n",
            "--devices",
            loop,
            "--config",
            LVM_CONFIG,
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ]
    )
    try:
        return [row for report in json.loads(out)["report"] for row in report[kind]]
    except (ValueError, KeyError, TypeError) as exc:
        raise AdjustError(f"`lvm {command}` printed an unexpected report ({exc}): {out[:200]!r}") from exc


def parse_logical_volumes(pv_rows: list[dict], lv_rows: list[dict], pv_device: str) -> list[LogicalVolume]:
    """`pvs`/`lvs` report rows (one per LV segment) → the volumes, each located when it is one linear
    segment on `pv_device`. Pure, so the extent arithmetic is tested without LVM."""
    pe_start = next((int(row["pe_start"]) for row in pv_rows if row.get("pv_name") == pv_device), None)
    by_name: dict[tuple[str, str], list[dict]] = {}
    for row in lv_rows:
        by_name.setdefault((row["vg_name"], row["lv_name"]), []).append(row)
    volumes = []
    for (vg, name), segments in by_name.items():
        types = tuple(row["segtype"] for row in segments)
        size = sum(int(row["seg_size"]) for row in segments)
        offset = None
        ranges = segments[0].get("seg_pe_ranges", "").split()
        if types == ("linear",) and pe_start is not None and len(ranges) == 1:
            device, _, extents = ranges[0].rpartition(":")
            if device == pv_device:
                first_pe = int(extents.split("-")[0])
                offset = pe_start + first_pe * int(segments[0]["vg_extent_size"])
        volumes.append(LogicalVolume(vg, name, types, offset, size))
    return volumes


def logical_volumes(volume: str, part: VolumePartition) -> list[LogicalVolume]:
    """The LVs whose PV is this partition of the copied disk (read from its LVM metadata)."""
    with loop_device(volume, part.offset_bytes, part.size_bytes, read_only=True) as loop:
        pvs = _lvm_report(loop, "pvs", "pv_name,pe_start", "pv")
        lvs = _lvm_report(loop, "lvs", "vg_name,lv_name,segtype,seg_size,seg_pe_ranges,vg_extent_size", "lv")
    return parse_logical_volumes(pvs, lvs, loop)


def _probe(volume: str, offset: int) -> dict[str, str]:
    done = subprocess.run(
        ["blkid", "-p", "-O", str(offset), "-o", "export", volume],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def filesystems(volumes: list[str]) -> tuple[list[FilesystemLocation], list[str]]:
    """Every filesystem on the copied disks (partitions and located LVs), and notes on LVs that could
    not be located (non-linear, several segments, metadata unreadable)."""
    found: list[FilesystemLocation] = []
    notes: list[str] = []
    for volume in volumes:
        for part in volume_partitions(volume):
            where = f"{Path(volume).name} partition {part.number}"
            if part.fstype != "LVM2_member":
                found.append(
                    FilesystemLocation(
                        volume, part.offset_bytes, part.size_bytes, part.fstype, part.uuid, where, part.number
                    )
                )
                continue
            try:
                lvs = logical_volumes(volume, part)
            except AdjustError as exc:
                notes.append(f"{where}: LVM metadata unreadable: {exc}")
                continue
            for lv in lvs:
                label = f"LVM {lv.vg}/{lv.name} on {where}"
                if not lv.linear:
                    notes.append(
                        f"{label}: {'+'.join(lv.segment_types)} volume, not reachable without device-mapper"
                    )
                    continue
                offset = part.offset_bytes + lv.offset_bytes
                probe = _probe(volume, offset)
                fstype, uuid = probe.get("TYPE"), probe.get("UUID")
                lv_name = f"{lv.vg}/{lv.name}"
                found.append(
                    FilesystemLocation(
                        volume, offset, lv.size_bytes, fstype, uuid, label, part.number, lv_name
                    )
                )
    return found, notes


def find_root_filesystem(volumes: list[str], facts: dict) -> FilesystemLocation:
    """The copied root filesystem: by the assessed root UUID, else the one whose /etc/fstab mounts /.

    AdjustError names what was looked at when none is found (with the LVs that could not be read)."""
    root_fs = next((fs for fs in facts.get("filesystems") or [] if fs.get("mountpoint") == "/"), None)
    root_uuid = ((root_fs or {}).get("uuid") or "").lower()
    found, notes = filesystems(volumes)
    if root_uuid:
        for location in found:
            if (location.uuid or "").lower() == root_uuid:
                return location
    for location in found:
        if location.fstype not in ("ext2", "ext3", "ext4", "xfs"):
            continue
        try:
            fstab = read_guest_file(location, "/etc/fstab")
        except AdjustError:
            continue
        if fstab is not None and any(
            len(fields) > 1 and fields[1] == "/" and not fields[0].startswith("#")
            for fields in (line.split() for line in fstab.splitlines())
        ):
            return location
    seen = ", ".join(f"{f.where} ({f.fstype or 'no filesystem'})" for f in found) or "none"
    raise AdjustError(
        f"no root filesystem (assessed UUID {root_uuid or 'unknown'}) found on the copied disks; "
        f"looked at: {seen}" + (f"; not reachable: {'; '.join(notes)}" if notes else "")
    )
