"""Prove the converted VM boots and compare what the guest sees with the source's assessment.

A real guest is proved from inside: the verify stage boots it on an isolated network, logs in over
SSH with the machine's own credential and pinned host key (the VM is a copy of the source), runs
the same probes as the assessment, and `diff_facts` compares the two documents field by field.
The stand-in's busybox init has no sshd; it prints a hardware report line `P2V-REPORT {json}` on
the serial console, which `compare_hardware` checks. A console showing a failed boot (initramfs
shell, kernel panic, emergency mode) ends the wait at once. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from .libvirt_binding import libvirt

REPORT_PREFIX = "P2V-REPORT "
LOGIN_MARKERS = ("login:",)
# What a console shows when the guest will not come up by itself: no point waiting for the timeout.
BOOT_FAILURE_MARKERS = {
    "(initramfs)": "the guest stopped in the initramfs shell (its root disk was not found)",
    "Kernel panic": "the guest kernel panicked",
    "You are in emergency mode": "the guest is in systemd's emergency mode",
    "Give root password for maintenance": "the guest is in maintenance mode",
    "Entering emergency mode": "the guest is in systemd's emergency mode",
}
PROBE_INTERVAL_S = 2.0
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
    session: object | None = None  # what `probe` returned (an SSH session into the guest)


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
FAILED_LINE_RE = re.compile(
    r"FAILED|Dependency failed|Failed to|Timed out|fsck|UNEXPECTED INCONSISTENCY|ALERT!|error", re.IGNORECASE
)


def failed_lines(console_text: str, limit: int = 8) -> list[str]:
    """The console lines that say what went wrong (systemd's FAILED units, fsck, initramfs alerts)."""
    lines = [ANSI_RE.sub("", line).strip() for line in console_text.splitlines()]
    return [line[:200] for line in lines if FAILED_LINE_RE.search(line)][-limit:]


def boot_failure(console_text: str) -> str | None:
    """Why the console says the guest cannot boot by itself, or None."""
    for marker, meaning in BOOT_FAILURE_MARKERS.items():
        if marker in console_text:
            return meaning
    return None


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
    probe: Callable[[], object | None] | None = None,
) -> BootResult:
    """Start the domain and wait for proof of life: a console report, or `probe` succeeding (an SSH
    login), or without a probe a login prompt. A console showing a failed boot raises at once."""
    started = time.monotonic()
    domain.create()
    text = ""
    last_probe = 0.0
    while time.monotonic() - started < timeout_s:
        if should_stop():
            raise VerifyError("cancelled while waiting for the guest to boot")
        text = _read(console_log)
        report = parse_report(text)
        if report is not None:
            return BootResult(time.monotonic() - started, report, text[-2000:])
        failure = boot_failure(text)
        if failure:
            raise VerifyError(
                f"{failure}; what failed before it: {failed_lines(text)}; console ends with: {text[-400:]!r}"
            )
        if probe is None and any(marker in text for marker in LOGIN_MARKERS):
            return BootResult(time.monotonic() - started, None, text[-2000:])
        if probe is not None and time.monotonic() - last_probe >= PROBE_INTERVAL_S:
            last_probe = time.monotonic()
            session = probe()
            if session is not None:
                return BootResult(time.monotonic() - started, None, text[-2000:], session)
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


# --- comparing the guest's own facts with the source's ---------------------------------------------

# The guest kernel keeps a slightly different amount of memory for itself on other hardware; MemTotal
# may differ by this much of the VM's memory and still be "the same memory".
MEMTOTAL_TOLERANCE_FRACTION = 0.03
# Services that run for a moment at boot or per login, not because the machine serves something.
TRANSIENT_SERVICE_PREFIXES = ("user@", "user-runtime-dir@", "systemd-fsckd.", "session-", "getty@", "e2scrub")


@dataclasses.dataclass(frozen=True)
class Difference:
    field: str
    source: object
    vm: object
    note: str = ""

    def message(self) -> str:
        extra = f" ({self.note})" if self.note else ""
        return f"{self.field}: source {self.source!r}, VM {self.vm!r}{extra}"

    def as_dict(self) -> dict:
        return {"field": self.field, "source": self.source, "vm": self.vm, "note": self.note}


def _filesystems(facts: dict) -> dict[str, tuple]:
    return {
        fs["mountpoint"]: (fs.get("fstype"), fs.get("uuid"), fs.get("size_bytes"))
        for fs in facts.get("filesystems") or []
    }


def _running(facts: dict) -> set[str] | None:
    services = facts.get("services")
    if services is None:
        return None
    return {s for s in services if not s.startswith(TRANSIENT_SERVICE_PREFIXES)}


@dataclasses.dataclass(frozen=True)
class NotCompared:
    """A field the verification could not compare, and why (never counted as a match or a difference)."""

    field: str
    reason: str

    def as_dict(self) -> dict:
        return {"field": self.field, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The verdict's content: what differs, which fields were compared, which not and why."""

    differences: list[Difference]
    compared: list[str]
    not_compared: list[NotCompared]

    @property
    def matches(self) -> bool:
        """Equal on every compared field, and the hardware the conversion sets was compared: a VM
        whose disks, NICs or sizes could not be read is not proven to be the source."""
        unread = {n.field for n in self.not_compared}
        return not self.differences and not unread & set(REQUIRED_FIELDS)


# What the conversion itself decides (the domain's hardware and the copied disks): without these,
# nothing says the VM is the source, whatever else matched.
REQUIRED_FIELDS = ("cpu.vcpus", "memory_bytes", "disks", "filesystems", "nics")
VM_UNREADABLE = "the VM's own probe could not read it"
SOURCE_UNKNOWN = "the assessment could not read it on the source"


def diff_facts(source: dict, guest: dict, plan: dict) -> list[Difference]:
    """What differs between the source (as assessed) and the VM (as its own probes see it); the
    fields that could not be compared are left out (see `compare_facts`)."""
    return compare_facts(source, guest, plan).differences


def compare_facts(source: dict, guest: dict, plan: dict) -> Comparison:
    """Compare the source (as assessed) and the VM (as its own probes see it) field by field.

    Memory and vCPUs are compared with the plan (the hypervisor's policy may cap them; the plan
    says so) and MemTotal with the source's, scaled by that cap. NIC names are compared by MAC,
    disks by size, filesystems by mount point (device names change: sda becomes vda). Everything
    else must be equal: hostname, OS, kernel, firmware, packages, the services that were running.
    A fact the VM's probe could not read (None), or that the assessment has no value for, is not a
    difference: it is reported as not compared, with the reason.
    """
    out: list[Difference] = []
    compared: list[str] = []
    skipped: list[NotCompared] = []

    def readable(field: str, src: object, vm: object, source_needed: bool = True) -> bool:
        if vm is None:
            skipped.append(NotCompared(field, VM_UNREADABLE))
            return False
        if source_needed and src is None:
            skipped.append(NotCompared(field, SOURCE_UNKNOWN))
            return False
        compared.append(field)
        return True

    src_cpu, vm_cpu = source.get("cpu") or {}, guest.get("cpu") or {}
    vm_vcpus = vm_cpu.get("vcpus")
    if (
        readable("cpu.vcpus", src_cpu.get("vcpus"), vm_vcpus, source_needed=False)
        and vm_vcpus != plan["vcpus"]
    ):
        out.append(Difference("cpu.vcpus", src_cpu.get("vcpus"), vm_vcpus, f"plan {plan['vcpus']}"))
    memory_matches = False
    if readable("memory_bytes", source.get("memory_bytes"), guest.get("memory_bytes"), source_needed=False):
        memory_matches = guest["memory_bytes"] == plan["memory_bytes"]
        if not memory_matches:
            out.append(
                Difference(
                    "memory_bytes",
                    source.get("memory_bytes"),
                    guest.get("memory_bytes"),
                    f"plan {plan['memory_bytes']}, guest read it from {guest.get('memory_source')}",
                )
            )
    # MemTotal is only meaningful next to an installed size that matched.
    if (
        memory_matches
        and source.get("memory_bytes")
        and readable("memory_total_bytes", source.get("memory_total_bytes"), guest.get("memory_total_bytes"))
    ):
        expected = source["memory_total_bytes"] - (source["memory_bytes"] - plan["memory_bytes"])
        tolerance = plan["memory_bytes"] * MEMTOTAL_TOLERANCE_FRACTION
        if abs(guest["memory_total_bytes"] - expected) > tolerance:
            out.append(
                Difference(
                    "memory_total_bytes",
                    source["memory_total_bytes"],
                    guest["memory_total_bytes"],
                    f"expected about {expected}",
                )
            )
    if readable("disks", source.get("disks"), guest.get("disks")):
        src_disks = sorted(d["size_bytes"] for d in source["disks"])
        vm_disks = sorted(d["size_bytes"] for d in guest["disks"])
        if src_disks != vm_disks:
            out.append(Difference("disks", src_disks, vm_disks, "sizes"))
    if readable("filesystems", source.get("filesystems"), guest.get("filesystems")):
        src_fs, vm_fs = _filesystems(source), _filesystems(guest)
        for mountpoint in sorted(set(src_fs) | set(vm_fs)):
            if src_fs.get(mountpoint) != vm_fs.get(mountpoint):
                out.append(
                    Difference(
                        f"filesystems[{mountpoint}]",
                        src_fs.get(mountpoint),
                        vm_fs.get(mountpoint),
                        "type, UUID, size",
                    )
                )
    if readable("nics", source.get("nics"), guest.get("nics")):
        src_nics = {n["mac"]: n["name"] for n in source["nics"]}
        vm_nics = {n["mac"]: n["name"] for n in guest["nics"]}
        if src_nics != vm_nics:
            out.append(Difference("nics", src_nics, vm_nics, "MAC -> name"))
    for field in ("hostname", "firmware"):
        if readable(field, source.get(field), guest.get(field)) and source[field] != guest[field]:
            out.append(Difference(field, source.get(field), guest.get(field)))
    for field, keys in (("os", ("id", "version_id")), ("kernel", ("release", "machine"))):
        src_doc, vm_doc = source.get(field), guest.get(field)
        src = None if src_doc is None else tuple(src_doc.get(k) for k in keys)
        vm = None if vm_doc is None else tuple(vm_doc.get(k) for k in keys)
        if readable(field, src, vm) and src != vm:
            out.append(Difference(field, src, vm))
    src_names = (source.get("packages") or {}).get("names")
    vm_names = (guest.get("packages") or {}).get("names")
    if readable("packages", src_names, vm_names):
        src_pkgs, vm_pkgs = set(src_names), set(vm_names)
        if src_pkgs != vm_pkgs:
            out.append(
                Difference(
                    "packages",
                    sorted(src_pkgs - vm_pkgs)[:20],
                    sorted(vm_pkgs - src_pkgs)[:20],
                    "only on the source / only on the VM",
                )
            )
    src_running, vm_running = _running(source), _running(guest)
    if readable("services", src_running, vm_running) and not src_running <= vm_running:
        out.append(
            Difference(
                "services",
                sorted(src_running - vm_running),
                [],
                "running on the source, not on the VM",
            )
        )
    return Comparison(out, compared, skipped)
