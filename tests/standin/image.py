"""Bootable disk images for the stand-in physical machine, built in about a second without loop devices.

The image is a real Linux disk: a partition table (MBR + syslinux for BIOS, GPT + GRUB for UEFI),
a FAT boot partition holding Debian's cloud kernel and a busybox initramfs, and an ext4 root
(`mkfs.ext4 -d`, written at an offset) with /etc/fstab, a marker and `used_bytes` of random data.
Booted as a VM, its init reports the hardware it sees on the serial console as
`P2V-REPORT {json}` and powers off (see guest_init.sh).

Loop partscan does not work on this kernel (PLATFORM-NOTES), so every filesystem is written into
the image file at its partition's offset: `mkfs.vfat --offset`, mtools `-i image@@offset`,
`syslinux --install --offset`, `mkfs.ext4 -E offset=`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("P2V_GUEST_CACHE", REPO_ROOT / "var" / "cache" / "guest-kernel"))
GUEST_INIT = Path(__file__).with_name("guest_init.sh")
SECTOR = 512
MiB = 1024 * 1024
BOOT_START_SECTOR = 2048
BOOT_SIZE_BYTES = 40 * MiB
# Load order that works for the Debian cloud kernel (PLATFORM-NOTES: virtio_ring before virtio).
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
)
REPORT_PREFIX = "P2V-REPORT "
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-cloud-amd64$")


class ImageBuildError(RuntimeError):
    """A tool needed to build the stand-in image is missing or failed."""


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    start_bytes: int
    size_bytes: int
    fstype: str
    uuid: str


@dataclasses.dataclass(frozen=True)
class StandinImage:
    path: Path
    firmware: str
    size_bytes: int
    kernel_release: str
    root_uuid: str
    marker: str
    data_bytes: int
    partitions: tuple[Partition, ...]


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    release: str
    vmlinuz: Path
    modules_dir: Path


def _run(*argv: str | os.PathLike, input_bytes: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(
            [str(a) for a in argv], input=input_bytes, capture_output=True, timeout=120, check=False
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} is not installed (./scripts/install-apt.sh standin)") from exc
    if done.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(map(str, argv))} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout


def _newest_kernel_package() -> str:
    numbered: list[tuple[int, str]] = []
    for attempt in range(2):
        if attempt:  # a fresh machine may have no package lists yet
            _run("apt-get", "update", "-qq")
        listing = _run("apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$")
        names = [line.split(" ", 1)[0] for line in listing.decode().splitlines()]
        numbered = [(int(m.group(1)), name) for name in names if (m := KERNEL_PACKAGE_RE.match(name))]
        if numbered:
            break
    if not numbered:
        raise ImageBuildError("apt-cache knows no linux-image-6.1.0-*-cloud-amd64 (run apt-get update)")
    return max(numbered)[1]


@contextlib.contextmanager
def _cache_lock(cache_dir: Path):
    """One builder at a time per cache (several test sessions may start at once on a fresh machine)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_guest_kernel(cache_dir: Path = CACHE_DIR) -> GuestKernel:
    """Download (once) Debian's cloud kernel package and unpack it; never installs it."""
    with _cache_lock(cache_dir):
        return _ensure_guest_kernel(cache_dir)


def _ensure_guest_kernel(cache_dir: Path) -> GuestKernel:
    root = cache_dir / "root"
    found = sorted(root.glob("boot/vmlinuz-*"))
    if not found:
        cache_dir.mkdir(parents=True, exist_ok=True)
        debs = sorted(cache_dir.glob("linux-image-6.1.0-*-cloud-amd64_*.deb"))
        if not debs:
            package = _newest_kernel_package()
            subprocess.run(
                ["apt-get", "download", package], cwd=cache_dir, capture_output=True, timeout=300, check=False
            )
            debs = sorted(cache_dir.glob("linux-image-6.1.0-*-cloud-amd64_*.deb"))
            if not debs:
                raise ImageBuildError(f"apt-get download {package} produced no .deb in {cache_dir}")
        unpack = cache_dir / "root.partial"
        shutil.rmtree(unpack, ignore_errors=True)
        _run("dpkg-deb", "-x", debs[-1], unpack)
        unpack.rename(root)
        found = sorted(root.glob("boot/vmlinuz-*"))
    vmlinuz = found[-1]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    return GuestKernel(release=release, vmlinuz=vmlinuz, modules_dir=root / "lib" / "modules" / release)


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); symlinks carry their target as data."""
    out = io.BytesIO()
    for inode, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def build_initramfs(kernel: GuestKernel, cache_dir: Path = CACHE_DIR) -> Path:
    """gzip'd cpio with static busybox, the virtio modules and guest_init.sh; cached by content."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    if not busybox.exists():
        raise ImageBuildError("busybox is not installed (./scripts/install-apt.sh standin)")
    init_text = GUEST_INIT.read_bytes()
    digest = hashlib.sha256(init_text + kernel.release.encode() + busybox.read_bytes()).hexdigest()[:16]
    target = cache_dir / f"initrd-{digest}.gz"
    if target.exists():
        return target
    with _cache_lock(cache_dir):
        if not target.exists():
            _write_initramfs(kernel, busybox, init_text, target)
    return target


def _write_initramfs(kernel: GuestKernel, busybox: Path, init_text: bytes, target: Path) -> None:
    modules = {p.name.removesuffix(".ko"): p for p in kernel.modules_dir.rglob("*.ko")}
    missing = [m for m in GUEST_MODULES if m not in modules]
    if missing:
        raise ImageBuildError(f"guest kernel {kernel.release} lacks modules {missing}")
    dir_mode, file_mode, exe_mode = 0o040755, 0o100644, 0o100755
    entries: list[tuple[str, int, bytes]] = [
        (d, dir_mode, b"")
        for d in ("bin", "sbin", "dev", "proc", "sys", "etc", "lib", "lib/modules", "mnt", "mnt/root", "tmp")
    ]
    entries += [
        ("bin/busybox", exe_mode, busybox.read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", exe_mode, init_text),
        ("etc/modules-order", file_mode, "\n".join(GUEST_MODULES).encode() + b"\n"),
    ]
    entries += [(f"lib/modules/{m}.ko", file_mode, modules[m].read_bytes()) for m in GUEST_MODULES]
    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
    partial.rename(target)


def build_grub_efi(cache_dir: Path = CACHE_DIR) -> Path:
    """A standalone GRUB EFI binary that reads /EFI/BOOT/grub.cfg from the partition it came from."""
    target = cache_dir / "BOOTX64.EFI"
    if target.exists():
        return target
    with _cache_lock(cache_dir):
        if target.exists():  # built by another process while we waited
            return target
        partial = cache_dir / "BOOTX64.EFI.partial"
        _run(
            "grub-mkimage",
            "-O",
            "x86_64-efi",
            "-o",
            partial,
            "-p",
            "/EFI/BOOT",
            "part_gpt",
            "part_msdos",
            "fat",
            "normal",
            "linux",
            "configfile",
            "serial",
            "terminal",
            "echo",
            "test",
            "search",
            "search_fs_uuid",
            "efi_gop",
            "all_video",
            "boot",
        )
        partial.rename(target)
    return target


def _write_random(path: Path, size_bytes: int) -> None:
    with path.open("wb") as out:
        remaining = size_bytes
        while remaining > 0:
            chunk = min(remaining, 4 * MiB)
            out.write(os.urandom(chunk))
            remaining -= chunk


def build_bootable_image(
    path: os.PathLike | str,
    firmware: str = "bios",
    size_bytes: int = 256 * MiB,
    used_bytes: int = 24 * MiB,
    fstab_by_device: bool = True,
) -> StandinImage:
    """Write a bootable sparse disk image to `path` and describe it.

    used_bytes: about how much of the disk holds data (kernel, initramfs, random payload, fs
    metadata); the rest stays unallocated. fstab_by_device: name the root in /etc/fstab as
    /dev/sda2 (what P2V's adjust stage must rewrite to a UUID for virtio disks).
    """
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi', got {firmware!r}")
    if size_bytes % MiB or size_bytes < 128 * MiB:
        raise ValueError(f"size_bytes must be a whole number of MiB and at least 128 MiB, got {size_bytes}")
    path = Path(path)
    kernel = ensure_guest_kernel()
    initrd = build_initramfs(kernel)
    payload_bytes = kernel.vmlinuz.stat().st_size + initrd.stat().st_size
    data_bytes = max(0, used_bytes - payload_bytes - 4 * MiB) // MiB * MiB
    root_start = BOOT_START_SECTOR * SECTOR + BOOT_SIZE_BYTES
    root_size = size_bytes - root_start - (MiB if firmware == "uefi" else 0)  # GPT backup header
    if data_bytes > root_size * 0.85:
        raise ValueError(f"used_bytes {used_bytes} does not fit a {size_bytes}-byte disk")
    root_uuid = str(uuid.uuid4())
    marker = uuid.uuid4().hex

    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(size_bytes)
    boot_sectors = BOOT_SIZE_BYTES // SECTOR
    root_sectors = root_size // SECTOR
    if firmware == "bios":
        table = (
            f"label: dos\nstart={BOOT_START_SECTOR}, size={boot_sectors}, type=c, bootable\n"
            f"start={BOOT_START_SECTOR + boot_sectors}, size={root_sectors}, type=83\n"
        )
    else:
        table = (
            f"label: gpt\nstart={BOOT_START_SECTOR}, size={boot_sectors}, type=U\n"
            f"start={BOOT_START_SECTOR + boot_sectors}, size={root_sectors}, type=L\n"
        )
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input_bytes=table.encode())

    boot_offset = BOOT_START_SECTOR * SECTOR
    fat_serial = uuid.uuid4().hex[:8]
    _run(
        "mkfs.vfat",
        f"--offset={BOOT_START_SECTOR}",
        "-F",
        "16",
        "-n",
        "P2VBOOT",
        "-i",
        fat_serial,
        path,
        str(BOOT_SIZE_BYTES // 1024),
    )
    fat = f"{path}@@{boot_offset}"
    cmdline = f"root=UUID={root_uuid} console=ttyS0,115200 quiet loglevel=3 panic=5"
    with tempfile.TemporaryDirectory(prefix="p2v-image-") as tmp:
        tmp_dir = Path(tmp)
        env_mtools = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

        def mcopy(src: Path, dest: str) -> None:
            subprocess.run(
                ["mcopy", "-o", "-i", fat, str(src), dest],
                env=env_mtools,
                check=True,
                capture_output=True,
                timeout=60,
            )

        mcopy(kernel.vmlinuz, "::/vmlinuz")
        mcopy(initrd, "::/initrd.gz")
        if firmware == "bios":
            cfg = tmp_dir / "syslinux.cfg"
            cfg.write_text(
                "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT linux\nLABEL linux\n"
                f"  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {cmdline}\n"
            )
            mcopy(cfg, "::/syslinux.cfg")
            _run("syslinux", "--install", "--offset", str(boot_offset), path)
            mbr = Path("/usr/lib/syslinux/mbr/mbr.bin")
            with path.open("r+b") as image:
                image.write(mbr.read_bytes()[:440])
        else:
            subprocess.run(
                ["mmd", "-i", fat, "::/EFI", "::/EFI/BOOT"],
                env=env_mtools,
                check=True,
                capture_output=True,
                timeout=60,
            )
            mcopy(build_grub_efi(), "::/EFI/BOOT/BOOTX64.EFI")
            cfg = tmp_dir / "grub.cfg"
            cfg.write_text(
                "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
                f"set timeout=0\nlinux /vmlinuz {cmdline}\ninitrd /initrd.gz\nboot\n"
            )
            mcopy(cfg, "::/EFI/BOOT/grub.cfg")

        rootfs = tmp_dir / "root"
        for sub in ("etc/p2v-standin", "etc/udev/rules.d", "var/lib/p2v-standin", "boot", "sbin"):
            (rootfs / sub).mkdir(parents=True)
        root_device = "/dev/sda2" if fstab_by_device else f"UUID={root_uuid}"
        boot_spec = "/dev/sda1"
        (rootfs / "etc/fstab").write_text(
            "# <file system> <mount point> <type> <options> <dump> <pass>\n"
            f"{root_device} / ext4 errors=remount-ro 0 1\n"
            f"{boot_spec} /boot vfat defaults 0 2\n"
        )
        (rootfs / "etc/hostname").write_text("p2v-standin\n")
        (rootfs / "etc/os-release").write_text(
            'PRETTY_NAME="P2V stand-in (busybox)"\nNAME="P2V stand-in"\nID=p2v-standin\nVERSION_ID="1"\n'
        )
        (rootfs / "etc/p2v-standin/marker").write_text(marker)
        if data_bytes:
            _write_random(rootfs / "var/lib/p2v-standin/data.bin", data_bytes)
        _run(
            "mkfs.ext4",
            "-F",
            "-q",
            "-L",
            "p2v-root",
            "-U",
            root_uuid,
            "-E",
            f"offset={root_start},nodiscard,lazy_itable_init=1",
            "-d",
            rootfs,
            path,
            f"{root_size // 1024}k",
        )

    partitions = (
        Partition("1", boot_offset, BOOT_SIZE_BYTES, "vfat", f"{fat_serial[:4]}-{fat_serial[4:]}".upper()),
        Partition("2", root_start, root_size, "ext4", root_uuid),
    )
    return StandinImage(
        path=path,
        firmware=firmware,
        size_bytes=size_bytes,
        kernel_release=kernel.release,
        root_uuid=root_uuid,
        marker=marker,
        data_bytes=data_bytes,
        partitions=partitions,
    )
