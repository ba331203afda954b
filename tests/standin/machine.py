"""A stand-in physical machine for P2V tests: key-only sshd in its own network and mount namespaces.

What an SSH session on it sees:
- one NIC (`eth0`, a veth whose other end is on the host) with its own address;
- exactly one disk: a bootable image (tests/standin/image.py) attached as a loop device. sshd runs
  in a private mount namespace where /sys/block holds only that loop device, so lsblk and the
  assessment see the stand-in's disk and its real size, not the host's;
- BIOS or UEFI firmware: for UEFI, /sys/firmware in that namespace holds an `efi` directory (how
  Linux tells the two apart, PLATFORM-NOTES);
- the host's CPUs, memory, kernel and userland (it is a namespace, not a VM), plus a directory of
  fake tools first on PATH (`install_tool`), e.g. a `smartctl` that reports a failing disk.

Everything created carries a unique prefix (`dcp<hex>`) and is removed by `close()`: processes by
PID (the ones in our network namespace), our loop device, our namespace and veth, our files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = "/usr/sbin/sshd"
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MiB = 1024 * 1024


class StandinError(RuntimeError):
    pass


def _run(*argv: str, timeout_s: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and done.returncode != 0:
        raise StandinError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _keygen(path: Path, comment: str, key_type: str = "ed25519") -> None:
    _run("ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path))


def ssh_keygen_fingerprint(public_key_path: Path) -> str:
    """The SHA256 fingerprint as OpenSSH prints it (an independent check of p2v.ssh.fingerprint_of)."""
    return _run("ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_path)).stdout.split()[1]


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 in 10.160.0.0/11 that no route or address on the host already covers."""
    used = []
    for route in json.loads(_run("ip", "-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    for _ in range(64):
        base = ipaddress.ip_address("10.160.0.0") + secrets.randbelow(1 << 19) * 4
        net = ipaddress.ip_network(f"{base}/30")
        if not any(net.overlaps(other) for other in used):
            return net
    raise StandinError("no free /30 found in 10.160.0.0/11")


@dataclasses.dataclass
class StandinMachine:
    prefix: str
    netns: str
    workdir: Path
    address: str
    host_address: str
    port: int
    user: str
    private_key: str  # the admin's credential for this machine (OpenSSH PEM)
    private_key_path: Path
    host_key_fingerprint: str  # of the host key sshd presents now
    loop_device: str
    image_path: Path
    image: object | None  # tests.standin.image.StandinImage
    firmware: str
    disk_size_bytes: int
    tools_dir: Path
    sshd_log: Path
    sshd_pid: int | None = None
    host_veth: str = ""
    rsa_host_key_fingerprint: str = ""  # sshd also holds an RSA host key (as real servers do)
    _closed: bool = False
    # (file in workdir, path it covers) bound inside the stand-in's own mount namespace only
    namespace_binds: list = dataclasses.field(default_factory=list)

    # --- connection facts -------------------------------------------------------------------------
    def endpoint(self) -> dict:
        """How to reach it: address, port, user, private key, host-key fingerprint, and its disk."""
        return {
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "private_key": self.private_key,
            "host_key_fingerprint": self.host_key_fingerprint,
            "loop_device": self.loop_device,
        }

    @property
    def loop_name(self) -> str:
        return Path(self.loop_device).name

    # --- sshd ---------------------------------------------------------------------------------------
    def _namespace_script(self) -> str:
        lines = [
            "set -e",
            f"mount -t tmpfs -o size=64k,mode=755 {self.prefix}-blk /sys/block",
            f"ln -s ../devices/virtual/block/{self.loop_name} /sys/block/{self.loop_name}",
        ]
        if self.firmware == "uefi":
            lines += [
                f"mount -t tmpfs -o size=64k,mode=755 {self.prefix}-fw /sys/firmware",
                "mkdir /sys/firmware/efi",
            ]
        lines += [f"mount --bind {source} {target}" for source, target in self.namespace_binds]
        lines.append(f"exec {SSHD} -D -f {self.workdir / 'sshd_config'} -E {self.sshd_log}")
        return "\n".join(lines)

    def start_sshd(self, timeout_s: float = 10) -> None:
        if self.sshd_running():
            return
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                self._namespace_script(),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.sshd_pid = proc.pid  # ip netns exec and unshare exec: this PID becomes sshd
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StandinError(
                    f"sshd exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}"
                    f" log: {self.sshd_log.read_text()[-500:] if self.sshd_log.exists() else ''}"
                )
            if self._port_open():
                return
            time.sleep(0.05)
        raise StandinError(f"sshd did not listen on {self.address}:{self.port} within {timeout_s} s")

    def _port_open(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.address, self.port)) == 0

    def sshd_running(self) -> bool:
        if self.sshd_pid is None:
            return False
        try:
            pid, _ = os.waitpid(self.sshd_pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def namespace_pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def stop_sshd(self, kill_sessions: bool = True, timeout_s: float = 10) -> None:
        """Stop the listening sshd; with kill_sessions, also every open session (breaks transfers)."""
        pids = [self.sshd_pid] if self.sshd_pid else []
        if kill_sessions:
            pids += [p for p in self.namespace_pids() if p not in pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kill_sessions else signal.SIGTERM)
        if self.sshd_pid:
            deadline = time.monotonic() + timeout_s
            while self.sshd_running() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.sshd_pid = None

    def add_login_user(self, name: str, *, sudo: str, password: str = "") -> None:
        """A non-root login user with the machine's key, visible only inside this stand-in's mount
        namespace (its own /etc/passwd, group, shadow and sudoers bound over the host's there).

        sudo: "nopasswd" (NOPASSWD: ALL), "password" (sudo asks for `password`) or "none" (no sudo
        rule). Then `user` is that name and sshd restarts with the new files."""
        if sudo not in ("nopasswd", "password", "none"):
            raise ValueError(f"sudo must be nopasswd, password or none, got {sudo!r}")
        if not shutil.which("sudo"):
            raise StandinError("sudo is not installed (scripts/install-apt.sh standin)")
        uid = 4242
        # sshd reads authorized_keys as the user: it must reach it (the private key stays 0600).
        self.workdir.chmod(0o711)
        (self.workdir / "authorized_keys").chmod(0o644)
        rules = {
            "nopasswd": f"{name} ALL=(root) NOPASSWD: ALL\n",
            "password": f"{name} ALL=(root) ALL\n",
            "none": "",
        }
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        os.chown(home, uid, uid)
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=password or secrets.token_hex(8),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        files = {
            "passwd": Path("/etc/passwd").read_text() + f"{name}:x:{uid}:{uid}::{home}:/bin/sh\n",
            "group": Path("/etc/group").read_text() + f"{name}:x:{uid}:\n",
            "shadow": Path("/etc/shadow").read_text() + f"{name}:{hashed.stdout.strip()}:19000:0:99999:7:::\n",  # noqa: E501
            "sudoers": "Defaults !lecture\nroot ALL=(ALL:ALL) ALL\n" + rules[sudo],
        }
        modes = {"passwd": 0o644, "group": 0o644, "shadow": 0o640, "sudoers": 0o440}
        binds = []
        for base, text in files.items():
            path = self.workdir / f"etc-{base}"
            path.write_text(text)
            path.chmod(modes[base])
            binds.append((path, Path("/etc") / base))
        self.namespace_binds = binds
        self.user = name
        self.restart_sshd()

    def restart_sshd(self) -> None:
        self.stop_sshd(kill_sessions=True)
        self.start_sshd()

    # --- host keys --------------------------------------------------------------------------------
    def swap_host_key(self) -> str:
        """Make sshd present a different host key (as after a reinstall or an impostor); new fingerprint."""
        return self._use_host_key(self.workdir / "host_key_other")

    def restore_host_key(self) -> str:
        return self._use_host_key(self.workdir / "host_key_original")

    def _use_host_key(self, source: Path) -> str:
        target = self.workdir / "host_key"
        shutil.copyfile(source, target)
        shutil.copyfile(source.with_suffix(".pub"), target.with_suffix(".pub"))
        target.chmod(0o600)
        self.restart_sshd()
        self.host_key_fingerprint = ssh_keygen_fingerprint(target.with_suffix(".pub"))
        return self.host_key_fingerprint

    # --- fake tools -------------------------------------------------------------------------------
    def install_tool(self, name: str, script: str) -> Path:
        """Put an executable `name` first on the sessions' PATH (a shell script, '#!/bin/sh' added)."""
        path = self.tools_dir / name
        body = script if script.startswith("#!") else "#!/bin/sh\n" + script
        path.write_text(body)
        path.chmod(0o755)
        return path

    def remove_tool(self, name: str) -> None:
        (self.tools_dir / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def fake_tool(self, name: str, script: str) -> Iterator[Path]:
        path = self.install_tool(name, script)
        try:
            yield path
        finally:
            self.remove_tool(name)

    # --- what the machine is, read without SSH (for independent checks) ----------------------------
    def nic_macs(self) -> dict[str, str]:
        links = json.loads(_run("ip", "-n", self.netns, "-j", "link").stdout)
        return {link["ifname"]: link["address"] for link in links if link.get("link_type") == "ether"}

    def log_offset(self) -> int:
        return self.sshd_log.stat().st_size if self.sshd_log.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.sshd_log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")

    # --- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        with contextlib.suppress(Exception):
            self.stop_sshd(kill_sessions=True)
        for argv in (
            ["ip", "link", "del", self.host_veth],
            ["ip", "netns", "del", self.netns],
            ["losetup", "-d", self.loop_device],
        ):
            done = _run(*argv, check=False)
            if done.returncode != 0 and "Cannot find device" not in done.stderr:
                errors.append(f"{' '.join(argv)}: {done.stderr.strip()}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise StandinError("stand-in cleanup: " + "; ".join(errors))


def _our_loop_device(image_path: Path, read_only: bool) -> str:
    argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(image_path)]
    return _run(*argv).stdout.strip()


def start_standin(
    *,
    firmware: str = "bios",
    disk_size_bytes: int = 256 * MiB,
    used_bytes: int = 24 * MiB,
    read_only: bool = True,
    workdir: Path | None = None,
    image_path: Path | None = None,
) -> StandinMachine:
    """Build the disk image, the namespace, keys and sshd; return the running stand-in.

    image_path: use this existing disk image instead of building one (it is not deleted).
    read_only: attach the disk read-only (P2V only ever reads the source).
    """
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be 'bios' or 'uefi', got {firmware!r}")
    prefix = f"dcp{secrets.token_hex(3)}"
    work = Path(workdir or tempfile.mkdtemp(prefix=f"{prefix}-"))
    work.mkdir(parents=True, exist_ok=True)
    image = None
    if image_path is None:
        from tests.standin.image import build_bootable_image

        image = build_bootable_image(
            work / "disk.img", firmware=firmware, size_bytes=disk_size_bytes, used_bytes=used_bytes
        )
        image_path = work / "disk.img"
    size = Path(image_path).stat().st_size
    tools_dir = work / "tools"
    tools_dir.mkdir()
    for name, role in (
        ("client_key", "credential"),
        ("host_key_original", "host"),
        ("host_key_other", "host"),
    ):
        _keygen(work / name, f"{prefix}-{role}")
    _keygen(work / "host_rsa_key", f"{prefix}-host-rsa", key_type="rsa")
    shutil.copyfile(work / "client_key.pub", work / "authorized_keys")
    shutil.copyfile(work / "host_key_original", work / "host_key")
    shutil.copyfile(work / "host_key_original.pub", work / "host_key.pub")
    (work / "host_key").chmod(0o600)

    net = _free_subnet()
    host_address, address = (str(h) for h in net.hosts())
    netns, host_veth = prefix, f"{prefix}h"
    machine = StandinMachine(
        prefix=prefix,
        netns=netns,
        workdir=work,
        address=address,
        host_address=host_address,
        port=22,
        user="root",
        private_key=(work / "client_key").read_text(),
        private_key_path=work / "client_key",
        host_key_fingerprint=ssh_keygen_fingerprint(work / "host_key.pub"),
        loop_device="",
        image_path=Path(image_path),
        image=image,
        firmware=firmware,
        disk_size_bytes=size,
        tools_dir=tools_dir,
        sshd_log=work / "sshd.log",
        host_veth=host_veth,
    )
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_veth, "type", "veth", "peer", "name", f"{prefix}g")
        _run("ip", "link", "set", f"{prefix}g", "netns", netns)
        _run("ip", "-n", netns, "link", "set", f"{prefix}g", "name", "eth0")
        _run("ip", "addr", "add", f"{host_address}/30", "dev", host_veth)
        _run("ip", "-n", netns, "addr", "add", f"{address}/30", "dev", "eth0")
        _run("ip", "link", "set", host_veth, "up")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        machine.loop_device = _our_loop_device(Path(image_path), read_only)
        (work / "sshd_config").write_text(
            f"ListenAddress {address}:22\n"
            f"HostKey {work / 'host_key'}\n"
            f"HostKey {work / 'host_rsa_key'}\n"
            f"AuthorizedKeysFile {work / 'authorized_keys'}\n"
            f"PidFile {work / 'sshd.pid'}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n"
            "PrintMotd no\nUseDNS no\nMaxStartups 50\nMaxSessions 50\n"
            f"SetEnv PATH={tools_dir}:{STANDARD_PATH}\n"
            "Subsystem sftp internal-sftp\n"
        )
        machine.rsa_host_key_fingerprint = ssh_keygen_fingerprint(work / "host_rsa_key.pub")
        machine.start_sshd()
    except BaseException:
        machine.close()
        raise
    return machine


def need_standin_tools() -> None:
    """Skip (fail in CI) unless this machine can run the stand-in: root, namespaces, sshd, loop devices."""
    from tests.environment import need_binary, need_root

    need_root()
    need_binary(
        "sshd",
        "ssh-keygen",
        "ip",
        "unshare",
        "losetup",
        "sfdisk",
        "mkfs.ext4",
        "mkfs.vfat",
        "mcopy",
        "syslinux",
    )


def standin_fixture(firmware: str = "bios"):
    """A session-scoped pytest fixture yielding a running StandinMachine with the given firmware.

    In a conftest: `standin_machine = standin_fixture()` (or `standin_uefi = standin_fixture("uefi")`).
    """
    import pytest

    @pytest.fixture(scope="session")
    def _standin() -> Iterator[StandinMachine]:
        need_standin_tools()
        machine = start_standin(firmware=firmware)
        try:
            yield machine
        finally:
            machine.close()

    return _standin
