"""Compatibility rules: can this machine, as assessed, become a VM on our hypervisor, and what to watch.

Each rule is a pure function of the facts and the target, returning findings; every finding says
which rule raised it and why that matters. A *blocker* means a conversion would not produce a
working VM (or cannot be done safely); a *warning* means it would, with a caveat the admin should
know. Score: 100, minus 40 per blocker and 10 per warning, never below 0; compatible means no
blocker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .facts import VIRTIO_DISK_DRIVERS, VIRTIO_NET_DRIVER, initramfs_has_virtio_disk_driver, iter_devices

BLOCKER_PENALTY = 40
WARNING_PENALTY = 10
MiB = 1024 * 1024
SUPPORTED_ARCHITECTURES = ("x86_64",)


@dataclass(frozen=True)
class TargetProfile:
    """What the hypervisor side offers (from the conversion policy, or the target hypervisor)."""

    supported_firmware: tuple[str, ...] = ("bios", "uefi")
    memory_cap_bytes: int | None = None
    pool_free_bytes: int | None = None
    min_boot_free_bytes: int = 100 * MiB


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "blocker" | "warning"
    message: str

    def as_dict(self) -> dict:
        return {"rule": self.rule, "message": self.message}


@dataclass
class Verdict:
    score: int
    compatible: bool
    blockers: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)


def _blocker(rule: str, message: str) -> Finding:
    return Finding(rule, "blocker", message)


def _warning(rule: str, message: str) -> Finding:
    return Finding(rule, "warning", message)


def _gib(value: int) -> str:
    return f"{value / 1024**3:.1f} GiB"


def rule_known_os(facts: dict, target: TargetProfile) -> list[Finding]:
    """Unknown OS: the adjust stage edits the guest (fstab, initramfs, NIC names) per distribution;
    without knowing the OS it cannot, and a Linux-only toolchain cannot adjust other systems."""
    os_info = facts.get("os") or {}
    kernel = facts.get("kernel") or {}
    if kernel.get("sysname") not in (None, "Linux"):
        return [
            _blocker("known_os", f"the machine runs {kernel['sysname']}; only Linux guests can be adjusted")
        ]
    if not os_info.get("id"):
        return [_blocker("known_os", "the operating system could not be identified (/etc/os-release)")]
    return []


def rule_architecture(facts: dict, target: TargetProfile) -> list[Finding]:
    """The hypervisor emulates x86_64 machines; another architecture's disk would not boot."""
    machine = (facts.get("kernel") or {}).get("machine") or (facts.get("cpu") or {}).get("architecture")
    if machine is None:
        return [_warning("architecture", "CPU architecture unknown; assuming x86_64")]
    if machine not in SUPPORTED_ARCHITECTURES:
        return [_blocker("architecture", f"architecture {machine} is not supported (only x86_64)")]
    return []


def rule_virtio_drivers(facts: dict, target: TargetProfile) -> list[Finding]:
    """The VM's disks and NICs are virtio: a kernel without virtio_blk/virtio_scsi cannot find its root
    disk at boot; one without virtio_net boots but has no network."""
    modules = (facts.get("kernel") or {}).get("virtio_modules")
    if modules is None:
        return [_warning("virtio_drivers", "could not tell whether the kernel has virtio drivers")]
    findings = []
    if not any(name in modules for name in VIRTIO_DISK_DRIVERS):
        findings.append(
            _blocker(
                "virtio_drivers",
                "the kernel has no virtio disk driver (virtio_blk or virtio_scsi): "
                "the VM would not find its root disk",
            )
        )
    if VIRTIO_NET_DRIVER not in modules:
        findings.append(
            _warning(
                "virtio_drivers",
                "the kernel has no virtio_net driver: the VM would have no network until one is installed",
            )
        )
    return findings


def rule_initramfs_space(facts: dict, target: TargetProfile) -> list[Finding]:
    """Adding virtio drivers to the initramfs writes a new image next to the old one on /boot (or / when
    /boot is not separate); a full filesystem there leaves the guest unbootable mid-rebuild."""
    filesystems = facts.get("filesystems")
    if filesystems is None:
        return [
            _warning(
                "initramfs_space", "filesystem usage unknown: free space for an initramfs rebuild not checked"
            )
        ]
    by_mount = {fs["mountpoint"]: fs for fs in filesystems}
    boot = by_mount.get("/boot") or by_mount.get("/")
    if boot is None:
        return [
            _warning(
                "initramfs_space",
                "neither /boot nor / is mounted from the machine's disks: free "
                "space for an initramfs rebuild not checked",
            )
        ]
    free = boot.get("avail_bytes", boot["size_bytes"] - boot["used_bytes"])
    if free < target.min_boot_free_bytes:
        return [
            _blocker(
                "initramfs_space",
                f"{boot['mountpoint']} has {free // MiB} MiB free; rebuilding the initramfs needs "
                f"{target.min_boot_free_bytes // MiB} MiB",
            )
        ]
    return []


def rule_encrypted_volumes(facts: dict, target: TargetProfile) -> list[Finding]:
    """Encrypted volumes copy as opaque bytes: the guest asks for the passphrase on a console nobody
    watches, and the adjust stage cannot change files inside them."""
    volumes = facts.get("encrypted_volumes")
    if volumes is None:
        return []
    return [
        _blocker(
            "encrypted_volumes",
            f"{v['device']} is encrypted ({v.get('fstype') or v.get('type')}): "
            "the VM cannot be adjusted or boot unattended",
        )
        for v in volumes
    ]


def rule_firmware(facts: dict, target: TargetProfile) -> list[Finding]:
    """The VM boots with the machine's firmware kind: a UEFI disk (GPT + ESP) does not boot under BIOS and
    the reverse; the hypervisor must offer it."""
    firmware = facts.get("firmware")
    if firmware is None:
        return [_blocker("firmware", "firmware (BIOS or UEFI) unknown: the VM's boot mode cannot be chosen")]
    if firmware not in target.supported_firmware:
        offered = ", ".join(target.supported_firmware) or "nothing"
        return [
            _blocker(
                "firmware", f"the machine boots with {firmware.upper()}; the hypervisor offers {offered}"
            )
        ]
    return []


def rule_memory_cap(facts: dict, target: TargetProfile) -> list[Finding]:
    """Memory above the hypervisor's cap is not refused: the VM gets the cap, which may be too little
    for the workload."""
    memory = facts.get("memory_bytes")
    if memory is None or target.memory_cap_bytes is None:
        return [] if memory is not None else [_warning("memory_cap", "memory size unknown")]
    if memory > target.memory_cap_bytes:
        return [
            _warning(
                "memory_cap",
                f"the machine has {_gib(memory)} of memory; the VM will get the "
                f"policy's cap of {_gib(target.memory_cap_bytes)}",
            )
        ]
    return []


def rule_disk_capacity(facts: dict, target: TargetProfile) -> list[Finding]:
    """Each disk becomes a volume of the same size: if the target pool cannot hold them all, the copy
    would fail (or thin volumes would fill the pool later)."""
    disks = facts.get("disks")
    if not disks:
        return [_blocker("disk_capacity", "no disks found: nothing to convert")]
    total = sum(d["size_bytes"] for d in disks)
    if target.pool_free_bytes is None:
        return [
            _warning("disk_capacity", f"target pool free space unknown: {_gib(total)} of disks not checked")
        ]
    if total > target.pool_free_bytes:
        return [
            _blocker(
                "disk_capacity",
                f"disks total {_gib(total)}, the target pool has {_gib(target.pool_free_bytes)} free",
            )
        ]
    return []


def rule_disk_health(facts: dict, target: TargetProfile) -> list[Finding]:
    """A failing disk does not block a conversion (it is the reason to hurry), but reads may fail."""
    smart = (facts.get("health") or {}).get("smart") or []
    return [
        _warning("disk_health", f"{entry['disk']}: SMART health check FAILED; copy soon, reads may fail")
        for entry in smart
        if entry.get("passed") is False
    ]


def rule_partitions_known(facts: dict, target: TargetProfile) -> list[Finding]:
    """Root filesystem identity: the adjust stage rewrites fstab by UUID; a root without a UUID cannot
    be found reliably after disks are renamed (sda → vda)."""
    devices = [
        d
        for d in iter_devices(facts.get("disks") or [])
        if d.get("fstype") in ("ext4", "ext3", "xfs", "btrfs", "ext2")
    ]
    missing = [d["path"] for d in devices if not d.get("uuid")]
    if missing:
        return [_warning("partitions_known", f"filesystems without a UUID: {', '.join(missing)}")]
    return []


def rule_python3(facts: dict, target: TargetProfile) -> list[Finding]:
    """The disk copy reads the source with a small python3 program; without python3 it falls back to
    a POSIX sh + dd reader (same stream, same checksums, still only used blocks), which starts about
    20 processes per used MiB and so loads the source more and copies more slowly."""
    tools = facts.get("tools")
    if tools is None or "python3" in tools:
        return []
    return [
        _warning(
            "python3",
            "python3 is not installed on the source: the disk copy will use its sh + dd fallback "
            "reader (same checksums, only used blocks sent, but more load on the source and a "
            "slower copy)",
        )
    ]


def rule_root_access(facts: dict, target: TargetProfile) -> list[Finding]:
    """The disk reader and the privileged probes need root: a login user that is not root must get it
    through sudo (NOPASSWD, or the stored sudo password). Facts from an assessment older than this
    rule carry no `access` and are not judged."""
    access = facts.get("access")
    if not access or access.get("via"):
        return []
    return [
        _blocker(
            "root_access",
            access.get("reason")
            or f"{access.get('user')!r} cannot become root: the disk copy and the probes need root",
        )
    ]


def rule_initramfs_virtio(facts: dict, target: TargetProfile) -> list[Finding]:
    """A host-only initramfs (`MODULES=dep`, dracut's hostonly) holds only the drivers of the disk
    controller in use (ahci, megaraid...): the VM's virtio disk is invisible to it and the guest stops
    in the initramfs shell. The conversion rebuilds it natively with the guest's own tool when the
    guest has one and its kernel has the virtio disk driver as a module; otherwise nothing can."""
    if initramfs_has_virtio_disk_driver(facts) is not False:
        return []  # it has one, or the kernel has it built in, or unknown (said in `unknown`)
    initramfs = facts["initramfs"]
    tool = initramfs.get("rebuild_tool")
    kernel_modules = set((facts.get("kernel") or {}).get("virtio_modules") or [])
    missing = "the VM would stop in the initramfs shell"
    if tool and kernel_modules & set(VIRTIO_DISK_DRIVERS):
        return [
            _warning(
                "initramfs_virtio",
                f"the initramfs {initramfs['path']} has no virtio disk driver (virtio_blk or virtio_scsi): "
                f"{missing}, so the conversion will rebuild it natively with the guest's own {tool} "
                "(in a sandbox on the conversion host, the copy only, never the source)",
            )
        ]
    why = (
        "the guest has neither update-initramfs nor dracut to rebuild it"
        if not tool
        else "the kernel has no virtio disk driver module to put in it"
    )
    return [
        _blocker(
            "initramfs_virtio",
            f"the initramfs {initramfs['path']} has no virtio disk driver (virtio_blk or virtio_scsi): "
            f"{missing}, and {why}; rebuild it on the source with the virtio drivers (MODULES=most, or "
            "add virtio_blk to /etc/initramfs-tools/modules) and re-assess",
        )
    ]


ADJUSTABLE_ROOT_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs")
UNSUPPORTED_ROOT_DEVICE_TYPES = ("crypt", "dm", "raid0", "raid1", "raid4", "raid5", "raid6", "raid10", "md")


def root_logical_volume(facts: dict, root_device: str) -> dict | None:
    """The LVM logical volume holding `root_device` (by /dev/mapper or /dev/VG/LV path), if any."""
    for lv in (facts.get("lvm") or {}).get("logical_volumes") or []:
        if root_device in (lv.get("dm_path"), lv.get("path")):
            return lv
    return None


def rule_root_filesystem(facts: dict, target: TargetProfile) -> list[Finding]:
    """The adjust stage edits the copied root (fstab, NIC names) on the conversion host: ext2/3/4
    through e2fsprogs, XFS through a loop mount. A root on a linear LVM volume is reached through
    the LVM metadata on the copied PV (the host needs no device-mapper); striped, mirrored, thin or
    cached volumes, RAID and encryption cannot be reached that way."""
    filesystems = facts.get("filesystems")
    if filesystems is None:
        return []
    root = next((fs for fs in filesystems if fs.get("mountpoint") == "/"), None)
    if root is None:
        return []  # nothing to judge (rule_initramfs_space already says the root was not seen)
    devices = {d["path"]: d for d in iter_devices(facts.get("disks") or [])}
    device = devices.get(root["device"], {})
    findings = []
    lv = root_logical_volume(facts, root["device"])
    on_lvm = device.get("type") == "lvm" or lv is not None
    if on_lvm and lv is None:
        findings.append(
            _warning(
                "root_filesystem",
                f"the root filesystem {root['device']} is on LVM, but its layout could not be read on "
                "the source (lvs): the conversion reads it from the copied disk and stops there if "
                "the volume is not linear",
            )
        )
    elif on_lvm:
        kinds = sorted({seg.get("type") or "unknown" for seg in lv["segments"]})
        unplaced = [seg for seg in lv["segments"] if seg.get("type") == "linear" and "pv" not in seg]
        if kinds != ["linear"] or unplaced:
            findings.append(
                _blocker(
                    "root_filesystem",
                    f"the root filesystem {root['device']} is on LVM volume {lv['vg']}/{lv['name']} "
                    f"with {'/'.join(kinds)} segments: only linear volumes can be reached on the "
                    "copied disk without device-mapper",
                )
            )
        else:
            findings.append(
                _warning(
                    "root_filesystem",
                    f"the root filesystem {root['device']} is on LVM volume {lv['vg']}/{lv['name']} "
                    f"(linear, {len(lv['segments'])} segment(s)): the adjust stage reaches it through "
                    "the LVM metadata on the copied disk; the VM activates the volume itself at boot",
                )
            )
    elif device.get("type") in UNSUPPORTED_ROOT_DEVICE_TYPES or root["device"].startswith("/dev/mapper/"):
        findings.append(
            _blocker(
                "root_filesystem",
                f"the root filesystem {root['device']} is on {device.get('type') or 'device-mapper'}: "
                "the adjust stage can only edit a root on a plain partition or a linear LVM volume",
            )
        )
    if root.get("fstype") not in ADJUSTABLE_ROOT_FILESYSTEMS:
        findings.append(
            _blocker(
                "root_filesystem",
                f"the root filesystem is {root.get('fstype')}: the adjust stage can only edit "
                f"{'/'.join(ADJUSTABLE_ROOT_FILESYSTEMS)}",
            )
        )
    return findings


RULES: tuple[Callable[[dict, TargetProfile], list[Finding]], ...] = (
    rule_known_os,
    rule_architecture,
    rule_virtio_drivers,
    rule_initramfs_space,
    rule_encrypted_volumes,
    rule_firmware,
    rule_memory_cap,
    rule_disk_capacity,
    rule_disk_health,
    rule_partitions_known,
    rule_python3,
    rule_root_access,
    rule_initramfs_virtio,
    rule_root_filesystem,
)


def evaluate(facts: dict, target: TargetProfile) -> Verdict:
    """Run every rule; score and sort the findings into blockers and warnings."""
    findings = [finding for rule in RULES for finding in rule(facts, target)]
    blockers = [f.as_dict() for f in findings if f.severity == "blocker"]
    warnings = [f.as_dict() for f in findings if f.severity == "warning"]
    score = max(0, 100 - BLOCKER_PENALTY * len(blockers) - WARNING_PENALTY * len(warnings))
    return Verdict(score=score, compatible=not blockers, blockers=blockers, warnings=warnings)
