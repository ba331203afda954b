"""The native initramfs rebuild's plumbing on small raw disks: the sandbox sees nothing of the host, a
FAT /boot the host cannot mount is staged and written back, and a rebuild that cannot run is logged
with its reason without failing the conversion. (The rebuild of a real Debian initramfs and the VM
booting from it: tests/p2v_real/test_modules_dep.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from p2v.conversion import adjust, initramfs
from tests.environment import need, need_binary, need_root

MiB = 1024 * 1024
BOOT_START = MiB
BOOT_BYTES = 16 * MiB
ROOT_START = BOOT_START + BOOT_BYTES
DISK_BYTES = ROOT_START + 40 * MiB
FACTS = {
    "kernel": {"virtio_modules": ["virtio_blk", "virtio_pci", "virtio_net"]},
    "initramfs": {"path": "/boot/initrd.img-6.1", "has_modules": True, "virtio_modules": []},
}


@pytest.fixture
def guest_disk(tmp_path):
    """MBR disk: a FAT /boot holding an old initrd, then an ext4 root with busybox as its only tool."""
    need_root()
    need_binary(
        "sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "losetup", "bwrap", "busybox", "debugfs", "blkid"
    )
    need(initramfs.host_can_mount("ext4"), "the host kernel cannot mount ext4")
    root = tmp_path / "tree"
    for sub in ("bin", "etc", "boot", "proc", "dev", "tmp", "run"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(shutil.which("busybox"), root / "bin" / "busybox")
    boot_serial = uuid.uuid4().hex[:8].upper()
    boot_uuid = f"{boot_serial[:4]}-{boot_serial[4:]}"
    (root / "etc" / "fstab").write_text(
        f"/dev/sda2 / ext4 defaults 0 1\nUUID={boot_uuid} /boot vfat umask=0077 0 2\n"
    )
    path = tmp_path / "disk.raw"
    with path.open("wb") as handle:
        handle.truncate(DISK_BYTES)
    table = (
        f"label: dos\nstart={BOOT_START // 512}, size={BOOT_BYTES // 512}, type=c\n"
        f"start={ROOT_START // 512}, type=83\n"
    )
    subprocess.run(["sfdisk", "-q", str(path)], input=table.encode(), check=True, timeout=30)
    subprocess.run(
        ["mkfs.vfat", f"--offset={BOOT_START // 512}", "-i", boot_serial, str(path), str(BOOT_BYTES // 1024)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    old = tmp_path / "initrd.img-6.1"
    old.write_bytes(b"old initrd")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(
        ["mcopy", "-i", f"{path}@@{BOOT_START}", str(old), "::/initrd.img-6.1"],
        env=env,
        check=True,
        timeout=30,
    )
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", f"offset={ROOT_START}", "-d", str(root), str(path), f"{40 * 1024}k"],
        check=True,
        timeout=30,
    )
    return str(path), boot_uuid


def fat_file(path: str, name: str) -> bytes:
    done = subprocess.run(
        ["mtype", "-i", f"{path}@@{BOOT_START}", f"::/{name}"],
        capture_output=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        timeout=30,
        check=False,
    )
    return done.stdout if done.returncode == 0 else b""


def root_location(path: str) -> initramfs.FilesystemLocation:
    return initramfs.FilesystemLocation(path, "ext4", ROOT_START, DISK_BYTES - ROOT_START)


def test_the_sandbox_has_no_network_and_no_host_path(guest_disk, tmp_path):
    path, _ = guest_disk
    (tmp_path / "work").mkdir()
    with initramfs.guest_tree(root_location(path), {}, tmp_path / "work") as tree:
        done = subprocess.run(
            tree.sandbox(
                ["/bin/busybox", "sh", "-c", "/bin/busybox ls /; echo @net; /bin/busybox cat /proc/net/dev"]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    listing, _, net = done.stdout.partition("@net")
    # Exactly the guest's own tree (plus lost+found of its ext4): no /work, /usr or /var of the host.
    assert set(listing.split()) == {"bin", "boot", "dev", "etc", "lost+found", "proc", "run", "tmp"}
    interfaces = [line.split(":")[0].strip() for line in net.splitlines() if ":" in line]
    assert interfaces == ["lo"]  # its own network namespace: loopback only, none of the host's NICs
    assert not tree.root.joinpath("etc").exists()  # and the copy is unmounted afterwards


def test_the_roots_uuid_names_its_device_inside_the_sandbox(guest_disk, tmp_path):
    """fstab's `UUID=` of the root resolves in the sandbox as on the source (initramfs-tools' fsck hook
    needs the root's type from it; libblkid sees no loop device there without /dev/disk/by-uuid)."""
    path, _ = guest_disk
    root_uuid = subprocess.run(
        ["blkid", "-p", "-O", str(ROOT_START), "-o", "value", "-s", "UUID", path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert root_uuid
    (tmp_path / "work").mkdir()
    with initramfs.guest_tree(root_location(path), {}, tmp_path / "work") as tree:
        done = subprocess.run(
            tree.sandbox(
                ["/bin/busybox", "sh", "-c", f"/bin/busybox readlink -f /dev/disk/by-uuid/{root_uuid}"]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == tree.devices[0]  # the loop device the copied root is mounted from
        assert tree.devices[0].startswith("/dev/loop")


def test_a_fat_boot_is_staged_and_what_changed_is_written_back(guest_disk, tmp_path):
    path, boot_uuid = guest_disk
    separate = adjust.separate_filesystems(f"UUID={boot_uuid} /boot vfat umask=0077 0 2\n", [path])
    assert separate == {"/boot": initramfs.FilesystemLocation(path, "vfat", BOOT_START, BOOT_BYTES)}
    (tmp_path / "work").mkdir()
    with initramfs.guest_tree(root_location(path), separate, tmp_path / "work") as tree:
        done = subprocess.run(
            tree.sandbox(["/bin/busybox", "sh", "-c", "echo new initrd > /boot/initrd.img-6.1"]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    assert fat_file(path, "initrd.img-6.1") == b"new initrd\n"


def test_a_rebuild_that_cannot_run_is_logged_and_the_conversion_goes_on(guest_disk):
    path, _ = guest_disk
    notes = []
    changes = adjust.adjust_guest([path], FACTS, [], note=lambda text, level: notes.append((level, text)))
    assert [c.path for c in changes] == ["/etc/fstab"]  # the other change still made
    [(level, text)] = notes
    assert level == "warning"
    assert "the native rebuild cannot run: the guest has neither update-initramfs nor dracut" in text
    assert "the verification decides" in text
    assert fat_file(path, "initrd.img-6.1") == b"old initrd"  # nothing written back
    assert adjust.read_guest_file(adjust.find_root([path], {}), initramfs.INITRAMFS_TOOLS_CONF) is None


def test_no_rebuild_when_the_initramfs_already_has_a_virtio_disk_driver(guest_disk):
    path, _ = guest_disk
    facts = {**FACTS, "initramfs": {**FACTS["initramfs"], "virtio_modules": ["virtio_blk", "virtio_pci"]}}
    notes = []
    adjust.adjust_guest([path], facts, [], note=lambda text, level: notes.append(text))
    assert notes == []


def test_module_names_from_a_listing():
    listing = (
        "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/block/virtio_blk.ko\n"
        "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/ata/ahci.ko.xz\n"
        "usr/lib/modules/6.1.0-28-amd64/kernel/drivers/virtio\n"
        "-rw-r--r-- 1 root root 1 Jan 1 usr/lib/modules/5.14/kernel/drivers/scsi/virtio_scsi.ko.zst\n"
    )
    assert initramfs.modules_in(listing) == {"virtio_blk", "ahci", "virtio_scsi"}
