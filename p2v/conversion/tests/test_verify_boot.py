"""The proof boot's stretched systemd start timeouts: written into the copy before the boot, and the
guest's own file back, byte for byte, after it (debugfs on a raw ext4 image: no root needed)."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from p2v.conversion import adjust, verify_boot
from tests.environment import need_binary

MiB = 1024 * 1024
DEBIAN_SYSTEM_CONF = (
    "#  This file is part of systemd.\n[Manager]\n#LogLevel=info\n#DefaultTimeoutStartSec=90s\n"
)
FACTS: dict = {}


@pytest.fixture
def guest_disk(tmp_path):
    """MBR, partition 1 ext4 with the guest's /etc/fstab and /etc/systemd/system.conf."""
    need_binary("sfdisk", "mkfs.ext4", "debugfs", "blkid")
    root = tmp_path / "root"
    (root / "etc/systemd").mkdir(parents=True)
    (root / "etc/fstab").write_text("UUID=x / ext4 defaults 0 1\n")
    (root / "etc/systemd/system.conf").write_text(DEBIAN_SYSTEM_CONF)
    path = tmp_path / "disk.raw"
    with path.open("wb") as handle:
        handle.truncate(48 * MiB)
    subprocess.run(
        ["sfdisk", "-q", str(path)], input=b"label: dos\nstart=2048, type=83\n", check=True, timeout=30
    )
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-U", str(uuid.uuid4()), "-E", f"offset={MiB}", "-d", str(root), str(path),
         f"{47 * 1024}k"],
        check=True,
        timeout=30,
    )  # fmt: skip
    return str(path)


def system_conf(path: str) -> str | None:
    return adjust.read_guest_file(adjust.find_root([path], FACTS), verify_boot.SYSTEM_CONF)


def test_the_timeout_is_raised_for_the_proof_boot_and_the_file_restored_after_it(guest_disk):
    note = verify_boot.relax_start_timeouts([guest_disk], FACTS, 900)
    assert note.startswith("systemd start timeouts set to 900 s")
    during = system_conf(guest_disk)
    assert during.startswith(DEBIAN_SYSTEM_CONF)
    assert during.endswith("[Manager]\nDefaultTimeoutStartSec=900s\n" + verify_boot.BLOCK_END)
    assert (
        verify_boot.restore_start_timeouts([guest_disk], FACTS)
        == "/etc/systemd/system.conf restored as the guest had it"
    )
    assert system_conf(guest_disk) == DEBIAN_SYSTEM_CONF
    assert verify_boot.restore_start_timeouts([guest_disk], FACTS) is None  # nothing left to remove


def test_a_resumed_run_writes_one_block_over_a_leftover_one(guest_disk):
    verify_boot.relax_start_timeouts([guest_disk], FACTS, 300)
    verify_boot.relax_start_timeouts([guest_disk], FACTS, 900)
    assert system_conf(guest_disk).count(verify_boot.BLOCK_START) == 1
    verify_boot.restore_start_timeouts([guest_disk], FACTS)
    assert system_conf(guest_disk) == DEBIAN_SYSTEM_CONF


def test_a_guest_without_systemd_is_left_alone(guest_disk):
    root = adjust.find_root([guest_disk], FACTS)
    adjust._debugfs(guest_disk, root.offset_bytes, f"rm {verify_boot.SYSTEM_CONF}\n", write=True)
    assert "left as they are" in verify_boot.relax_start_timeouts([guest_disk], FACTS, 900)
    assert system_conf(guest_disk) is None


def test_the_block_text_keeps_the_guest_file_apart():
    assert verify_boot.without_block(verify_boot.with_block("a=1", 600)) == "a=1\n"
    assert verify_boot.without_block(DEBIAN_SYSTEM_CONF) == DEBIAN_SYSTEM_CONF
