"""Prove the converted VM boots and compare the hardware the guest reports with the assessment.

Proof of life is read from the domain's serial console (a file libvirt writes): a guest that
prints a hardware report line `P2V-REPORT {json}` (the stand-in's init does) is compared field by
field; a guest that only reaches a `login:` prompt proves it booted but cannot be compared, which
the verify stage records as such. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from .libvirt_binding import libvirt

REPORT_PREFIX = "P2V-REPORT "
LOGIN_MARKERS = ("login:",)
# The guest sees less than the domain's memory (firmware and kernel reservations).
MEMORY_SEEN_MIN_FRACTION = 0.75


class VerifyError(RuntimeError):
    """The VM did not prove it boots, or it does not match the assessment."""


@dataclasses.dataclass(frozen=True)
class ExpectedHardware:
    vcpus: int
    memory_bytes: int
    firmware: str
    disk_sizes: tuple[int, ...]  # in target order (vda, vdb, ...)
    macs: tuple[str, ...]
    nic_names: dict[str, str] = dataclasses.field(default_factory=dict)  # mac -> name pinned by adjust


@dataclasses.dataclass
class BootResult:
    seconds_to_proof: float
    report: dict | None
    console_tail: str


def parse_report(console_text: str) -> dict | None:
    """The guest's `P2V-REPORT {json}` line from console output, or None if it has not appeared."""
    for line in console_text.splitlines():
        line = line.strip("\r\x1b[0m")
        at = line.find(REPORT_PREFIX)
        if at >= 0:
            try:
                return json.loads(line[at + len(REPORT_PREFIX) :])
            except json.JSONDecodeError as exc:
                raise VerifyError(f"the guest's report line is not JSON: {line[:200]!r} ({exc})") from exc
    return None


def boot_and_wait(
    domain: libvirt.virDomain,
    console_log: Path,
    timeout_s: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> BootResult:
    """Start the domain and wait until its console shows a report or a login prompt."""
    started = time.monotonic()
    domain.create()
    text = ""
    while time.monotonic() - started < timeout_s:
        if should_stop():
            raise VerifyError("cancelled while waiting for the guest to boot")
        text = _read(console_log)
        report = parse_report(text)
        if report is not None:
            return BootResult(time.monotonic() - started, report, text[-2000:])
        if any(marker in text for marker in LOGIN_MARKERS):
            return BootResult(time.monotonic() - started, None, text[-2000:])
        if not domain.isActive():
            time.sleep(0.2)  # the console file may still be flushing the last line
            text = _read(console_log)
            report = parse_report(text)
            if report is not None:
                return BootResult(time.monotonic() - started, report, text[-2000:])
            raise VerifyError(f"the VM stopped before proving it booted; console ends with: {text[-500:]!r}")
        time.sleep(0.2)
    raise VerifyError(f"no proof of life within {timeout_s:g} s; console ends with: {text[-500:]!r}")


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def compare_hardware(report: dict, expected: ExpectedHardware) -> list[str]:
    """Differences between what the guest sees and what the VM should be (empty list: match)."""
    problems = []
    if report.get("vcpus") != expected.vcpus:
        problems.append(f"vCPUs: guest sees {report.get('vcpus')}, assessment/VM says {expected.vcpus}")
    memory = report.get("memory_bytes") or 0
    if not expected.memory_bytes * MEMORY_SEEN_MIN_FRACTION <= memory <= expected.memory_bytes:
        problems.append(f"memory: guest sees {memory} bytes, VM has {expected.memory_bytes}")
    if report.get("firmware") != expected.firmware:
        problems.append(
            f"firmware: guest booted with {report.get('firmware')}, assessment says {expected.firmware}"
        )
    disks = sorted(report.get("disks") or [], key=lambda d: (len(d.get("name", "")), d.get("name", "")))
    sizes = tuple(d.get("size_bytes") for d in disks if str(d.get("name", "")).startswith("vd"))
    if sizes != expected.disk_sizes:
        problems.append(f"disks: guest sees sizes {list(sizes)}, assessment says {list(expected.disk_sizes)}")
    seen = {str(n.get("mac", "")).lower(): n.get("name") for n in report.get("nics") or []}
    if sorted(seen) != sorted(m.lower() for m in expected.macs):
        problems.append(f"NIC MACs: guest sees {sorted(seen)}, assessment says {sorted(expected.macs)}")
    for mac, name in expected.nic_names.items():
        if mac in seen and seen[mac] != name:
            problems.append(f"NIC {mac}: guest named it {seen[mac]}, the physical machine called it {name}")
    return problems


def stop_domain(domain: libvirt.virDomain, grace_s: float = 10.0) -> None:
    """Ask the guest to power off (ACPI), then force it after `grace_s`."""
    if not domain.isActive():
        return
    with contextlib.suppress(libvirt.libvirtError):  # it may have stopped meanwhile; destroy follows
        domain.shutdown()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not domain.isActive():
            return
        time.sleep(0.2)
    try:
        domain.destroy()
    except libvirt.libvirtError:
        if domain.isActive():
            raise
