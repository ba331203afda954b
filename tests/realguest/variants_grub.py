"""The real Debian guest booted by BIOS GRUB, as Debian servers are (virt-v2v converts only guests
whose bootloader it finds: GRUB; the base guest's syslinux gives "no bootloader detected").

The same debootstrap tree plus the guest's own `grub-pc` package (installed with apt in a chroot of
a copy of the tree; the cached tree is left as it is), on this layout: MBR, an ext4 /boot, an ext4
root, the base's data disk. GRUB is installed from the host without a loop mount: the guest's own
`grub-mkimage` makes core.img (biosdisk, part_msdos, ext2, search_fs_uuid, and an early config that finds
/boot by its UUID), which goes into the gap after the MBR at sector 1, where boot.img's default pointer looks
(`grub-mkimage` writes core.img's length into its first sector's block list, whose default start is
sector 2, the sector after it); boot.img's first 440 bytes become the MBR's code (the partition
table stays). /boot/grub holds the guest's i386-pc modules, a grubenv and a grub.cfg in
update-grub's shape; /etc/default/grub says the same (serial console, no timeout), so a
`grub-mkconfig` in the guest (virt-v2v runs one) makes an equivalent file.

Cached under P2V_REALGUEST_CACHE keyed by the base image's key and this module's build code; only
the bench (bench/p2v_real.py) uses it, never `make test`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.realguest import image as base
from tests.realguest.image import (
    BOOT_START_SECTOR,
    CACHE_ROOT,
    SECTOR,
    SYSTEM_DISK_BYTES,
    GuestBuildError,
    GuestImage,
    _run,
)

MiB = 1024 * 1024
BOOT_BYTES = 256 * MiB  # ext4 /boot as installers make it (room for a second initramfs)
GUEST_PACKAGES = ("grub-pc",)
KERNEL_ARGS = "console=ttyS0,115200 panic=10"
# The gap between the MBR and the first partition, where GRUB embeds its core image.
EMBED_LIMIT_BYTES = (BOOT_START_SECTOR - 1) * SECTOR
CORE_MODULES = ("biosdisk", "part_msdos", "ext2", "search_fs_uuid")
GRUB_DEFAULTS = {
    "GRUB_DEFAULT": "0",
    "GRUB_TIMEOUT": "0",
    "GRUB_CMDLINE_LINUX_DEFAULT": '""',
    "GRUB_CMDLINE_LINUX": f'"{KERNEL_ARGS}"',
    "GRUB_TERMINAL": "serial",
    "GRUB_SERIAL_COMMAND": '"serial --speed=115200"',
}


def grub_key() -> str:
    """The base image's key and the code that builds this variant (comments and docs do not count)."""
    code = "".join(
        inspect.getsource(f)
        for f in (ensure_grub_image, _build, _install_grub_package, _grub_files, _write_system_disk)
    )
    constants = json.dumps([BOOT_BYTES, GUEST_PACKAGES, KERNEL_ARGS, CORE_MODULES, GRUB_DEFAULTS])
    return hashlib.sha256((base.image_key() + constants + code).encode()).hexdigest()[:16]


def ensure_grub_image() -> GuestImage:
    """The cached GRUB-booted guest (system disk built here, the base's data disk reused)."""
    base_image = base.ensure_guest_image()
    rootfs = base.ensure_rootfs()
    return base.cached_image(CACHE_ROOT / f"realguest-grub-{grub_key()}",
                             lambda partial: _build(rootfs, base_image, partial))


def _build(rootfs: Path, base_image: GuestImage, out: Path) -> dict:
    release = base_image.kernel_release
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "p2v-realguest-admin", "-f", out / "client_key")
    _run("cp", "--sparse=always", base_image.data_disk, out / "data.img")
    root_uuid, boot_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="p2v-realguest-grub-", dir=out) as tmp:
        staging = Path(tmp) / "root"
        _run("cp", "-a", rootfs, staging, timeout_s=1200)
        _install_grub_package(staging)
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
            f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
            f"UUID={boot_uuid} /boot ext4 defaults 0 2\n"
            f"UUID={base_image.data_uuid} /srv/data ext4 defaults 0 2\n"
        )
        core = _grub_files(staging, boot_dir, release, root_uuid, boot_uuid)
        root_offset = _write_system_disk(out / "system.img", staging, boot_dir, core, root_uuid, boot_uuid)
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


@contextlib.contextmanager
def _proc_mounted(root: Path):
    _run("mount", "-t", "proc", "proc", root / "proc")
    try:
        yield
    finally:
        _run("umount", root / "proc")


def _install_grub_package(root: Path) -> None:
    """The guest's own GRUB (grub-pc and what it needs) from the Debian mirror, with apt in a chroot.

    No install device is chosen (debconf preseeded): GRUB goes onto the disk image later, from the
    host; grub-pc's postinst runs update-grub only when a grub.cfg exists, so nothing probes the
    host's disks from the chroot."""
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    shutil.copy2("/etc/resolv.conf", resolv)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
        **{k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy")},
    }
    preseed = (
        "grub-pc grub-pc/install_devices multiselect\ngrub-pc grub-pc/install_devices_empty boolean true\n"
    )
    try:
        with _proc_mounted(root):
            for argv, stdin in (
                (["debconf-set-selections"], preseed),
                (["apt-get", "update", "-qq"], None),
                (["apt-get", "install", "-y", "-qq", "--no-install-recommends", *GUEST_PACKAGES], None),
                (["apt-get", "clean"], None),
            ):
                done = subprocess.run(
                    ["chroot", str(root), *argv],
                    input=stdin,
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=1800,
                    check=False,
                )
                if done.returncode != 0:
                    raise GuestBuildError(
                        f"chroot {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
                    )
    finally:
        resolv.unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
    for lists in (root / "var/lib/apt/lists").glob("*_Packages*"):
        lists.unlink()  # what the debootstrap tree did not carry either
    if not (root / "usr/lib/grub/i386-pc/boot.img").exists():
        raise GuestBuildError("grub-pc left no /usr/lib/grub/i386-pc/boot.img in the guest")


def _grub_files(staging: Path, boot_dir: Path, release: str, root_uuid: str, boot_uuid: str) -> bytes:
    """/boot/grub as grub-install and update-grub leave it, and /etc/default/grub; returns core.img."""
    default = staging / "etc/default/grub"
    lines = [line for line in default.read_text().splitlines() if line.split("=", 1)[0] not in GRUB_DEFAULTS]
    default.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in GRUB_DEFAULTS.items())]) + "\n")
    grub_dir = boot_dir / "grub"
    grub_dir.mkdir(exist_ok=True)
    modules = staging / "usr/lib/grub/i386-pc"
    shutil.copytree(modules, grub_dir / "i386-pc", ignore=shutil.ignore_patterns("*.module", "*.exec", "*.S"))
    (grub_dir / "grubenv").write_text(("# GRUB Environment Block\n").ljust(1024, "#"))
    search = f"search --no-floppy --fs-uuid --set=root {boot_uuid}"
    (grub_dir / "grub.cfg").write_text(
        "# written like /usr/sbin/grub-mkconfig does (tests/realguest/variants_grub.py)\n"
        'set default="0"\n'
        'if [ x"${feature_menuentry_id}" = xy ]; then\n  menuentry_id_option="--id"\n'
        'else\n  menuentry_id_option=""\nfi\n'
        "serial --speed=115200\nterminal_input serial\nterminal_output serial\n"
        "set timeout=0\n"
        f"menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os "
        f"$menuentry_id_option 'gnulinux-simple-{root_uuid}' {{\n"
        "\tinsmod gzio\n\tinsmod part_msdos\n\tinsmod ext2\n"
        f"\t{search}\n"
        f"\techo\t'Loading Linux {release} ...'\n"
        f"\tlinux\t/vmlinuz-{release} root=UUID={root_uuid} ro {KERNEL_ARGS}\n"
        "\techo\t'Loading initial ramdisk ...'\n"
        f"\tinitrd\t/initrd.img-{release}\n"
        "}\n"
    )
    with tempfile.TemporaryDirectory(prefix="grub-", dir=staging / "tmp") as tmp:
        inside = Path("/tmp") / Path(tmp).name
        # What grub-install embeds: the short command of search_fs_uuid (`search` is not in core).
        Path(tmp, "early.cfg").write_text(f"search.fs_uuid {boot_uuid} root\nset prefix=($root)/grub\n")
        _run(
            "chroot", staging, "grub-mkimage", "-O", "i386-pc", "-o", inside / "core.img",
            "-c", inside / "early.cfg", "-p", "/grub", *CORE_MODULES,
        )  # fmt: skip
        core = Path(tmp, "core.img").read_bytes()
    (grub_dir / "i386-pc" / "core.img").write_bytes(core)
    if len(core) > EMBED_LIMIT_BYTES:
        raise GuestBuildError(
            f"core.img is {len(core)} bytes; the gap before /boot holds {EMBED_LIMIT_BYTES}"
        )
    return core


def _write_system_disk(
    path: Path, staging: Path, boot_dir: Path, core: bytes, root_uuid: str, boot_uuid: str
) -> int:
    """MBR with GRUB: p1 ext4 /boot, p2 ext4 root; returns the root's byte offset on the disk."""
    with path.open("wb") as disk:
        disk.truncate(SYSTEM_DISK_BYTES)
    boot_offset = BOOT_START_SECTOR * SECTOR
    root_offset = boot_offset + BOOT_BYTES
    root_size = SYSTEM_DISK_BYTES - root_offset
    table = (
        f"label: dos\nstart={BOOT_START_SECTOR}, size={BOOT_BYTES // SECTOR}, type=83, bootable\n"
        f"start={root_offset // SECTOR}, size={root_size // SECTOR}, type=83\n"
    )
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input_bytes=table.encode())
    _run(
        "mkfs.ext4", "-F", "-q", "-L", "boot", "-U", boot_uuid,
        "-E", f"offset={boot_offset},nodiscard", "-d", boot_dir, path, f"{BOOT_BYTES // 1024}k",
    )  # fmt: skip
    _run(
        "mkfs.ext4", "-F", "-q", "-L", "root", "-U", root_uuid,
        "-E", f"offset={root_offset},nodiscard", "-d", staging, path, f"{root_size // 1024}k",
        timeout_s=1200,
    )  # fmt: skip
    boot_img = (boot_dir / "grub/i386-pc/boot.img").read_bytes()
    with path.open("r+b") as disk:
        disk.write(boot_img[:440])  # the code only: the disk signature and partition table stay
        disk.seek(SECTOR)
        disk.write(core)
    return root_offset
