"""A real Debian 12 server disk for P2V tests, built from Debian packages and cached by its inputs.

Not the stand-in: a debootstrap'd bookworm with the generic kernel (it has the AHCI and e1000e
drivers a physical server needs; the cloud kernel has neither), systemd, udev, openssh-server,
python3 and initramfs-tools, booted by syslinux from an MBR disk laid out as Debian servers often
are: a separate /boot (FAT, so syslinux can read it without a loop mount), an ext4 root, and a
second disk with a data filesystem. /etc/fstab names everything by UUID.

Costs: debootstrap downloads and unpacks about 1 GB (minutes); the disk images take about half a
minute more. Both are cached under P2V_REALGUEST_CACHE (default /var/cache/datacenter-tests),
keyed by a hash of every input, so only the first run on a machine pays. The per-session network
address is written into a copy of the image (tests/realguest/machine.py), never into the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("P2V_REALGUEST_CACHE", "/var/cache/datacenter-tests"))
SUITE = "bookworm"
MIRROR = os.environ.get("P2V_REALGUEST_MIRROR", "http://deb.debian.org/debian")
# What a small real server runs; xfsprogs/lvm2 so the same tree serves the LVM + XFS variant.
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "openssh-server",
    "python3",
    "linux-image-amd64",
    "initramfs-tools",
    "iproute2",
    "procps",
    "e2fsprogs",
    "xfsprogs",
    "lvm2",
    "dmidecode",
    "sudo",
)
HOSTNAME = "dell-r640-01"
SECTOR = 512
MiB = 1024 * 1024
SYSTEM_DISK_BYTES = 2048 * MiB
DATA_DISK_BYTES = 256 * MiB
BOOT_START_SECTOR = 2048
BOOT_BYTES = 160 * MiB
NETWORK_FILE = "/etc/systemd/network/10-lan.network"


class GuestBuildError(RuntimeError):
    """A tool needed to build the real guest is missing or failed."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """The cached build: two raw disks, the admin's key for root, and what the build put inside."""

    directory: Path
    system_disk: Path
    data_disk: Path
    client_key: Path
    host_key_fingerprint: str  # SHA256 of the guest's ed25519 host key
    kernel_release: str
    root_uuid: str
    root_offset_bytes: int
    boot_uuid: str
    data_uuid: str
    data_offset_bytes: int
    marker: str
    hostname: str = HOSTNAME


def _run(*argv: str | os.PathLike, input_bytes: bytes | None = None, timeout_s: float = 600) -> str:
    try:
        done = subprocess.run(
            [str(a) for a in argv], input=input_bytes, capture_output=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed (./scripts/install-apt.sh realguest)") from exc
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(map(str, argv))[:200]} failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()[-800:]}"
        )
    return done.stdout.decode(errors="replace")


@contextlib.contextmanager
def _lock(directory: Path):
    """One builder per cache entry (several sessions may start at once on a fresh machine)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def debootstrap_key() -> str:
    return hashlib.sha256(json.dumps([SUITE, MIRROR, "minbase", PACKAGES]).encode()).hexdigest()[:16]


def ensure_rootfs() -> Path:
    """The debootstrap'd tree (built once per input set; a `complete` file marks a finished build)."""
    directory = CACHE_ROOT / f"debootstrap-{debootstrap_key()}"
    rootfs = directory / "rootfs"
    with _lock(directory):
        if (directory / "complete").exists():
            return rootfs
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        _run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            rootfs,
            MIRROR,
            timeout_s=3600,
        )
        (directory / "complete").write_text(json.dumps({"suite": SUITE, "packages": PACKAGES}))
    return rootfs


def image_key() -> str:
    source = Path(__file__).read_bytes()
    return hashlib.sha256(debootstrap_key().encode() + source).hexdigest()[:16]


def ensure_guest_image() -> GuestImage:
    """The cached disks of the real guest, built on first use."""
    rootfs = ensure_rootfs()
    return cached_image(CACHE_ROOT / f"realguest-{image_key()}", lambda partial: _build(rootfs, partial))


def cached_image(directory: Path, build: Callable[[Path], dict]) -> GuestImage:
    """The guest image cached in `directory`; `build(partial)` writes its disks and client key into
    a scratch directory and returns its description, and the scratch becomes `directory` only once
    complete (one builder at a time, under the entry's lock)."""
    with _lock(directory):
        meta = directory / "image.json"
        if not meta.exists():
            partial = directory.with_name(directory.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            description = build(partial)
            (partial / "image.json").write_text(json.dumps(description))
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)
        description = json.loads(meta.read_text())
    return GuestImage(
        directory=directory,
        system_disk=directory / "system.img",
        data_disk=directory / "data.img",
        client_key=directory / "client_key",
        **description,
    )


def _fingerprint(public_key: Path) -> str:
    return _run("ssh-keygen", "-l", "-E", "sha256", "-f", public_key).split()[1]


def _build(rootfs: Path, out: Path) -> dict:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestBuildError(f"no kernel in {rootfs}/boot (debootstrap of linux-image-amd64 failed?)")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    if not (rootfs / "boot" / f"initrd.img-{release}").exists():
        raise GuestBuildError(f"no initrd.img-{release} in {rootfs}/boot")
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2v-realguest-admin", "-f", out / "client_key")
    root_uuid, boot_serial, data_uuid = str(uuid.uuid4()), uuid.uuid4().hex[:8].upper(), str(uuid.uuid4())
    boot_uuid = f"{boot_serial[:4]}-{boot_serial[4:]}"
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-", dir=out) as tmp:
        staging = Path(tmp) / "root"
        _run("cp", "-a", rootfs, staging, timeout_s=1200)
        kernel_dir = Path(tmp) / "boot"
        kernel_dir.mkdir()
        for entry in (staging / "boot").iterdir():  # the kernel files live on the /boot partition
            shutil.move(entry, kernel_dir / entry.name)
        boot_files = sorted(kernel_dir.iterdir())
        host_pub = staging / "etc/ssh/ssh_host_ed25519_key.pub"
        if not host_pub.exists():
            raise GuestBuildError("openssh-server left no ed25519 host key in the tree")
        host_fingerprint = _fingerprint(host_pub)
        _customise(staging, out / "client_key.pub", root_uuid, boot_uuid, data_uuid, marker)
        root_offset = _write_system_disk(
            out / "system.img", staging, boot_files, release, root_uuid, boot_serial
        )
    data_offset = _write_data_disk(out / "data.img", data_uuid, marker)
    return {
        "host_key_fingerprint": host_fingerprint,
        "kernel_release": release,
        "root_uuid": root_uuid,
        "root_offset_bytes": root_offset,
        "boot_uuid": boot_uuid,
        "data_uuid": data_uuid,
        "data_offset_bytes": data_offset,
        "marker": marker,
    }


def _customise(
    root: Path, client_pub: Path, root_uuid: str, boot_uuid: str, data_uuid: str, marker: str
) -> None:
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    (root / "etc/fstab").write_text(
        "# <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
        f"UUID={boot_uuid} /boot vfat umask=0077 0 2\n"
        f"UUID={data_uuid} /srv/data ext4 defaults 0 2\n"
    )
    (root / "srv/data").mkdir(parents=True, exist_ok=True)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(client_pub.read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    (root / "etc/p2v-realguest-marker").write_text(marker + "\n")
    network = root / NETWORK_FILE.lstrip("/")
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("# written per test session by tests/realguest/machine.py\n")
    # A lean server: drivers for hardware no server of this kind has (graphics, sound, media,
    # wireless, InfiniBand, staging), documentation and locales go, as minimal images do; it halves
    # what the copy moves under emulation. depmod keeps the module index true to what is left.
    release = next((root / "usr/lib/modules").iterdir()).name
    drivers = root / "usr/lib/modules" / release / "kernel" / "drivers"
    for sub in (
        "gpu",
        "media",
        "net/wireless",
        "infiniband",
        "staging",
        "sound",
        "iio",
        "hid",
        "input/touchscreen",
        "bluetooth",
        "usb/gadget",
        "isdn",
        "comedi",
        "net/can",
    ):
        shutil.rmtree(drivers / sub, ignore_errors=True)
    shutil.rmtree(root / "usr/lib/modules" / release / "kernel" / "sound", ignore_errors=True)
    shutil.rmtree(root / "usr/lib/firmware", ignore_errors=True)
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True, exist_ok=True)
    _run("chroot", root, "depmod", "-a", release)
    for leftover in [
        *(root / "var/cache/apt/archives").glob("*.deb"),
        *(root / "var/cache/apt").glob("*.bin"),
    ]:
        leftover.unlink()  # what `apt-get clean` removes
    # Boot faster under emulation: no wait for "network online", nothing periodic.
    _run("chroot", root, "systemctl", "enable", "systemd-networkd.service")
    for unit in (
        "systemd-networkd-wait-online.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ):
        subprocess.run(["chroot", str(root), "systemctl", "mask", unit], capture_output=True, check=False)


def _write_system_disk(
    path: Path, root: Path, boot_files: list[Path], release: str, root_uuid: str, boot_serial: str
) -> int:
    with path.open("wb") as image:
        image.truncate(SYSTEM_DISK_BYTES)
    boot_sectors = BOOT_BYTES // SECTOR
    root_start = BOOT_START_SECTOR * SECTOR + BOOT_BYTES
    root_size = SYSTEM_DISK_BYTES - root_start
    table = (
        f"label: dos\nstart={BOOT_START_SECTOR}, size={boot_sectors}, type=c, bootable\n"
        f"start={BOOT_START_SECTOR + boot_sectors}, size={root_size // SECTOR}, type=83\n"
    )
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input_bytes=table.encode())
    boot_offset = BOOT_START_SECTOR * SECTOR
    _run(
        "mkfs.vfat",
        f"--offset={BOOT_START_SECTOR}",
        "-F",
        "16",
        "-n",
        "BOOT",
        "-i",
        boot_serial,
        path,
        str(BOOT_BYTES // 1024),
    )
    fat = f"{path}@@{boot_offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-boot-") as tmp:
        cfg = Path(tmp) / "syslinux.cfg"
        cfg.write_text(
            "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT debian\nLABEL debian\n"
            f"  KERNEL /vmlinuz-{release}\n  INITRD /initrd.img-{release}\n"
            f"  APPEND root=UUID={root_uuid} ro console=ttyS0,115200 panic=10\n"
        )
        for source in [*boot_files, cfg]:
            subprocess.run(
                ["mcopy", "-o", "-i", fat, str(source), f"::/{source.name}"],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
    _run("syslinux", "--install", "--offset", str(boot_offset), path)
    with path.open("r+b") as image:
        image.write(Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440])
    _run(
        "mkfs.ext4",
        "-F",
        "-q",
        "-L",
        "root",
        "-U",
        root_uuid,
        "-E",
        f"offset={root_start},nodiscard",
        "-d",
        root,
        path,
        f"{root_size // 1024}k",
        timeout_s=1200,
    )
    return root_start


def _write_data_disk(path: Path, data_uuid: str, marker: str) -> int:
    with path.open("wb") as image:
        image.truncate(DATA_DISK_BYTES)
    start = BOOT_START_SECTOR * SECTOR
    size = DATA_DISK_BYTES - start
    _run(
        "sfdisk",
        "--no-reread",
        "--no-tell-kernel",
        "-q",
        path,
        input_bytes=f"label: dos\nstart={BOOT_START_SECTOR}, size={size // SECTOR}, type=83\n".encode(),
    )
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-data-") as tmp:
        Path(tmp, "marker").write_text(marker + "\n")
        _run(
            "mkfs.ext4",
            "-F",
            "-q",
            "-L",
            "data",
            "-U",
            data_uuid,
            "-E",
            f"offset={start},nodiscard",
            "-d",
            tmp,
            path,
            f"{size // 1024}k",
        )
    return start
