"""Disk copy over SSH into libvirt volumes: only used data crosses, the volume stays sparse, the
checksum is checked by reading the volume back, and a killed sshd mid-copy costs at most one segment.

Real sshd (the stand-in in its network namespace, disk on a loop device), real libvirtd.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from p2v import ssh
from p2v.conversion import copy as copy_mod
from tests.p2v_conversion.conftest import MiB, standin_endpoint
from tests.standin.machine import need_standin_tools, start_standin

pytestmark = [pytest.mark.libvirt, pytest.mark.standin, pytest.mark.slow]
GiB = 1024 * MiB


@pytest.fixture(scope="module")
def big_standin():
    """A stand-in with a 1 GiB disk of which about 100 MiB is used."""
    need_standin_tools()
    machine = start_standin(firmware="bios", disk_size_bytes=GiB, used_bytes=100 * MiB)
    try:
        yield machine
    finally:
        machine.close()


def allocated_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def new_volume(pool, name: str, size: int):
    return pool.createXML(
        f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
        "<allocation>0</allocation><target><format type='raw'/></target></volume>",
        0,
    )


def same_bytes(a, b) -> bool:
    """An independent byte-for-byte comparison (cmp), not our own checksum code."""
    return subprocess.run(["cmp", "-s", str(a), str(b)], timeout=120, check=False).returncode == 0


def login(machine, transport: str):
    """None: the data streams through paramiko; a login: through the OpenSSH client."""
    if transport == "paramiko":
        return None
    return copy_mod.OpenSSHLogin(machine.address, machine.port, machine.user, machine.private_key)


def opener(machine):
    endpoint = standin_endpoint(machine)
    return lambda: ssh.connect(endpoint).client


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_copy_moves_only_used_data_and_keeps_the_volume_sparse(
    transport, big_standin, libvirt_conn, p2v_pool, p2v_prefix
):
    used = allocated_bytes(big_standin.image_path)  # what the source really holds (fs data + metadata)
    vol = new_volume(p2v_pool, f"{p2v_prefix}sparse-{transport}.raw", big_standin.disk_size_bytes)
    try:
        progress = copy_mod.copy_disk(
            opener(big_standin),
            big_standin.loop_device,
            libvirt_conn,
            vol,
            big_standin.disk_size_bytes,
            openssh=login(big_standin, transport),
        )
        copy_mod.verify_volume(libvirt_conn, vol, progress)  # read back, every segment's digest compared
        assert progress.wire_bytes <= used * 1.05, (progress.wire_bytes, used)
        assert progress.data_bytes >= big_standin.image.data_bytes  # the random payload did cross
        allocation = vol.info()[2]
        assert allocation <= used * 1.05, f"volume allocates {allocation} bytes for {used} used"
        assert same_bytes(big_standin.image_path, vol.path()), "volume differs from the source"
    finally:
        vol.delete(0)


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_sshd_killed_mid_copy_resumes_without_recopying_what_arrived(
    transport, conversion_standin_bios, libvirt_conn, p2v_pool, p2v_prefix
):
    big_standin = conversion_standin_bios  # 256 MiB disk, copied in 8 MiB segments
    segment_bytes = 8 * MiB
    vol = new_volume(p2v_pool, f"{p2v_prefix}resume-{transport}.raw", big_standin.disk_size_bytes)
    killed_at: list[int] = []
    restarted = threading.Event()

    def restart_later() -> None:
        big_standin.start_sshd()
        restarted.set()

    def on_progress(progress: copy_mod.CopyProgress) -> None:
        # Once two segments are on the volume, kill sshd and every session (the reader dies with
        # it) while the next segment is in flight, then bring sshd back a moment later.
        if not killed_at and progress.checkpoint >= 2 * progress.segment_bytes:
            killed_at.append(progress.checkpoint)
            big_standin.stop_sshd(kill_sessions=True)
            threading.Timer(0.5, restart_later).start()

    try:
        progress = copy_mod.copy_disk(
            opener(big_standin),
            big_standin.loop_device,
            libvirt_conn,
            vol,
            big_standin.disk_size_bytes,
            on_progress=on_progress,
            segment_bytes=segment_bytes,
            retryable=(ssh.HostUnreachable, ssh.ConnectionLost),
            retry=copy_mod.RetryPolicy(initial_delay_s=0.5, max_delay_s=1.0, window_s=120.0),
            openssh=login(big_standin, transport),
        )
        assert restarted.wait(10)
        assert killed_at, "the copy finished before sshd could be killed"
        assert progress.resumes >= 1
        assert progress.checkpoint == big_standin.disk_size_bytes
        # Only the segment that was in flight is sent again, never what was checkpointed.
        assert progress.resent_bytes <= progress.segment_bytes, progress.resent_bytes
        used = allocated_bytes(big_standin.image_path)
        assert progress.wire_bytes <= used * 1.05 + progress.segment_bytes
        copy_mod.verify_volume(libvirt_conn, vol, progress)
        assert same_bytes(big_standin.image_path, vol.path())
    finally:
        if not big_standin.sshd_running():
            big_standin.start_sshd()
        vol.delete(0)


def test_source_unreachable_for_longer_than_the_old_window_resumes_at_its_offset(
    conversion_standin_bios, libvirt_conn, p2v_pool, p2v_prefix
):
    """A source that goes away mid-copy (a reboot) for longer than the old ~6 s retry window and
    many more than the old 4 attempts: the copy backs off, reconnects when sshd is back and
    resumes at its checkpoint. The backoff is configured short so the test stays quick."""
    standin = conversion_standin_bios
    segment_bytes = 8 * MiB
    vol = new_volume(p2v_pool, f"{p2v_prefix}outage.raw", standin.disk_size_bytes)
    outage: dict[str, float | int] = {}
    failures: list[str] = []
    min_outage_s, min_failures = 8.0, 6  # the old code gave up after 4 attempts within about 6 s

    def on_progress(progress: copy_mod.CopyProgress) -> None:
        if not outage and progress.checkpoint >= 2 * progress.segment_bytes:
            outage["at"] = progress.checkpoint
            outage["stopped"] = time.monotonic()
            standin.stop_sshd(kill_sessions=True)

    def on_retry(progress: copy_mod.CopyProgress, exc: BaseException) -> None:
        failures.append(f"{type(exc).__name__}: {exc}")
        # Bring sshd back only once the outage is both longer and more attempts than before.
        if (
            "restarted" not in outage
            and len(failures) >= min_failures
            and time.monotonic() - outage["stopped"] >= min_outage_s
        ):
            outage["restarted"] = time.monotonic()
            standin.start_sshd()

    try:
        progress = copy_mod.copy_disk(
            opener(standin),
            standin.loop_device,
            libvirt_conn,
            vol,
            standin.disk_size_bytes,
            on_progress=on_progress,
            on_retry=on_retry,
            segment_bytes=segment_bytes,
            retryable=(ssh.HostUnreachable, ssh.ConnectionLost),
            retry=copy_mod.RetryPolicy(initial_delay_s=0.25, max_delay_s=1.0, window_s=300.0),
            openssh=login(standin, "openssh"),
        )
        assert "restarted" in outage, f"sshd was never brought back: {failures}"
        assert outage["restarted"] - outage["stopped"] >= min_outage_s
        assert len(failures) >= min_failures, failures
        assert progress.resumes == len(failures)
        assert progress.checkpoint == standin.disk_size_bytes
        # Resumed at the checkpoint: at most the segment in flight crossed twice.
        assert progress.resent_bytes <= progress.segment_bytes, progress.resent_bytes
        copy_mod.verify_volume(libvirt_conn, vol, progress)
        assert same_bytes(standin.image_path, vol.path())
    finally:
        if not standin.sshd_running():
            standin.start_sshd()
        vol.delete(0)


def test_read_back_detects_a_corrupted_volume(conversion_standin_bios, libvirt_conn, p2v_pool, p2v_prefix):
    big_standin = conversion_standin_bios
    vol = new_volume(p2v_pool, f"{p2v_prefix}corrupt.raw", big_standin.disk_size_bytes)
    try:
        progress = copy_mod.copy_disk(
            opener(big_standin), big_standin.loop_device, libvirt_conn, vol, big_standin.disk_size_bytes
        )
        offset = big_standin.disk_size_bytes - 3 * MiB  # inside a hole of the source
        with open(vol.path(), "r+b") as handle:
            handle.seek(offset)
            handle.write(b"\x01")
        with pytest.raises(copy_mod.CopyError, match="checksum mismatch in segments ending at"):
            copy_mod.verify_volume(libvirt_conn, vol, progress)
    finally:
        vol.delete(0)
