"""Guest changes a Linux machine needs to boot on virtio hardware and keep its network identity.

Done on the host side, on the copied volume, never in an emulated VM and never on the source
(PLATFORM-NOTES: an initramfs rebuild inside TCG takes many minutes). Only what the assessment
shows is needed, and each change is recorded:

- /etc/fstab entries naming a disk by kernel name (/dev/sda2 becomes /dev/vda2 on virtio) are
  rewritten to `UUID=`, with the UUID read from the copied filesystem itself;
- every physical NIC's name is pinned to its MAC with a udev rule (a NIC moved to virtio gets a
  new name otherwise);
- the virtio drivers must be available to the guest's early boot: if the assessment says the
  kernel lacks them, the conversion stops with the reason; if the kernel has them but the initramfs
  that boots does not (a host-only initramfs), the guest's own update-initramfs/dracut rebuilds it
  natively in a sandbox (initramfs.py). A rebuild that cannot run or fails is logged with its
  reason and the conversion goes on: the verification decides whether the VM boots.

Filesystems are edited in place inside the raw volume with e2fsprogs' debugfs at the partition's
offset (`image?offset=N`), so no loop device or mount is needed. An XFS root is mounted through a
loop device at its offset (the host kernel has XFS). The root may sit on a partition or on a
linear LVM volume, located from the copied PV's metadata (p2v.conversion.disk_layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from p2v.facts import initramfs_has_virtio_disk_driver

from . import initramfs

REQUIRED_VIRTIO_MODULES = ("virtio_blk", "virtio_pci", "virtio_net")
KERNEL_DISK_NAME_RE = re.compile(
    r"^/dev/(?:(?:sd|hd|vd|xvd)(?P<letters>[a-z]+)(?P<part>\d+)|"
    r"nvme(?P<nvme>\d+)n1p(?P<npart>\d+))$"
)
EXT_FSTYPES = ("ext2", "ext3", "ext4")
UDEV_RULES_PATH = "/etc/udev/rules.d/70-p2v-net-names.rules"
NIC_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class AdjustError(RuntimeError):
    """A needed guest change cannot be made (names what and why)."""


@dataclasses.dataclass(frozen=True)
class Change:
    path: str
    summary: str
    before: str | None
    after: str
    # False: a change the guest should get that could not be written; `reason` says why. The VM
    # boots without it (adjust_guest fails the stage otherwise) and the verification decides.
    applied: bool = True
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class VolumePartition:
    number: int
    offset_bytes: int
    fstype: str | None
    uuid: str | None
    size_bytes: int | None = None


def _run(argv: list[str], timeout_s: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise AdjustError(
            f"`{' '.join(argv[:3])} ...` failed ({done.returncode}): {done.stderr.strip()[:300]}"
        )
    return done.stdout


def volume_partitions(volume_path: str) -> list[VolumePartition]:
    """The partitions of a raw disk image with each one's filesystem type and UUID (blkid)."""
    done = subprocess.run(
        ["sfdisk", "--json", volume_path], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0 or not done.stdout.strip():
        return []  # no partition table: nothing here this module knows how to edit
    table = json.loads(done.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    result = []
    for number, part in enumerate(table.get("partitions", []), start=1):
        offset = part["start"] * sector
        probe = subprocess.run(
            ["blkid", "-p", "-O", str(offset), "-o", "export", volume_path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        fields = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
        result.append(
            VolumePartition(number, offset, fields.get("TYPE"), fields.get("UUID"), part["size"] * sector)
        )
    return result


def _debugfs(volume_path: str, offset: int, commands: str, write: bool = False) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
        script.write(commands)
        script.flush()
        argv = ["debugfs", *(["-w"] if write else []), "-f", script.name, f"{volume_path}?offset={offset}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AdjustError(f"debugfs on {volume_path} at offset {offset} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def read_file(volume_path: str, partition: VolumePartition, path: str) -> str | None:
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", f"{volume_path}?offset={partition.offset_bytes}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "File not found" in out.stderr or out.returncode != 0:
        return None
    return out.stdout


def write_file(volume_path: str, partition: VolumePartition, path: str, content: str) -> None:
    """Replace (or create) `path` in the ext filesystem, creating missing parent directories."""
    with tempfile.NamedTemporaryFile("w", suffix=".p2v") as local:
        local.write(content)
        local.flush()
        Path(local.name).chmod(0o644)
        parents = [str(p) for p in reversed(Path(path).parents) if str(p) != "/"]
        commands = "".join(f"mkdir {p}\n" for p in parents) + f"rm {path}\nwrite {local.name} {path}\n"
        _debugfs(volume_path, partition.offset_bytes, commands, write=True)
    if read_file(volume_path, partition, path) != content:
        raise AdjustError(f"wrote {path} into the guest, but reading it back gave something else")


E2FSCK_FIXED_MAX = 2  # e2fsck: 0 clean, 1 errors corrected, 2 corrected (reboot); 4 and up: not fixed


def repair_filesystems(volumes: list[str]) -> list[str]:
    """Make every copied ext2/3/4 filesystem consistent before anything edits it; what was done.

    A disk copied while the source runs is not a point-in-time image: its journal still holds
    transactions (needs_recovery) and blocks were read at different moments. Editing it with
    debugfs first would be undone by the journal replay at boot; a guest whose fsck finds the
    mismatch stops in emergency mode. e2fsck on the copy (never the source) replays the journal and
    repairs what the copy tore. A filesystem e2fsck cannot repair fails the stage with its output.
    """
    notes = []
    for volume in volumes:
        for part in volume_partitions(volume):
            if part.fstype not in EXT_FSTYPES:
                continue
            # A loop device at the partition's offset: e2fsck re-opens the filesystem after replaying
            # the journal and loses a `file?offset=` option on the way (Bad magic number).
            loop = _run(
                [
                    "losetup",
                    "--find",
                    "--show",
                    "--offset",
                    str(part.offset_bytes),
                    "--sizelimit",
                    str(part.size_bytes),
                    volume,
                ]
            ).strip()
            try:
                done = subprocess.run(
                    ["e2fsck", "-f", "-y", loop], capture_output=True, text=True, timeout=900, check=False
                )
            finally:
                subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)
            where = f"{Path(volume).name} partition {part.number} ({part.fstype} {part.uuid})"
            if done.returncode > E2FSCK_FIXED_MAX:
                raise AdjustError(
                    f"e2fsck could not repair the copied {where} (exit {done.returncode}): "
                    f"{(done.stdout + done.stderr).strip()[-400:]}"
                )
            if done.returncode:
                notes.append(
                    f"{where}: journal replayed and repaired on the copy (e2fsck exit {done.returncode})"
                )
            else:
                notes.append(f"{where}: clean")
    return notes


def find_root(volumes: list[str], facts: dict):
    """The copied root filesystem (p2v.conversion.disk_layout.FilesystemLocation): on a partition or
    a linear LVM volume, by the assessed UUID first."""
    from .disk_layout import find_root_filesystem  # disk_layout builds on this module's helpers

    return find_root_filesystem(volumes, facts)


@contextlib.contextmanager
def _mounted_xfs(location, read_only: bool) -> Iterator[Path]:
    """The XFS filesystem at `location` mounted on a private directory through a loop device.

    Read-write mounts replay a log the live copy left dirty (as e2fsck does for ext4); a read-only
    look skips the replay (norecovery) so it never changes the copy."""
    from .disk_layout import loop_device

    with (
        loop_device(location.volume, location.offset_bytes, location.size_bytes, read_only=read_only) as loop,
        tempfile.TemporaryDirectory(prefix="p2v-adjust-") as directory,
    ):
        options = "ro,norecovery" if read_only else "rw"
        _run(["mount", "-t", "xfs", "-o", options, loop, directory])
        try:
            yield Path(directory)
        finally:
            _run(["umount", directory])


def _inside(root: Path, path: str) -> Path:
    target = (root / path.lstrip("/")).resolve()
    if root.resolve() not in target.parents:
        raise AdjustError(f"{path} resolves outside the guest's root filesystem")
    return target


def read_guest_file(location, path: str) -> str | None:
    """A file of the guest's filesystem at `location` (ext2/3/4 or XFS); None when it does not exist."""
    if location.fstype in EXT_FSTYPES:
        return read_file(location.volume, location.as_partition(), path)
    if location.fstype == "xfs":
        with _mounted_xfs(location, read_only=True) as root:
            target = _inside(root, path)
            return target.read_text() if target.is_file() else None
    raise AdjustError(f"cannot read {path} from {location.where}: {location.fstype} is not ext2/3/4 or xfs")


def write_guest_file(location, path: str, content: str) -> None:
    """Replace (or create, with parent directories) a file of the guest's filesystem at `location`."""
    if location.fstype in EXT_FSTYPES:
        write_file(location.volume, location.as_partition(), path, content)
        return
    if location.fstype != "xfs":
        raise AdjustError(
            f"cannot write {path} on {location.where}: {location.fstype} is not ext2/3/4 or xfs"
        )
    with _mounted_xfs(location, read_only=False) as root:
        target = _inside(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o644)
        if target.read_text() != content:
            raise AdjustError(f"wrote {path} into the guest, but reading it back gave something else")


def _uuid_for_device(device: str, volumes: list[str]) -> str | None:
    match = KERNEL_DISK_NAME_RE.match(device)
    if not match:
        return None
    if match.group("letters"):
        disk_index = 0
        for letter in match.group("letters"):
            disk_index = disk_index * 26 + (ord(letter) - ord("a") + 1)
        disk_index -= 1
        part_number = int(match.group("part"))
    else:
        disk_index, part_number = int(match.group("nvme")), int(match.group("npart"))
    if disk_index >= len(volumes):
        return None
    part = next((p for p in volume_partitions(volumes[disk_index]) if p.number == part_number), None)
    return part.uuid if part else None


# fstab options that let systemd boot without the filesystem (it is not waited for).
NOT_NEEDED_AT_BOOT_OPTIONS = ("noauto", "nofail")


@dataclasses.dataclass(frozen=True)
class FstabPlan:
    text: str  # the fstab with every resolvable kernel disk name replaced by UUID=
    replaced: list[str]  # "old line -> new line"
    unresolved: list[tuple[str, bool]]  # (line, needed at boot) of kernel disk names without a UUID


def _needed_at_boot(fields: list[str]) -> bool:
    """Whether systemd's local-fs.target (whose failure is emergency mode) waits for this line.
    Swap is not part of it: a missing swap disk delays the boot, it does not stop it."""
    options = fields[3].split(",") if len(fields) > 3 else []
    return fields[2] != "swap" and not any(o in NOT_NEEDED_AT_BOOT_OPTIONS for o in options)


def plan_fstab(fstab: str, volumes: list[str]) -> FstabPlan:
    """fstab with kernel disk names replaced by UUID= where the copied disks have one; the lines
    whose disk was not found are listed with whether the boot waits for them."""
    lines, replaced, unresolved = [], [], []
    for line in fstab.splitlines(keepends=True):
        fields = line.split()
        if len(fields) > 2 and not fields[0].startswith("#") and KERNEL_DISK_NAME_RE.match(fields[0]):
            uuid = _uuid_for_device(fields[0], volumes)
            if uuid is None:
                unresolved.append((line.strip(), _needed_at_boot(fields)))
            else:
                new_line = line.replace(fields[0], f"UUID={uuid}", 1)
                replaced.append(f"{line.strip()} -> {new_line.strip()}")
                line = new_line
        lines.append(line)
    return FstabPlan("".join(lines), replaced, unresolved)


def rewrite_fstab(fstab: str, volumes: list[str]) -> tuple[str, list[str]]:
    """fstab with kernel disk names replaced by UUID=; also the list of replaced lines. A line whose
    disk has no UUID on the copied disks is an error."""
    plan = plan_fstab(fstab, volumes)
    if plan.unresolved:
        line = plan.unresolved[0][0]
        raise AdjustError(
            f"/etc/fstab names {line.split()[0]}, but no filesystem UUID was found for it on the copied disks"
        )
    return plan.text, plan.replaced


def udev_rules_for(nics: list[dict]) -> str:
    rules = ["# Written by P2V: keep each NIC's name from the physical machine, matched by MAC.\n"]
    for nic in nics:
        name, mac = nic["name"], nic["mac"].lower()
        if not NIC_NAME_RE.match(name):
            raise AdjustError(f"NIC name {name!r} cannot be pinned (expected 1-15 of [A-Za-z0-9_.-])")
        rules.append(f'SUBSYSTEM=="net", ACTION=="add", ATTR{{address}}=="{mac}", NAME="{name}"\n')
    return "".join(rules)


def missing_virtio_modules(facts: dict) -> list[str] | None:
    """Virtio drivers the assessed kernel lacks; None when the assessment could not tell."""
    modules = (facts.get("kernel") or {}).get("virtio_modules")
    if modules is None:
        return None
    return [m for m in REQUIRED_VIRTIO_MODULES if m not in modules]


# note(message, level): a line for the job's events ("info" or "warning").
Note = Callable[[str, str], None]


def _no_note(message: str, level: str) -> None:
    return None


def separate_filesystems(fstab: str, volumes: list[str]) -> dict[str, initramfs.FilesystemLocation]:
    """Where the guest's separate /boot and /usr are on the copied volumes (by the UUID its fstab names)."""
    by_uuid = {
        part.uuid.lower(): initramfs.FilesystemLocation(
            volume, part.fstype or "", part.offset_bytes, part.size_bytes
        )
        for volume in volumes
        for part in volume_partitions(volume)
        if part.uuid
    }
    found = {}
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#") or fields[1] not in initramfs.SEPARATE_MOUNTPOINTS:
            continue
        spec = fields[0]
        uuid = spec.removeprefix("UUID=").removeprefix("/dev/disk/by-uuid/")
        if uuid == spec or uuid.lower() not in by_uuid:
            raise initramfs.RebuildUnavailable(
                f"the guest's {fields[1]} ({spec}) was not found by UUID on the copied disks"
            )
        found[fields[1]] = by_uuid[uuid.lower()]
    return found


def fix_initramfs(root, volumes: list[str], fstab: str | None, note: Note) -> list[Change]:
    """Rebuild the copied guest's initramfs with the virtio drivers, natively; never fails the job.

    root: where the copied root filesystem is (disk_layout.FilesystemLocation: a partition or a
    linear LVM volume, as adjust_guest found it)."""
    location = initramfs.FilesystemLocation(
        root.volume, root.fstype or "", root.offset_bytes, root.size_bytes
    )
    try:
        result = initramfs.rebuild_initramfs(location, separate_filesystems(fstab or "", volumes))
    except initramfs.RebuildError as exc:
        why = "cannot run" if isinstance(exc, initramfs.RebuildUnavailable) else "failed"
        note(
            f"initramfs: the native rebuild {why}: {exc}. The initramfs has no virtio disk driver; "
            "the verification decides whether the VM boots",
            "warning",
        )
        return []
    inside = "; ".join(f"{image}: {', '.join(mods)}" for image, mods in result.virtio_modules.items())
    note(
        f"initramfs: rebuilt natively in {result.seconds:.1f} s by the guest's own "
        f"`{' '.join(result.command)}` in a bubblewrap sandbox; virtio drivers inside now: {inside}",
        "info",
    )
    note(f"initramfs: {result.tool} output: {result.output or '(none)'}", "info")
    changes = [
        Change(
            result.config_path,
            "virtio drivers in every initramfs built",
            result.config_before,
            result.config_after,
        )
    ]
    for image, mods in result.virtio_modules.items():
        changes.append(
            Change(
                image, f"rebuilt natively by {result.tool} in {result.seconds:.1f} s", None, ", ".join(mods)
            )
        )
    return changes


def _fstab_changes(root, fstab: str, volumes: list[str]) -> list[Change]:
    """fstab by UUID. A filesystem the boot waits for that keeps a kernel disk name (sda becomes
    vda) makes systemd wait for a device that never appears and enter emergency mode: not being
    able to rewrite such a line fails the stage. Lines marked nofail/noauto do not stop the boot:
    they are reported as not changed."""
    plan = plan_fstab(fstab, volumes)
    blocking = [line for line, needed in plan.unresolved if needed]
    if blocking:
        raise AdjustError(
            f"/etc/fstab names {', '.join(line.split()[0] for line in blocking)}, mounted at boot, but no "
            "filesystem UUID was found for it on the copied disks: the VM would wait for that disk "
            "and enter emergency mode"
        )
    changes = [
        Change(
            "/etc/fstab",
            f"not rewritten: {line} (no filesystem UUID on the copied disks; nofail/noauto: the boot "
            "does not wait for it)",
            fstab,
            fstab,
            applied=False,
            reason="no filesystem UUID found for its disk on the copied disks",
        )
        for line, _ in plan.unresolved
    ]
    if plan.replaced:
        try:
            write_guest_file(root, "/etc/fstab", plan.text)
        except AdjustError as exc:
            raise AdjustError(
                f"could not write /etc/fstab by UUID ({'; '.join(plan.replaced)}): {exc}; the VM would wait "
                "for the old disk names and enter emergency mode"
            ) from exc
        changes.insert(0, Change("/etc/fstab", "; ".join(plan.replaced), fstab, plan.text))
    return changes


def _nic_name_changes(root, nics: list[dict]) -> list[Change]:
    """Each NIC's name pinned to its MAC. Without the pin the VM still boots (its NIC may get another
    name, which the verification reports): a pin that cannot be written is reported, not fatal."""
    summary = ", ".join(f"{n['name']}={n['mac']}" for n in nics)
    try:
        rules = udev_rules_for(nics)
        before = read_guest_file(root, UDEV_RULES_PATH)
        if before == rules:
            return []
        write_guest_file(root, UDEV_RULES_PATH, rules)
    except AdjustError as exc:
        return [
            Change(
                UDEV_RULES_PATH,
                f"NIC names not pinned ({summary}): {exc}",
                None,
                "",
                applied=False,
                reason=str(exc),
            )
        ]
    return [Change(UDEV_RULES_PATH, f"pinned {summary} (root on {root.where})", before, rules)]


def adjust_guest(volumes: list[str], facts: dict, nics: list[dict], note: Note = _no_note) -> list[Change]:
    """Make the needed changes on the copied volumes (in disk order); return what changed, and
    (applied=False, with the reason) what could not be changed although the guest should get it.

    Each change is tried on its own. The stage fails (AdjustError) only where the VM cannot boot
    without the change: a kernel without virtio drivers, and /etc/fstab lines the boot waits for that
    name a kernel disk and cannot be rewritten. NIC name pins, fstab lines marked nofail/noauto and
    the initramfs rebuild are reported when they cannot be made, and the verification decides."""
    missing = missing_virtio_modules(facts)
    if missing:
        raise AdjustError(
            f"the guest kernel lacks virtio drivers {missing}; install them and rebuild "
            "its initramfs on the physical machine, then assess again"
        )
    root = find_root(volumes, facts)
    changes: list[Change] = []
    fstab = read_guest_file(root, "/etc/fstab")
    if fstab is not None:
        changes += _fstab_changes(root, fstab, volumes)
    if nics:
        changes += _nic_name_changes(root, nics)
    for change in changes:
        if not change.applied:
            note(f"not changed {change.path}: {change.summary}", "warning")
    if initramfs_has_virtio_disk_driver(facts) is False:
        changes += fix_initramfs(root, volumes, read_guest_file(root, "/etc/fstab"), note)
    return changes
