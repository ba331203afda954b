"""Rebuild a copied guest's initramfs with the virtio drivers, natively on the conversion host.

A host-only initramfs (initramfs-tools `MODULES=dep`, dracut's hostonly) holds only the drivers of
the physical disk controller: the VM's virtio disk is invisible to it. The fix runs the guest's own
`update-initramfs` (or `dracut`) against the copied root, on the host CPU, in a bubblewrap sandbox:
every namespace unshared (no network, no host processes, no host IPC), the copied root bound as `/`,
a minimal /dev, its own /proc, tmpfs /tmp and /run, an empty environment, and no host path inside.
That takes seconds; the same tool inside an emulated VM (QEMU TCG, as libguestfs/virt-v2v do here)
takes minutes.

Before the rebuild a config file is written into the copy so the result is independent of the
hardware it is built on: `MODULES=most` for initramfs-tools (dep would inspect the conversion host),
`hostonly="no"` plus the virtio drivers for dracut. The guest keeps that file (a later kernel update
in the VM builds the same kind of initramfs). After the rebuild the new image is listed with the
guest's own lister (`lsinitramfs`/`lsinitrd`) in the same sandbox and must hold a virtio disk driver.

Separate filesystems the tool writes or reads (/boot, /usr) are made visible: a filesystem the host
kernel can mount is loop-mounted at its offset; a FAT /boot (no vfat module in some host kernels) is
staged with mtools into a scratch directory, bound at /boot, and the files the rebuild changed are
written back with mtools. Only the byte range of each filesystem is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

VIRTIO_DISK_DRIVERS = ("virtio_blk", "virtio_scsi")
# What the VM needs early: its PCI transport, its disk, and its NIC (PLATFORM-NOTES: load order is
# the kernel's business once the modules are in the image).
VIRTIO_INITRAMFS_DRIVERS = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net")
# Both tools read their conf.d files in C sort order, the last setting winning: "zz-" comes after the
# admin's own files (a "host-only.conf" with MODULES=dep sorted after "90-..." and won).
INITRAMFS_TOOLS_CONF = "/etc/initramfs-tools/conf.d/zz-p2v-virtio.conf"
INITRAMFS_TOOLS_CONF_TEXT = (
    "# Written by P2V: the initramfs holds the drivers of most hardware, virtio included, so it\n"
    "# boots on the hypervisor (MODULES=dep would only hold the physical machine's disk driver).\n"
    "MODULES=most\n"
)
DRACUT_CONF = "/etc/dracut.conf.d/zz-p2v-virtio.conf"
DRACUT_CONF_TEXT = (
    "# Written by P2V: a generic initramfs with the virtio drivers, so it boots on the hypervisor.\n"
    'hostonly="no"\n'
    f'add_drivers+=" {" ".join(VIRTIO_INITRAMFS_DRIVERS)} "\n'
)
# Separate filesystems an initramfs build reads (/usr: the tools and modules) or writes (/boot).
SEPARATE_MOUNTPOINTS = ("/usr", "/boot")
SANDBOX_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REBUILD_TIMEOUT_S = 1800  # generous: a slow shared host; natively it takes seconds to a minute
LIST_TIMEOUT_S = 300
OUTPUT_TAIL_CHARS = 2000
MODULE_NAME_RE = re.compile(r"([^/\s]+)\.ko(?:\.(?:xz|zst|gz))?$")
UDEV_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class RebuildError(RuntimeError):
    """The rebuild ran and failed, or its result still lacks the virtio disk driver."""


class RebuildUnavailable(RebuildError):
    """The rebuild cannot run here (no tool in the guest, no bubblewrap, a filesystem we cannot
    reach); the message says which."""


@dataclasses.dataclass(frozen=True)
class FilesystemLocation:
    """A filesystem inside a raw volume or block device: where its bytes are and what it is."""

    path: str
    fstype: str
    offset_bytes: int = 0
    size_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class RebuildResult:
    tool: str
    command: list[str]
    seconds: float
    output: str
    config_path: str
    config_before: str | None
    config_after: str
    virtio_modules: dict[str, list[str]]  # initramfs image path -> virtio modules inside it now


def _run(argv: list[str], timeout_s: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RebuildError(
            f"`{' '.join(argv[:4])} ...` failed ({done.returncode}): {done.stderr.strip()[:300]}"
        )
    return done.stdout


def host_can_mount(fstype: str) -> bool:
    """The host kernel knows this filesystem type (loaded; modules are not loaded for us here)."""
    try:
        known = Path("/proc/filesystems").read_text().split()
    except OSError:
        return False
    return fstype in known


def rebuild_tool(root: Path) -> str | None:
    """The guest's own initramfs builder, by what the copied root holds."""
    for name, paths in (
        ("update-initramfs", ("usr/sbin/update-initramfs", "sbin/update-initramfs")),
        ("dracut", ("usr/bin/dracut", "usr/sbin/dracut", "sbin/dracut")),
    ):
        if any((root / p).exists() or (root / p).is_symlink() for p in paths):
            return name
    return None


def sandbox_argv(
    root: Path,
    command: list[str],
    binds: dict[str, Path] | None = None,
    devices: tuple[str, ...] = (),
    links: dict[str, str] | None = None,
) -> list[str]:
    """bubblewrap around `command`: the copied root as /, nothing of the host inside but the copy's
    own loop devices (`devices`: the tools find the root's filesystem type by its UUID on them) and
    the udev-style names of those devices (`links`: sandbox path -> device)."""
    argv = [
        "bwrap",
        "--unshare-all",  # net, pid, ipc, uts, cgroup, user where possible: no network, no host
        "--cap-drop",
        "ALL",  # root inside owns the copy's files; it needs no privilege beyond that
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        SANDBOX_PATH,
        "--setenv",
        "LANG",
        "C",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--bind",
        str(root),
        "/",
    ]
    for target, source in (binds or {}).items():
        argv += ["--bind", str(source), target]
    argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run", "--chdir", "/"]
    for device in devices:
        argv += ["--dev-bind", device, device]
    for link, device in sorted((links or {}).items()):
        argv += ["--symlink", device, link]
    return [*argv, "--", *command]


def identity_links(device: str) -> dict[str, str]:
    """The /dev/disk/by-uuid and by-label names udev would give `device`. The guest's tools resolve
    fstab's `UUID=`/`LABEL=` through libblkid, which finds no loop device in a sandbox without /sys
    (it takes them for unused); without these names initramfs-tools' fsck hook cannot tell the
    root's type and leaves fsck out of the image ("Couldn't identify type of root file system").
    `-p` probes the device itself: blkid's cache may still describe an earlier use of the loop device."""
    done = subprocess.run(
        ["blkid", "-p", "-o", "export", device], capture_output=True, text=True, timeout=60, check=False
    )
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    links = {}
    for tag, directory in (("UUID", "by-uuid"), ("LABEL", "by-label")):
        value = found.get(tag, "")
        if UDEV_SAFE_NAME_RE.fullmatch(value):  # udev escapes other characters; such names are left out
            links[f"/dev/disk/{directory}/{value}"] = device
    return links


def modules_in(listing: str) -> set[str]:
    """Module names from an initramfs listing (`lsinitramfs`, `lsinitrd`)."""
    names = set()
    for line in listing.splitlines():
        match = MODULE_NAME_RE.search(line.strip())
        if match:
            names.add(match.group(1).replace("-", "_"))
    return names


@contextlib.contextmanager
def _loop(location: FilesystemLocation) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--offset", str(location.offset_bytes)]
    if location.size_bytes:
        argv += ["--sizelimit", str(location.size_bytes)]
    device = _run([*argv, location.path]).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def _mounted(location: FilesystemLocation, where: Path) -> Iterator[str]:
    with _loop(location) as device:
        _run(["mount", "-t", location.fstype, device, str(where)])
        try:
            yield device
        finally:
            done = subprocess.run(
                ["umount", str(where)], capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode != 0:  # busy for a moment after the sandbox exits: lazily, never left
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60, check=False)


def _fat_image(location: FilesystemLocation) -> str:
    return f"{location.path}@@{location.offset_bytes}"


def _digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in root.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _staged_fat(location: FilesystemLocation, stage: Path) -> Iterator[None]:
    """A FAT filesystem's files copied out with mtools; on success, what changed is written back."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    image = _fat_image(location)
    done = subprocess.run(
        ["mcopy", "-s", "-p", "-n", "-i", image, "::/", str(stage)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RebuildUnavailable(
            f"could not read the FAT filesystem at offset {location.offset_bytes}: {done.stderr[:300]}"
        )
    before = _tree(stage)
    yield
    after = _tree(stage)
    for name in sorted(set(before) - set(after)):
        _mtools(["mdel", "-i", image, f"::/{name}"], env)
    for name in sorted(n for n in after if before.get(n) != after[n]):
        _mtools(["mcopy", "-o", "-i", image, str(stage / name), f"::/{name}"], env)


def _mtools(argv: list[str], env: dict) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=env)
    if done.returncode != 0:
        raise RebuildError(f"writing back to the FAT /boot failed: `{argv[0]}` {done.stderr.strip()[:300]}")


@dataclasses.dataclass(frozen=True)
class GuestTree:
    """The copied guest made reachable: its root directory, the directories to bind over staged
    mountpoints (mountpoint -> scratch directory), and the loop devices of its mounted filesystems."""

    root: Path
    binds: dict[str, Path]
    devices: tuple[str, ...]
    links: dict[str, str] = dataclasses.field(default_factory=dict)

    def sandbox(self, command: list[str]) -> list[str]:
        return sandbox_argv(self.root, command, self.binds, self.devices, self.links)


@contextlib.contextmanager
def guest_tree(
    root: FilesystemLocation, separate: dict[str, FilesystemLocation], workdir: Path
) -> Iterator[GuestTree]:
    """The copied root mounted read-write, and the separate filesystems (mountpoint → location) made
    reachable: loop-mounted, or for a FAT one the host cannot mount, staged with mtools."""
    if not host_can_mount(root.fstype):
        raise RebuildUnavailable(f"the host kernel cannot mount the root filesystem type {root.fstype!r}")
    mountpoint = workdir / "root"
    mountpoint.mkdir()
    binds: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        devices = [stack.enter_context(_mounted(root, mountpoint))]
        for target, location in sorted(separate.items()):
            inside = mountpoint / target.lstrip("/")
            if not inside.is_dir():
                raise RebuildUnavailable(
                    f"the guest's {target} mountpoint is missing from its root filesystem"
                )
            if host_can_mount(location.fstype):
                devices.append(stack.enter_context(_mounted(location, inside)))
            elif location.fstype == "vfat":
                stage = workdir / ("stage" + target.replace("/", "-"))
                stage.mkdir()
                stack.enter_context(_staged_fat(location, stage))
                binds[target] = stage
            else:
                raise RebuildUnavailable(
                    f"the guest's {target} is {location.fstype}, which the host kernel cannot mount"
                )
        links = {link: target for device in devices for link, target in identity_links(device).items()}
        yield GuestTree(mountpoint, binds, tuple(devices), links)


def _in_sandbox(tree: GuestTree, command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            tree.sandbox(command),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RebuildError(f"`{' '.join(command)}` did not finish within {timeout_s} s") from exc


def _images(tree: GuestTree, tool: str) -> list[str]:
    """The guest's initramfs images, as paths inside the guest."""
    boot = tree.binds.get("/boot", tree.root / "boot")
    pattern = "initrd.img-*" if tool == "update-initramfs" else "initramfs-*.img"
    return sorted(f"/boot/{p.name}" for p in boot.glob(pattern) if not p.name.endswith(".dpkg-bak"))


def rebuild_initramfs(
    root: FilesystemLocation, separate: dict[str, FilesystemLocation] | None = None
) -> RebuildResult:
    """Write the virtio config into the copy and run its own initramfs builder in the sandbox."""
    if shutil.which("bwrap") is None:
        raise RebuildUnavailable("bubblewrap (bwrap) is not installed on the conversion host")
    with (
        tempfile.TemporaryDirectory(prefix="p2v-initramfs-") as tmp,
        guest_tree(root, separate or {}, Path(tmp)) as tree,
    ):
        tool = rebuild_tool(tree.root)
        if tool is None:
            raise RebuildUnavailable("the guest has neither update-initramfs nor dracut")
        if tool == "update-initramfs":
            config_path, config_text = INITRAMFS_TOOLS_CONF, INITRAMFS_TOOLS_CONF_TEXT
            command, lister = ["update-initramfs", "-u", "-k", "all"], "lsinitramfs"
        else:
            config_path, config_text = DRACUT_CONF, DRACUT_CONF_TEXT
            command, lister = ["dracut", "--force", "--regenerate-all"], "lsinitrd"
        config = tree.root / config_path.lstrip("/")
        before = config.read_text() if config.exists() else None
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(config_text)
        try:
            seconds, output, found = _rebuild_and_list(tree, tool, command, lister)
        except BaseException:
            # A failed rebuild leaves the guest as it was (the staged /boot is not written back).
            if before is None:
                config.unlink()
            else:
                config.write_text(before)
            raise
    return RebuildResult(tool, command, seconds, output, config_path, before, config_text, found)


def _rebuild_and_list(
    tree: GuestTree, tool: str, command: list[str], lister: str
) -> tuple[float, str, dict[str, list[str]]]:
    started = time.monotonic()
    done = _in_sandbox(tree, command, REBUILD_TIMEOUT_S)
    seconds = time.monotonic() - started
    output = (done.stdout + done.stderr).strip()[-OUTPUT_TAIL_CHARS:]
    if done.returncode != 0:
        raise RebuildError(f"`{' '.join(command)}` failed in the sandbox ({done.returncode}): {output}")
    found: dict[str, list[str]] = {}
    for image in _images(tree, tool):
        listing = _in_sandbox(tree, [lister, image], LIST_TIMEOUT_S)
        if listing.returncode != 0:
            raise RebuildError(f"`{lister} {image}` failed: {listing.stderr.strip()[-300:]}")
        found[image] = sorted(m for m in modules_in(listing.stdout) if m.startswith("virtio"))
    if not found:
        raise RebuildError(f"`{' '.join(command)}` left no initramfs image in /boot: {output}")
    lacking = [image for image, mods in found.items() if not set(mods) & set(VIRTIO_DISK_DRIVERS)]
    if lacking:
        raise RebuildError(f"rebuilt, but {lacking} still hold no virtio disk driver: {found}")
    return seconds, output, found
