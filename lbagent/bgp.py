"""Tells the router where each VIP goes: supervises one ExaBGP process per mux and drives it
through its API (announce with next hop self, or the backend's host for a VIP in bypass; withdraw).

ExaBGP reads commands from an API process it starts itself. Ours (`exabgp-commands.py`) copies a
FIFO to ExaBGP: the daemon writes commands into the FIFO. When the
daemon dies (even kill -9) ExaBGP and its BGP session live on, so the router keeps sending to this
mux's kernel tables; a restarted daemon adopts the running ExaBGP (PID file) and re-announces, with
no route flap. Session state comes from a second API process that appends ExaBGP's JSON
neighbour events to a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lbagent.bgp")


@dataclass(frozen=True)
class BgpSettings:
    neighbor: str  # the router
    local_address: str  # this mux, also the router id and the next hop for `self`
    local_as: int
    peer_as: int
    hold_time_s: int = 3
    # The next hop for `self` of IPv6 VIPs (the session itself may be IPv4: MP-BGP carries IPv6
    # unicast over it). None: the first global IPv6 address of the interface holding local_address.
    local_address6: str | None = None

    def __post_init__(self) -> None:
        for name in ("local_as", "peer_as"):
            value = getattr(self, name)
            if not 1 <= value <= 4294967295:
                raise ValueError(f"bgp {name}: {value} is not an AS number (1..4294967295)")
        if not 3 <= self.hold_time_s <= 65535:
            raise ValueError(f"bgp hold_time_s: {self.hold_time_s} must be 3..65535")


def render_api_scripts(fifo: Path, events: Path) -> dict[str, str]:
    """The two API helper scripts (ExaBGP's `run` takes a path, not a shell line). Both keep
    their stdout open: ExaBGP counts a closed stdout as a dead helper and respawns it."""
    return {
        # Opened read-write, the FIFO never reports end-of-file, so the helper outlives daemon
        # restarts; SIGTERM from ExaBGP ends it (no orphaned children, unlike a shell loop).
        # It must die with its ExaBGP (PR_SET_PDEATHSIG): an orphan would keep reading the FIFO and
        # swallow the commands meant for the next ExaBGP.
        "exabgp-commands.py": (f"#!{sys.executable}\nimport ctypes, os, signal, sys\n"
                               "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                               "if os.getppid() == 1:\n    sys.exit(0)\n"
                               f"fd = os.open({str(fifo)!r}, os.O_RDWR)\n"
                               "while True:\n    sys.stdout.buffer.write(os.read(fd, 65536))\n"
                               "    sys.stdout.flush()\n"),
        "exabgp-events.sh": f"#!/bin/sh\ncat >> '{events}'\n",
    }


def render_exabgp_conf(settings: BgpSettings, run_dir: Path) -> str:
    return f"""process lbagent-commands {{
    run {run_dir / "exabgp-commands.py"};
    encoder text;
}}
process lbagent-events {{
    run {run_dir / "exabgp-events.sh"};
    encoder json;
}}
neighbor {settings.neighbor} {{
    router-id {settings.local_address};
    local-address {settings.local_address};
    local-as {settings.local_as};
    peer-as {settings.peer_as};
    hold-time {settings.hold_time_s};
    family {{
        ipv4 unicast;
        ipv6 unicast;
    }}
    api events {{
        processes [ lbagent-events ];
        neighbor-changes;
    }}
    api commands {{
        processes [ lbagent-commands ];
    }}
}}
"""


def _exabgp_binary() -> str:
    candidate = Path(sys.executable).with_name("exabgp")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("exabgp")
    if not found:
        raise FileNotFoundError("exabgp is not installed (pip install exabgp)")
    return found


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] != "Z"


def ipv6_of_interface_holding(address: str) -> str | None:
    """The first global IPv6 address of the interface that holds `address` here (None if none)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=False).stdout
    for link in json.loads(out or "[]"):
        infos = link.get("addr_info", [])
        if any(a.get("local") == address for a in infos):
            for a in infos:
                if a.get("family") == "inet6" and a.get("scope") == "global" and not a.get("tentative"):
                    return str(a["local"])
    return None


def host_prefix(vip: str) -> str:
    """The route of one address: /32 for IPv4, /128 for IPv6."""
    return f"{vip}/128" if ":" in vip else f"{vip}/32"


class BgpSpeaker:
    """One ExaBGP process and the routes this mux wants the router to have."""

    def __init__(self, settings: BgpSettings, run_dir: str | Path) -> None:
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.conf = self.run_dir / "exabgp.conf"
        self.fifo = self.run_dir / "exabgp.cmd"
        self.events = self.run_dir / "exabgp.events"
        self.pid_file = self.run_dir / "exabgp.pid"
        self.announced: dict[str, str] = {}  # prefix -> next hop
        self._fd: int | None = None
        self._pid: int | None = None
        self.commands_sent = 0
        self.restarts = 0

    # -- process ------------------------------------------------------------------------------
    def start(self) -> None:
        """Adopt a running ExaBGP of this mux (after a crash of the daemon) or start one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        conf_text = render_exabgp_conf(self.settings, self.run_dir)
        for name, text in render_api_scripts(self.fifo, self.events).items():
            script = self.run_dir / name
            if not script.exists() or script.read_text() != text:
                script.write_text(text)
                script.chmod(0o700)
        pid = self._running_pid()
        if pid is not None and self.conf.exists() and self.conf.read_text() == conf_text:
            log.info("adopting running exabgp pid=%d", pid)
            self._pid = pid
        else:
            if pid is not None:
                self._kill(pid)
            self.conf.write_text(conf_text)
            if not self.fifo.exists():
                os.mkfifo(self.fifo, 0o600)
            self.events.write_text("")
            env = {**os.environ, "exabgp_daemon_drop": "false", "exabgp_daemon_user": "root",
                   "exabgp_api_cli": "false", "exabgp_api_ack": "false",
                   "exabgp_log_destination": str(self.run_dir / "exabgp.log"),
                   "exabgp_daemon_daemonize": "false"}
            with open(self.run_dir / "exabgp.out", "ab") as out:
                proc = subprocess.Popen([_exabgp_binary(), str(self.conf)], env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            self._pid = proc.pid
            self.pid_file.write_text(str(proc.pid))
        # O_RDWR: never blocks, and keeps the pipe open while the reader loop restarts `cat`.
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        return pid if str(self.conf).encode() in cmdline else None  # a reused PID is not ours

    @staticmethod
    def _kill(pid: int, timeout_s: float = 3.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def alive(self) -> bool:
        if self._pid is None:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, os.WNOHANG)
        return _alive(self._pid)

    def restart_if_dead(self) -> bool:
        """Supervision: if ExaBGP died, start a new one and give it every route we want; True
        when it had to be restarted."""
        if self.alive():
            return False
        log.warning("exabgp (pid %s) is gone: restarting it and re-announcing %d routes",
                    self._pid, len(self.announced))
        self.restarts += 1
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.start()
        self.reannounce_all()
        return True

    def stop(self) -> None:
        """Withdraw every route, then stop ExaBGP (its session closes: the router drops us)."""
        for prefix in list(self.announced):
            self.withdraw(prefix)
        time.sleep(0.2)  # let ExaBGP send the withdrawals before the session goes down
        if self._pid is not None:
            self._kill(self._pid)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pid = None

    # -- routes -------------------------------------------------------------------------------
    def _send(self, line: str) -> None:
        if self._fd is None:
            raise RuntimeError("BGP speaker is not started")
        os.write(self._fd, (line + "\n").encode())
        self.commands_sent += 1
        log.info("bgp: %s", line)

    def _self_hop(self, vip: str) -> str:
        if ":" not in vip:
            return self.settings.local_address
        hop = self.settings.local_address6 or ipv6_of_interface_holding(self.settings.local_address)
        if hop is None:
            raise ValueError(f"VIP {vip}: this mux has no global IPv6 address on the interface of "
                             f"{self.settings.local_address} to announce as next hop")
        return hop

    def announce(self, vip: str, next_hop: str | None = None) -> None:
        """Announce vip/32 (vip/128 for IPv6) with this mux (None) or another host as next hop;
        repeats are no-ops. An IPv6 route goes over the same session (MP-BGP, IPv6 unicast) with
        this mux's IPv6 address as next hop."""
        prefix = host_prefix(vip)
        hop = next_hop or self._self_hop(vip)
        if self.announced.get(prefix) == hop:
            return
        self._send(f"announce route {prefix} next-hop {hop}")
        self.announced[prefix] = hop

    def withdraw(self, vip_or_prefix: str) -> None:
        prefix = vip_or_prefix if "/" in vip_or_prefix else host_prefix(vip_or_prefix)
        if prefix not in self.announced:
            return
        self._send(f"withdraw route {prefix}")
        del self.announced[prefix]

    def reannounce_all(self) -> None:
        """After adopting a running ExaBGP, make sure it holds exactly what we want."""
        for prefix, hop in list(self.announced.items()):
            self._send(f"announce route {prefix} next-hop {hop}")

    def session_state(self) -> str:
        """The last state ExaBGP reported for the router ("up", "down", "connected", ... or "unknown")."""
        state = "unknown"
        try:
            with open(self.events, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 65536))
                lines = fh.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return state
        for line in reversed(lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("type") == "state":
                return str(event.get("neighbor", {}).get("state", state))
        return state
