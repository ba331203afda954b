"""Fixtures of the real-guest P2V stage: one booted Debian guest per session (the costly part),
real libvirtd and the storage pool of the conversion tests, a real Celery worker."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.environment import need, need_binary, need_root
from tests.p2v_conversion.conftest import libvirt_conn, p2v_pool, p2v_prefix  # noqa: F401 (fixtures)
from tests.services import celery_worker  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def real_guest() -> Iterator:
    """The "physical" server: Debian 12 under QEMU with AHCI disks, an e1000e NIC and Dell SMBIOS."""
    need_root()
    need_binary("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "mcopy", "syslinux", "sfdisk", "debugfs")
    need(shutil.which("ssh-keygen") is not None, "needs ssh-keygen (openssh-client)")
    from tests.realguest.machine import start_real_guest

    guest = start_real_guest()
    try:
        guest.wait_settled()
        yield guest
    finally:
        guest.close()
