"""Variants of the real Debian guest, each derived from the cached base image and cached by its inputs.

`modules_dep_image()`: the same server with a host-only initramfs (initramfs-tools `MODULES=dep`,
the default shape of RHEL-family initramfs): built by the guest itself, booted on its AHCI disks
and e1000e NIC, so its initramfs holds the drivers of that hardware and no virtio_blk. A VM made
from it stops in the initramfs shell unless the conversion rebuilds the initramfs.

The build boots the base image once under QEMU (TCG) and runs `update-initramfs` inside it (a few
minutes); the result is cached under P2V_REALGUEST_CACHE keyed by the base image's key and this
file's source, so only the first run on a machine pays. The per-session network file is put back to
the base image's placeholder before the disks are cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from tests.realguest.image import (
    CACHE_ROOT,
    NETWORK_FILE,
    GuestBuildError,
    GuestImage,
    _lock,
    ensure_guest_image,
    image_key,
)

MODULES_DEP_CONF = "/etc/initramfs-tools/conf.d/host-only.conf"
# What the base initramfs (MODULES=most) holds and a host-only one must not: the VM's disk driver.
VIRTIO_DISK_MODULE = "virtio_blk"
NETWORK_PLACEHOLDER = "# written per test session by tests/realguest/machine.py\n"
SHUTDOWN_TIMEOUT_S = 300


def _variant_key(name: str) -> str:
    source = Path(__file__).read_bytes()
    return hashlib.sha256(name.encode() + image_key().encode() + source).hexdigest()[:16]


def _variant(base: GuestImage, directory: Path) -> GuestImage:
    return dataclasses.replace(
        base,
        directory=directory,
        system_disk=directory / "system.img",
        data_disk=directory / "data.img",
        client_key=directory / "client_key",
    )


def initramfs_modules(guest, release: str) -> set[str]:
    """Kernel module names inside the guest's initramfs for `release`, listed by the guest itself."""
    done = guest.ssh(f"lsinitramfs /boot/initrd.img-{release} | grep -E '\\.ko'", timeout_s=600)
    if done.returncode != 0:
        raise GuestBuildError(f"lsinitramfs in the guest failed: {done.stderr.strip()[-300:]}")
    names = set()
    for line in done.stdout.split():
        name = line.rsplit("/", 1)[-1].split(".ko", 1)[0]
        names.add(name.replace("-", "_"))
    return names


def _power_off(guest) -> None:
    """A clean shutdown from inside (the cached filesystem must be consistent), then wait for QEMU."""
    guest.ssh("systemctl poweroff", timeout_s=60)  # the session may drop as the guest goes down
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
    while guest.process.poll() is None:
        if time.monotonic() > deadline:
            raise GuestBuildError(f"the guest did not power off within {SHUTDOWN_TIMEOUT_S} s")
        time.sleep(0.5)


def modules_dep_image() -> GuestImage:
    """The real guest with a host-only (`MODULES=dep`) initramfs: no virtio disk driver inside."""
    from p2v.conversion.adjust import VolumePartition, write_file
    from tests.realguest.machine import start_real_guest

    base = ensure_guest_image()
    directory = CACHE_ROOT / f"realguest-modules-dep-{_variant_key('modules-dep')}"
    with _lock(directory):
        meta = directory / "image.json"
        if not meta.exists():
            partial = directory.with_name(directory.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            guest = start_real_guest(image=base)
            try:
                guest.wait_settled()
                release = base.kernel_release
                done = guest.ssh(
                    f"printf 'MODULES=dep\\n' > {MODULES_DEP_CONF} && update-initramfs -u -k all",
                    timeout_s=1800,
                )
                if done.returncode != 0:
                    raise GuestBuildError(f"update-initramfs (MODULES=dep) failed: {done.stderr[-500:]}")
                modules = initramfs_modules(guest, release)
                if VIRTIO_DISK_MODULE in modules or "ahci" not in modules:
                    raise GuestBuildError(
                        f"the host-only initramfs is not what this variant needs: {sorted(modules)}"
                    )
                _power_off(guest)
                for disk, name in ((guest.system_disk, "system.img"), (guest.data_disk, "data.img")):
                    shutil.move(disk, partial / name)
            finally:
                guest.close()
            root = VolumePartition(2, base.root_offset_bytes, "ext4", base.root_uuid)
            write_file(str(partial / "system.img"), root, NETWORK_FILE, NETWORK_PLACEHOLDER)
            for key in ("client_key", "client_key.pub"):
                shutil.copy2(base.directory / key, partial / key)
            description = {
                "variant": "modules-dep",
                "base": base.directory.name,
                "initramfs_modules": sorted(modules),
            }
            (partial / "image.json").write_text(json.dumps(description))
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)
    return _variant(base, directory)
