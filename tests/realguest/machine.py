"""The real Debian guest booted under QEMU (TCG) as a P2V source "physical" machine.

It looks like a small server: q35 with AHCI disks (sda, sdb), an e1000e NIC, SMBIOS of a Dell
PowerEdge, 1 GiB of RAM, 2 CPUs. Its NIC is a tap device of our own on the host with a random
/30 (10.160.0.0/11, only where no route exists); the guest has the other address, configured
statically by systemd-networkd, written into this session's copy of the disk.

Everything carries a unique prefix (`dcr<hex>`) and is removed by close(): the QEMU process by
its PID, the tap by name, the work directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.realguest.image import NETWORK_FILE, GuestImage, ensure_guest_image
from tests.standin.machine import _free_subnet

MiB = 1024 * 1024
SOURCE_MAC = "52:54:00:d3:11:01"
SMBIOS = {"manufacturer": "Dell Inc.", "product": "PowerEdge R640", "serial": "7XQ2K93"}
DISK_SERIALS = ("S3Z9NX0M100001", "S3Z9NX0M100002")


class RealGuestError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL when the test process dies (a pytest-timeout exit runs no
    teardown); QEMU created the tap itself, so the tap goes with it."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RealGuestError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclasses.dataclass
class RealGuest:
    prefix: str
    image: GuestImage
    workdir: Path
    system_disk: Path
    data_disk: Path
    tap: str
    address: str
    host_address: str
    memory_bytes: int
    vcpus: int
    console_log: Path
    process: subprocess.Popen | None = None
    user: str = "root"
    port: int = 22

    @property
    def private_key(self) -> str:
        return self.image.client_key.read_text()

    @property
    def host_key_fingerprint(self) -> str:
        return self.image.host_key_fingerprint

    @property
    def mac(self) -> str:
        return SOURCE_MAC

    def console(self) -> str:
        try:
            return self.console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        self.console_log.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64",
            "-name",
            self.prefix,
            "-machine",
            "q35,accel=tcg",
            "-smp",
            f"{self.vcpus},sockets=1,cores={self.vcpus},threads=1",
            "-m",
            f"{self.memory_bytes // MiB}M",
            "-display",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-serial",
            f"file:{self.console_log}",
            "-smbios",
            "type=1,manufacturer={manufacturer},product={product},serial={serial}".format(**SMBIOS),
            "-smbios",
            f"type=3,manufacturer={SMBIOS['manufacturer']},serial={SMBIOS['serial']}",
        ]
        for index, (disk, serial) in enumerate(
            zip((self.system_disk, self.data_disk), DISK_SERIALS, strict=True)
        ):
            argv += [
                "-drive",
                f"file={disk},format=raw,if=none,id=d{index},cache=unsafe",
                "-device",
                f"ide-hd,drive=d{index},bus=ide.{index},serial={serial},model=SAMSUNG MZ7LH480",
            ]
        argv += [
            "-netdev",
            f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device",
            f"e1000e,netdev=n0,mac={SOURCE_MAC},bus=pcie.0,addr=0x3",
        ]
        self.process = subprocess.Popen(
            argv,
            preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "qemu.err").open("wb"),
            start_new_session=True,
        )

    def wait_for_ssh(self, timeout_s: float = 600) -> None:
        """Until sshd answers with its banner (a booting guest has the port closed), or the guest fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RealGuestError(
                    f"QEMU exited ({self.process and self.process.returncode}): "
                    f"{(self.workdir / 'qemu.err').read_text()[-500:]} console: {self.console()[-800:]!r}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.address, 22), timeout=2) as sock,
            ):
                sock.settimeout(5)
                if sock.recv(16).startswith(b"SSH-"):
                    return
            time.sleep(1)
        raise RealGuestError(
            f"no sshd on {self.address} within {timeout_s} s; console: {self.console()[-1500:]!r}"
        )

    def ssh(self, command: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Run a command on the guest as root with OpenSSH (an independent path from the product's)."""
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(self.image.client_key),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                f"root@{self.address}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def wait_settled(self, timeout_s: float = 300) -> str:
        """Until systemd has started everything it will start (what an admin's server looks like)."""
        done = self.ssh(f"timeout {int(timeout_s)} systemctl is-system-running --wait", timeout_s + 30)
        state = done.stdout.strip()
        if state not in ("running", "degraded"):
            raise RealGuestError(f"the guest did not settle: {state!r} {done.stderr.strip()[-300:]}")
        return state

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.process = None

    def close(self) -> None:
        errors = []
        try:
            self.stop()
        except Exception as exc:  # keep cleaning up; reported below
            errors.append(f"stopping QEMU: {exc}")
        done = _run("ip", "link", "del", self.tap, check=False)
        if done.returncode != 0 and "Cannot find device" not in done.stderr:
            errors.append(done.stderr.strip())
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise RealGuestError("real guest cleanup: " + "; ".join(errors))


def write_network_config(guest: RealGuest) -> None:
    """The guest's static address for this session, into its own copy of the system disk."""
    from p2v.conversion.adjust import VolumePartition, write_file

    root = VolumePartition(2, guest.image.root_offset_bytes, "ext4", guest.image.root_uuid)
    write_file(
        str(guest.system_disk),
        root,
        NETWORK_FILE,
        "[Match]\n"
        f"MACAddress={SOURCE_MAC}\n\n"
        "[Network]\n"
        f"Address={guest.address}/30\n"
        f"Gateway={guest.host_address}\n",
    )


def start_real_guest(
    memory_bytes: int = 1024 * MiB, vcpus: int = 2, image: GuestImage | None = None
) -> RealGuest:
    """Copy the cached disks (the base image, or a variant's), set up the tap, boot, and wait until
    sshd answers."""
    image = image or ensure_guest_image()
    prefix = f"dcr{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=os.environ.get("P2V_REALGUEST_WORKDIR")))
    net = _free_subnet()
    host_address, address = (str(h) for h in net.hosts())
    guest = RealGuest(
        prefix=prefix,
        image=image,
        workdir=workdir,
        system_disk=workdir / "sda.img",
        data_disk=workdir / "sdb.img",
        tap=f"{prefix}t",
        address=address,
        host_address=host_address,
        memory_bytes=memory_bytes,
        vcpus=vcpus,
        console_log=workdir / "console.log",
    )
    try:
        for source, target in ((image.system_disk, guest.system_disk), (image.data_disk, guest.data_disk)):
            _run("cp", "--sparse=always", str(source), str(target))
        write_network_config(guest)
        guest.start()  # QEMU creates the tap (and removes it when it exits)
        deadline = time.monotonic() + 60
        while _run("ip", "link", "show", guest.tap, check=False).returncode != 0:
            if time.monotonic() > deadline or guest.process.poll() is not None:
                raise RealGuestError(
                    f"QEMU made no tap {guest.tap}: {(workdir / 'qemu.err').read_text()[-300:]}"
                )
            time.sleep(0.1)
        _run("ip", "addr", "add", f"{host_address}/30", "dev", guest.tap)
        _run("ip", "link", "set", guest.tap, "up")
        guest.wait_for_ssh()
    except BaseException:
        guest.close()
        raise
    return guest
