"""Libvirt domain XML for a converted machine, shaped from the assessment's facts (pure: no I/O).

The VM matches what was assessed: vCPU count and topology, memory (capped by the hypervisor's
policy), one virtio disk per assessed disk, one virtio NIC per physical NIC carrying its MAC, and
BIOS or UEFI (OVMF) firmware. It always gets a serial console (proof of life and the guest's
report are read there), a guest-agent channel and ACPI+APIC (without ACPI, poweroff only halts).
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS_TEMPLATE = "/usr/share/OVMF/OVMF_VARS_4M.fd"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}$")


class DomainSpecError(ValueError):
    """The facts cannot describe a VM (names the offending value)."""


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    source_path: str  # the libvirt volume's path
    target_dev: str  # vda, vdb, ...
    size_bytes: int
    source_name: str  # the physical disk it came from (sda)


@dataclasses.dataclass(frozen=True)
class NicSpec:
    mac: str
    source_name: str  # the physical NIC (eth0)


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    name: str
    domain_type: str
    vcpus: int
    sockets: int
    cores: int
    threads: int
    memory_bytes: int
    firmware: str  # "bios" | "uefi"
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    network: str  # "user" | "network:<name>" | "bridge:<name>"
    console_log: str
    nvram_path: str | None = None
    description: str = ""


def target_dev(index: int) -> str:
    """vda, vdb, ... vdz, vdaa: the names virtio disks get, in order."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters


def cap_memory(memory_bytes: int | None, cap_bytes: int) -> int:
    """The assessed memory, but never more than the policy cap (also the default when unknown)."""
    if memory_bytes is None or memory_bytes <= 0:
        return cap_bytes
    return min(memory_bytes, cap_bytes)


def cpu_topology(cpu: dict | None) -> tuple[int, int, int, int]:
    """(vcpus, sockets, cores, threads) from facts["cpu"]; a topology that does not multiply out
    to the vCPU count is replaced by 1 socket x vcpus cores (libvirt would refuse it)."""
    cpu = cpu or {}
    vcpus = cpu.get("vcpus") or 1
    if not isinstance(vcpus, int) or vcpus < 1 or vcpus > 256:
        raise DomainSpecError(f"facts cpu.vcpus must be an integer 1..256, got {vcpus!r}")
    sockets = cpu.get("sockets") or 1
    cores = cpu.get("cores_per_socket") or vcpus
    threads = cpu.get("threads_per_core") or 1
    if sockets * cores * threads != vcpus:
        return vcpus, 1, vcpus, 1
    return vcpus, sockets, cores, threads


def validate_mac(mac: str) -> str:
    mac = (mac or "").lower()
    if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
        raise DomainSpecError(f"NIC MAC must be a unicast aa:bb:cc:dd:ee:ff address, got {mac!r}")
    return mac


def physical_nics(facts: dict) -> list[dict]:
    """NICs worth carrying over: those with a real MAC (not loopback, not all-zero)."""
    return [
        n
        for n in facts.get("nics") or []
        if n.get("mac") and n.get("name") != "lo" and n["mac"] != "00:00:00:00:00:00"
    ]


def render_domain_xml(spec: DomainSpec) -> str:
    if not DOMAIN_NAME_RE.match(spec.name):
        raise DomainSpecError(f"domain name must match {DOMAIN_NAME_RE.pattern}, got {spec.name!r}")
    if spec.firmware not in ("bios", "uefi"):
        raise DomainSpecError(f"firmware must be 'bios' or 'uefi', got {spec.firmware!r}")
    if spec.firmware == "uefi" and not spec.nvram_path:
        raise DomainSpecError("a UEFI domain needs an NVRAM path")
    if not spec.disks:
        raise DomainSpecError("a domain needs at least one disk")
    domain = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(domain, "name").text = spec.name
    if spec.description:
        ET.SubElement(domain, "description").text = spec.description
    ET.SubElement(domain, "memory", unit="KiB").text = str(spec.memory_bytes // 1024)
    ET.SubElement(domain, "currentMemory", unit="KiB").text = str(spec.memory_bytes // 1024)
    ET.SubElement(domain, "vcpu", placement="static").text = str(spec.vcpus)
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    if spec.firmware == "uefi":
        ET.SubElement(os_el, "loader", readonly="yes", type="pflash", secure="no").text = OVMF_CODE
        ET.SubElement(os_el, "nvram", template=OVMF_VARS_TEMPLATE).text = spec.nvram_path
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    cpu = ET.SubElement(domain, "cpu")
    ET.SubElement(
        cpu, "topology", sockets=str(spec.sockets), dies="1", cores=str(spec.cores), threads=str(spec.threads)
    )
    ET.SubElement(domain, "clock", offset="utc")
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    for disk in spec.disks:
        disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk_el, "driver", name="qemu", type="raw", cache="none", discard="unmap")
        ET.SubElement(disk_el, "source", file=disk.source_path)
        ET.SubElement(disk_el, "target", dev=disk.target_dev, bus="virtio")
        ET.SubElement(disk_el, "serial").text = f"p2v-{disk.source_name}"[:20]
    kind, _, source = spec.network.partition(":")
    if kind not in ("user", "network", "bridge") or (kind != "user" and not source):
        raise DomainSpecError(
            f"network must be 'user', 'network:<name>' or 'bridge:<name>', got {spec.network!r}"
        )
    for nic in spec.nics:
        nic_el = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(nic_el, "mac", address=validate_mac(nic.mac))
        if kind != "user":
            ET.SubElement(nic_el, "source", **{kind: source})
        ET.SubElement(nic_el, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=spec.console_log, append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=spec.console_log, append="off")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")
