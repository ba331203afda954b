"""Variants of the real Debian guest for P2V of harder sources: no python3, and an LVM + XFS root.

- no python3: the base image as is; this session's copy loses /usr/bin/python3* (debugfs, on the
  ext4 root) before the boot, so nothing is cached and the base cache serves.
- LVM + XFS: the same debootstrap tree on a second "real server" layout: an ext4 /boot
  (extlinux), an LVM PV holding vg0/root (XFS) and vg0/swap, /etc/fstab naming
  /dev/mapper/vg0-root and /dev/mapper/vg0-swap. Built on the host without device-mapper
  (PLATFORM-NOTES): the LVM metadata is written by `lvm ... --driverloaded n` restricted to one
  loop device over the PV partition, and each linear LV is reached through a loop device at its
  extents' offset (mkfs.xfs, mount, cp -a; mkswap). About a minute and a half on a busy machine;
  cached under P2V_REALGUEST_CACHE keyed by the base image's inputs and the build code.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.realguest import image as base
from tests.realguest.image import (
    BOOT_START_SECTOR,
    CACHE_ROOT,
    NETWORK_FILE,
    SECTOR,
    SYSTEM_DISK_BYTES,
    GuestBuildError,
    GuestImage,
    _run,
)

MiB = 1024 * 1024
# ext4 keeps 5 % for root and a journal: 160 MiB (the base guest's FAT /boot) would leave less than
# the 100 MiB the initramfs_space rule asks for, so this /boot is larger, as installers make it.
BOOT_BYTES = 256 * MiB
ROOT_LV_BYTES = 1536 * MiB
SWAP_LV_BYTES = 128 * MiB
VG = "vg0"
PYTHON3_FILES = ("/usr/bin/python3", "/usr/bin/python3.11")


def lvm_xfs_key() -> str:
    """The base image's key and the code that builds this variant (comments and docs do not count)."""
    code = "".join(
        inspect.getsource(f) for f in (ensure_lvm_xfs_image, _build, _write_system_disk, lvm, _lv_extents)
    )
    constants = json.dumps([BOOT_BYTES, ROOT_LV_BYTES, SWAP_LV_BYTES, VG])
    return hashlib.sha256((base.image_key() + constants + code).encode()).hexdigest()[:16]


@contextlib.contextmanager
def loop_device(path: Path, offset: int, size: int) -> Iterator[str]:
    """A loop device over [offset, offset + size) of an image, detached afterwards (by its name)."""
    loop = _run("losetup", "--find", "--show", "--offset", offset, "--sizelimit", size, path).strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def mounted(device: str, fstype: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-mnt-") as directory:
        _run("mount", "-t", fstype, device, directory)
        try:
            yield Path(directory)
        finally:
            _run("umount", directory)


def lvm(loop: str, *args: str) -> str:
    """One lvm command that sees only `loop` and needs no device-mapper in the host kernel."""
    config = "devices { use_devicesfile=0 } activation { udev_sync=0 udev_rules=0 }"
    return _run("lvm", args[0], "--driverloaded", "n", "--devices", loop, "--config", config, *args[1:])


def _lv_extents(loop: str) -> dict[str, tuple[int, int]]:
    """{lv name: (byte offset inside the PV, size)} of each single-segment linear LV."""
    report = json.loads(
        lvm(
            loop,
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,segtype,seg_pe_ranges,vg_extent_size,seg_size",
        )
    )
    pvs = json.loads(
        lvm(loop, "pvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "pe_start")
    )
    pe_start = int(pvs["report"][0]["pv"][0]["pe_start"])
    result = {}
    for row in report["report"][0]["lv"]:
        if row["segtype"] != "linear":
            raise GuestBuildError(f"LV {row['lv_name']} is {row['segtype']}, expected linear")
        first_pe = int(row["seg_pe_ranges"].rsplit(":", 1)[1].split("-")[0])
        offset = pe_start + first_pe * int(row["vg_extent_size"])
        result[row["lv_name"]] = (offset, int(row["seg_size"]))
    return result


def ensure_lvm_xfs_image() -> GuestImage:
    """The cached LVM + XFS guest (system disk rebuilt, the base's data disk reused)."""
    base_image = base.ensure_guest_image()
    rootfs = base.ensure_rootfs()
    return base.cached_image(CACHE_ROOT / f"realguest-lvmxfs-{lvm_xfs_key()}",
                             lambda partial: _build(rootfs, base_image, partial))


def _build(rootfs: Path, base_image: GuestImage, out: Path) -> dict:
    release = base_image.kernel_release
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2v-realguest-admin", "-f", out / "client_key")
    _run("cp", "--sparse=always", base_image.data_disk, out / "data.img")
    root_uuid, boot_uuid, swap_uuid = (str(uuid.uuid4()) for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-lvm-", dir=out) as tmp:
        staging = Path(tmp) / "root"
        _run("cp", "-a", rootfs, staging, timeout_s=1200)
        boot_dir = Path(tmp) / "boot"
        boot_dir.mkdir()
        for entry in (staging / "boot").iterdir():  # the kernel files live on the /boot partition
            shutil.move(entry, boot_dir / entry.name)
        host_fingerprint = base._fingerprint(staging / "etc/ssh/ssh_host_ed25519_key.pub")
        base._customise(
            staging, out / "client_key.pub", root_uuid, boot_uuid, base_image.data_uuid, base_image.marker
        )
        (staging / "etc/fstab").write_text(
            "# <file system> <mount point> <type> <options> <dump> <pass>\n"
            f"/dev/mapper/{VG}-root / xfs defaults 0 1\n"
            f"UUID={boot_uuid} /boot ext4 defaults 0 2\n"
            f"/dev/mapper/{VG}-swap none swap sw 0 0\n"
            f"UUID={base_image.data_uuid} /srv/data ext4 defaults 0 2\n"
        )
        root_offset = _write_system_disk(
            out / "system.img", staging, boot_dir, release, root_uuid, boot_uuid, swap_uuid
        )
    return {
        "host_key_fingerprint": host_fingerprint,
        "kernel_release": release,
        "root_uuid": root_uuid,
        "root_offset_bytes": root_offset,
        "boot_uuid": boot_uuid,
        "data_uuid": base_image.data_uuid,
        "data_offset_bytes": base_image.data_offset_bytes,
        "marker": base_image.marker,
    }


def _write_system_disk(
    path: Path, staging: Path, boot_dir: Path, release: str, root_uuid: str, boot_uuid: str, swap_uuid: str
) -> int:
    """MBR: p1 ext4 /boot (extlinux), p2 LVM PV; returns the root LV's byte offset on the disk."""
    with path.open("wb") as disk:
        disk.truncate(SYSTEM_DISK_BYTES)
    boot_offset = BOOT_START_SECTOR * SECTOR
    pv_offset = boot_offset + BOOT_BYTES
    pv_size = SYSTEM_DISK_BYTES - pv_offset
    table = (
        f"label: dos\nstart={BOOT_START_SECTOR}, size={BOOT_BYTES // SECTOR}, type=83, bootable\n"
        f"start={pv_offset // SECTOR}, size={pv_size // SECTOR}, type=8e\n"
    )
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input_bytes=table.encode())
    (boot_dir / "extlinux.conf").write_text(
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT debian\nLABEL debian\n"
        f"  KERNEL /vmlinuz-{release}\n  INITRD /initrd.img-{release}\n"
        f"  APPEND root=/dev/mapper/{VG}-root ro console=ttyS0,115200 panic=10\n"
    )
    # syslinux 6.04 fails to load a kernel stored in extents ("I/O error", measured here): a /boot
    # with block maps, no 64bit and no metadata_csum (an ext4 as older installers made it).
    _run(
        "mkfs.ext4", "-F", "-q", "-L", "boot", "-U", boot_uuid, "-O", "^64bit,^metadata_csum,^extent",
        "-E", f"offset={boot_offset},nodiscard", "-d", boot_dir, path, f"{BOOT_BYTES // 1024}k",
    )  # fmt: skip
    with loop_device(path, boot_offset, BOOT_BYTES) as loop, mounted(loop, "ext4") as boot:
        _run("extlinux", "--install", boot)
    with path.open("r+b") as disk:  # extlinux took the partition offset from the loop device
        disk.write(Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440])
    with loop_device(path, pv_offset, pv_size) as loop:
        lvm(loop, "pvcreate", "-ff", "-y", loop)
        lvm(loop, "vgcreate", "-y", VG, loop)
        lvm(loop, "lvcreate", "-an", "-Zn", "-y", "-L", f"{ROOT_LV_BYTES}b", "-n", "root", VG)
        lvm(loop, "lvcreate", "-an", "-Zn", "-y", "-L", f"{SWAP_LV_BYTES}b", "-n", "swap", VG)
        extents = _lv_extents(loop)
    root_at, root_size = extents["root"]
    swap_at, swap_size = extents["swap"]
    with loop_device(path, pv_offset + root_at, root_size) as loop:
        _run("mkfs.xfs", "-q", "-f", "-L", "root", "-m", f"uuid={root_uuid}", loop)
        with mounted(loop, "xfs") as root:
            _run("cp", "-a", f"{staging}/.", root, timeout_s=1200)
    with loop_device(path, pv_offset + swap_at, swap_size) as loop:
        _run("mkswap", "-U", swap_uuid, loop)
    return pv_offset + root_at


def write_xfs_network_config(guest) -> None:
    """This session's static address, by MAC for the first boot (the fixture then names the NIC)."""
    with (
        loop_device(guest.system_disk, guest.image.root_offset_bytes, ROOT_LV_BYTES) as loop,
        mounted(loop, "xfs") as root,
    ):
        (root / NETWORK_FILE.lstrip("/")).write_text(network_config(f"MACAddress={guest.mac}", guest))


def network_config(match: str, guest) -> str:
    return f"[Match]\n{match}\n\n[Network]\nAddress={guest.address}/30\nGateway={guest.host_address}\n"


def remove_python3(guest) -> None:
    """The base guest's session copy without python3 (the debootstrap tree is left as it is)."""
    from tests.realguest.machine import write_network_config

    write_network_config(guest)
    image = f"{guest.system_disk}?offset={guest.image.root_offset_bytes}"
    script = "".join(f"rm {path}\n" for path in PYTHON3_FILES)
    done = subprocess.run(
        ["debugfs", "-w", "-f", "-", image],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 or "not found" in done.stderr.lower():
        raise GuestBuildError(f"could not remove python3 from the guest copy: {done.stderr.strip()[-300:]}")
