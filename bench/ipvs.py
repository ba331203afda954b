"""IPVS beside our mux (issue 12, acceptance 4): the peer a Linux operator would pick instead.

IPVS in direct-routing mode (`ipvsadm -g`) with its Maglev scheduler (`-s mh`), set up in the
same mux namespace of a lab, on the same VIP and backends, so bench/dataplane.py and
bench/mux_scale.py can report it next to ours. Debian's `ipvsadm` drives it
(scripts/install-apt.sh installs it).

IPVS lives in the kernel (CONFIG_IP_VS, CONFIG_IP_VS_MH). A kernel built without it (the project's
VMs: "built without modules", /proc/net/ip_vs absent) cannot run this comparison: `unavailable()`
says why, and the benchmarks print that reason instead of a figure. Nothing here guesses a number.

What IPVS needs in DR mode: the VIP routed to the director (the lab's BGP route to the mux does
that), the VIP on the director's `lo` so its LOCAL_IN hook sees the packets (IPVS takes them
there, not in netdev ingress as ours does), and the backends holding the VIP on `lo` with
`arp_ignore=1`/`arp_announce=2` (the lab's backends already do, for our own DSR).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from lbagent.lab import netns

__all__ = ["IpvsService", "add_services", "clear", "kernel_memory_per_service", "one_change_s",
           "setup_dr_service", "unavailable"]

SCHEDULER = "mh"  # IPVS's Maglev hashing scheduler (Linux 4.18+)
_PROTO_FLAG = {"tcp": "-t", "udp": "-u"}


class IpvsService:
    """One IPVS virtual service (VIP, protocol, port) in a namespace, with its real servers."""

    def __init__(self, ns: str, vip: str, port: int, protocol: str = "tcp") -> None:
        if protocol not in _PROTO_FLAG:
            raise ValueError(f"protocol {protocol!r}: expected one of {sorted(_PROTO_FLAG)}")
        self.ns, self.vip, self.port, self.protocol = ns, vip, port, protocol

    @property
    def spec(self) -> list[str]:
        return [_PROTO_FLAG[self.protocol], f"{self.vip}:{self.port}"]

    def add(self) -> None:
        # mh-port: hash the source port too, as our jhash over the 5-tuple does
        _ipvsadm(self.ns, "-A", *self.spec, "-s", SCHEDULER, "-b", "mh-port")

    def add_real(self, address: str, weight: int = 1) -> None:
        _ipvsadm(self.ns, "-a", *self.spec, "-r", address, "-g", "-w", str(weight))

    def drain_real(self, address: str) -> None:
        """IPVS's drain: weight 0 (no new connections; existing ones keep their entry)."""
        _ipvsadm(self.ns, "-e", *self.spec, "-r", address, "-g", "-w", "0")


def unavailable(ns: str | None = None) -> str | None:
    """Why IPVS cannot run here (None when it can): no ipvsadm, or a kernel without IPVS."""
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (scripts/install-apt.sh network installs it)"
    if not Path("/proc/net/ip_vs").exists():
        config = _kernel_config_line("CONFIG_IP_VS")
        return ("this kernel has no IPVS (/proc/net/ip_vs is absent"
                + (f"; kernel config: {config}" if config else "") + ")")
    probe = netns.run(["ipvsadm", "-Ln"], netns=ns, check=False)
    if probe.returncode != 0:
        return f"ipvsadm -Ln failed: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None


def _kernel_config_line(option: str) -> str | None:
    import gzip

    path = Path("/proc/config.gz")
    if not path.exists():
        return None
    with gzip.open(path, "rt") as f:
        for line in f:
            if re.match(rf"(# )?{option}[= ]", line):
                return line.strip()
    return None


def _ipvsadm(ns: str | None, *args: str) -> None:
    netns.run(["ipvsadm", *args], netns=ns)


def clear(ns: str) -> None:
    """Remove every IPVS service of the namespace (IPVS state is per network namespace)."""
    _ipvsadm(ns, "-C")


def setup_dr_service(ns: str, vip: str, port: int, backends: Sequence[str], *,
                     protocol: str = "tcp") -> IpvsService:
    """A DR-mode, Maglev-scheduled service for `vip` in the director namespace `ns`, the VIP on
    its `lo` so IPVS sees the packets routed to it."""
    reason = unavailable(ns)
    if reason is not None:
        raise RuntimeError(f"IPVS unavailable: {reason}")
    netns.run(["ip", "addr", "replace", f"{vip}/32", "dev", "lo"], netns=ns)
    svc = IpvsService(ns, vip, port, protocol)
    svc.add()
    for address in backends:
        svc.add_real(address)
    return svc


def add_services(ns: str, count: int, backends_per_service: int) -> float:
    """`count` TCP services of `backends_per_service` real servers each, in one `ipvsadm -R`
    restore (the fastest load ipvsadm has); returns the seconds it took."""
    lines = []
    for i in range(count):
        vip = f"198.18.{i // 250}.{i % 250 + 1}:80"
        lines.append(f"-A -t {vip} -s {SCHEDULER} -b mh-port")
        lines += [f"-a -t {vip} -r 10.{64 + i // 250}.{i % 250}.{b + 1}:8080 -g -w 1"
                  for b in range(backends_per_service)]
    started = time.perf_counter()
    netns.run(["ipvsadm", "-R"], netns=ns, input_text="\n".join(lines) + "\n", timeout_s=600)
    return time.perf_counter() - started


def _slab_kib() -> int:
    """The kernel's slab memory (Slab in /proc/meminfo), where IPVS keeps services and servers."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/meminfo has no Slab line")


def kernel_memory_per_service(ns: str, count: int = 4000, backends_per_service: int = 8) -> dict[str, float]:
    """Kernel memory per IPVS service at `count` services (the slab growth across the load,
    divided by `count`; the machine's other work moves Slab too, so run it on a quiet machine),
    and the load's duration."""
    reason = unavailable(ns)
    if reason is not None:
        raise RuntimeError(f"IPVS unavailable: {reason}")
    clear(ns)
    before = _slab_kib()
    load_s = add_services(ns, count, backends_per_service)
    after = _slab_kib()
    return {"services": count, "bytes_per_service": (after - before) * 1024 / count, "load_s": load_s}


def one_change_s(ns: str, repeats: int = 20) -> float:
    """Median seconds of one change on a loaded table: a real server added to one service (one
    `ipvsadm -a`, what a backend add costs IPVS), then removed."""
    reason = unavailable(ns)
    if reason is not None:
        raise RuntimeError(f"IPVS unavailable: {reason}")
    times = []
    for k in range(repeats):
        started = time.perf_counter()
        _ipvsadm(ns, "-a", "-t", "198.18.0.1:80", "-r", f"10.250.0.{k + 1}:8080", "-g", "-w", "1")
        times.append(time.perf_counter() - started)
        _ipvsadm(ns, "-d", "-t", "198.18.0.1:80", "-r", f"10.250.0.{k + 1}:8080")
    times.sort()
    return times[len(times) // 2]
