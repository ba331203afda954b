"""What a physical machine is made of: pure parsers from command output to the P2V facts document.

Nothing here touches the network. `collect_facts(run)` drives the probes through a `run(command)`
callable (p2v.ssh gives one over SSH; tests give canned output), so every rule about what a
machine said lives in one place and is testable on captured output.

Two kinds of trouble, kept apart on purpose:
- a tool that is missing, or a fact the machine cannot tell (no udev, no EDAC driver, smartctl
  that does not know the device), is recorded in `facts["unknown"]` with the reason: never a crash;
- output that does not look like what the tool prints raises `FactsParseError` naming the command:
  a machine that answers garbage cannot be trusted and the assessment stops.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

FACTS_SCHEMA = 1

# Probe commands, exactly as run on the machine (each is also the name used in error messages).
CMD_TOOLS = (
    "for t in lscpu lsblk blkid sfdisk df ip dpkg-query rpm systemctl smartctl dmesg uname python3 "
    "dmidecode lsinitramfs lsinitrd lvs update-initramfs dracut; do "
    'command -v "$t" >/dev/null 2>&1 && echo "$t"; done; true'
)
CMD_LSCPU = "lscpu -J"
CMD_LSBLK = "lsblk -J -b -o NAME,PATH,SIZE,TYPE,FSTYPE,UUID,MOUNTPOINT,MODEL,PTTYPE,RO,TRAN,SERIAL"
CMD_DF = "df -B1 --output=source,fstype,size,used,avail,target"
CMD_IP_ADDR = "ip -j addr"
CMD_IP_LINK = "ip -j -d link"
CMD_MEMINFO = "cat /proc/meminfo"
CMD_OS_RELEASE = "cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release"
CMD_UNAME = "uname -s -r -m"
CMD_FIRMWARE = "if [ -d /sys/firmware/efi ]; then echo uefi; else echo bios; fi"
# Where a kernel says which virtio drivers it has: module lists, its build config, /sys/module.
CMD_VIRTIO = (
    'r=$(uname -r); for f in "/lib/modules/$r/modules.builtin" "/lib/modules/$r/modules.dep" '
    '"/boot/config-$r"; do if [ -r "$f" ]; then echo "@source $f"; grep -i virtio "$f"; fi; done; '
    'if [ -d /sys/module ]; then echo "@source /sys/module"; ls /sys/module | grep virtio; fi; true'
)
CMD_DPKG = "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'"
CMD_RPM = "rpm -qa --qf '%{NAME}\\n'"
CMD_SERVICES = "systemctl list-unit-files --type=service --state=enabled --no-legend --no-pager"
CMD_RUNNING = "systemctl list-units --type=service --state=running --no-legend --no-pager --plain"
CMD_HOSTNAME = "cat /proc/sys/kernel/hostname"
CMD_DMI = (
    "for f in sys_vendor product_name product_serial; do if [ -r /sys/class/dmi/id/$f ]; then "
    'echo "$f=$(cat /sys/class/dmi/id/$f)"; fi; done; true'
)
# Installed memory as the firmware lists it (SMBIOS type 17: one entry per memory device).
CMD_DMI_MEMORY = "dmidecode -t 17"
CMD_ROUTE = "ip -j route show default"
CMD_NIC_DRIVERS = (
    'for d in /sys/class/net/*; do if [ -e "$d/device/driver" ]; then '
    'echo "${d##*/} $(basename "$(readlink -f "$d/device/driver")")"; fi; done; true'
)
# Which drivers the running kernel's initramfs holds (what the VM must find its disk with).
CMD_INITRAMFS = (
    'r=$(uname -r); for f in "/boot/initrd.img-$r" "/boot/initramfs-$r.img"; do if [ -r "$f" ]; then '
    'echo "@initramfs $f"; if command -v lsinitramfs >/dev/null 2>&1; then lsinitramfs "$f"; '
    'elif command -v lsinitrd >/dev/null 2>&1; then lsinitrd "$f"; fi | grep -E "\\.ko"; fi; done; true'
)
CMD_DMESG = "dmesg"
# LVM layout: one row per LV segment, and each PV's data start (where extent 0 begins).
CMD_LVS = (
    "lvs --reportformat json --units b --nosuffix -o "
    "lv_path,lv_dm_path,vg_name,lv_name,segtype,seg_start,seg_size,seg_pe_ranges,vg_extent_size"
)
CMD_PVS = "pvs --reportformat json --units b --nosuffix -o pv_name,vg_name,pe_start"
CMD_EDAC = (
    # The edac core alone creates .../edac/mc; only mcN directories are memory controllers.
    "if ls -d /sys/devices/system/edac/mc/mc[0-9]* >/dev/null 2>&1; then echo '@edac present'; "
    "for f in /sys/devices/system/edac/mc/mc*/ce_count /sys/devices/system/edac/mc/mc*/ue_count; do "
    '[ -r "$f" ] && echo "$f $(cat "$f")"; done; else echo "@edac absent"; fi; true'
)

# Probes that read a lot on a slow machine (listing a compressed initramfs takes tens of seconds on
# an old or emulated CPU; systemd loading every unit file took over 30 s in an emulated guest on a
# busy host): their own time limit, above the default per-command one.
PROBE_TIMEOUTS_S = {CMD_INITRAMFS: 300, CMD_SERVICES: 300, CMD_RUNNING: 300}

# Virtio drivers a guest needs to see its disk and its network on the hypervisor's virtual hardware.
VIRTIO_DISK_DRIVERS = ("virtio_blk", "virtio_scsi")
VIRTIO_NET_DRIVER = "virtio_net"
# Block devices that are not disks of the machine (RAM disks, compressed swap in RAM, CD drives).
IGNORED_DISK_PREFIXES = ("zram", "ram", "sr", "fd")
# Link kinds created by software on top of real NICs: the VM gets NICs only for the ones below them.
SOFTWARE_LINK_KINDS = frozenset(
    {
        "bridge",
        "bond",
        "team",
        "vlan",
        "macvlan",
        "macvtap",
        "ipvlan",
        "vxlan",
        "geneve",
        "tun",
        "tap",
        "dummy",
        "ifb",
        "wireguard",
        "gre",
        "gretap",
        "ip6gre",
        "ipip",
        "sit",
        "ip6tnl",
        "vti",
        "nlmon",
        "vrf",
    }
)
# Kernel config symbols of virtio drivers → the module each builds (CONFIG_VIRTIO_MENU and the like
# are menus and options, not modules, and are left out).
VIRTIO_CONFIG_MODULES = {
    "VIRTIO": "virtio",
    "VIRTIO_PCI": "virtio_pci",
    "VIRTIO_PCI_LIB": "virtio_pci_modern_dev",
    "VIRTIO_PCI_LIB_LEGACY": "virtio_pci_legacy_dev",
    "VIRTIO_BLK": "virtio_blk",
    "SCSI_VIRTIO": "virtio_scsi",
    "VIRTIO_NET": "virtio_net",
    "VIRTIO_CONSOLE": "virtio_console",
    "VIRTIO_BALLOON": "virtio_balloon",
    "VIRTIO_INPUT": "virtio_input",
    "VIRTIO_MMIO": "virtio_mmio",
    "VIRTIO_MEM": "virtio_mem",
    "VIRTIO_FS": "virtiofs",
    "DRM_VIRTIO_GPU": "virtio_gpu",
    "HW_RANDOM_VIRTIO": "virtio_rng",
    "VIRTIO_VSOCKETS": "vmw_vsock_virtio_transport",
}
MEMORY_SIZE_UNITS = {"kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
IO_ERROR_RE = re.compile(r"I/O error|blk_update_request: .*error|critical medium error", re.IGNORECASE)
VIRTIO_NAME_RE = re.compile(r"\bvirtio[a-z0-9_]*", re.IGNORECASE)


class FactsParseError(ValueError):
    """A command answered something that is not what the tool prints."""

    def __init__(self, command: str, problem: str, output: str = "") -> None:
        sample = output.strip().replace("\n", "\\n")[:80]
        detail = f" (output starts: {sample!r})" if sample else " (empty output)"
        super().__init__(f"`{command}`: {problem}{detail}")
        self.command = command
        self.problem = problem


@dataclass(frozen=True)
class CommandOutput:
    command: str
    exit_status: int
    stdout: str
    stderr: str = ""

    @property
    def first_error_line(self) -> str:
        lines = (self.stderr or self.stdout).strip().splitlines()
        return lines[0][:200] if lines else f"exit status {self.exit_status}"


Runner = Callable[[str], CommandOutput]
BatchRunner = Callable[[list[str]], list[CommandOutput]]


def parser(func):
    """Turn any structural surprise inside a parser (a list where an object was expected, a missing
    key) into a FactsParseError naming the command, like the parser's own checks do."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FactsParseError:
            raise
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            command = bound.arguments.get("command") or func.__name__
            raise FactsParseError(
                command,
                f"unexpected structure ({type(exc).__name__}: {exc})",
                str(bound.arguments.get("text", "")),
            ) from None

    return guarded


def _load_json(command: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise FactsParseError(command, f"output is not JSON ({exc.msg} at line {exc.lineno})", text) from None


def _int(command: str, value: Any, what: str, text: str = "") -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise FactsParseError(command, f"{what} is not an integer: {value!r}", text) from None
    if number < 0:
        raise FactsParseError(command, f"{what} is negative: {number}", text)
    return number


# --- CPU ------------------------------------------------------------------------------------------


@parser
def parse_lscpu(text: str, command: str = CMD_LSCPU) -> dict:
    """`lscpu -J` → vcpus, sockets, cores per socket, threads per core, model name."""
    doc = _load_json(command, text)
    rows = doc.get("lscpu") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise FactsParseError(command, "expected an object with an 'lscpu' list", text)
    fields: dict[str, str] = {}

    def walk(entries: list) -> None:  # lscpu ≥ 2.38 nests some rows under "children"
        for entry in entries:
            if isinstance(entry, dict) and "field" in entry:
                fields.setdefault(str(entry["field"]).rstrip(":").strip(), entry.get("data"))
                walk(entry.get("children") or [])

    walk(rows)
    if "CPU(s)" not in fields:
        raise FactsParseError(command, "no 'CPU(s):' row", text)
    vcpus = _int(command, fields["CPU(s)"], "CPU(s)", text)
    if vcpus == 0:
        raise FactsParseError(command, "CPU(s) is 0", text)

    def optional(name: str) -> int | None:
        return _int(command, fields[name], name, text) if fields.get(name) not in (None, "-") else None

    return {
        "vcpus": vcpus,
        "sockets": optional("Socket(s)"),
        "cores_per_socket": optional("Core(s) per socket"),
        "threads_per_core": optional("Thread(s) per core"),
        "model": fields.get("Model name"),
        "architecture": fields.get("Architecture"),
    }


# --- memory ---------------------------------------------------------------------------------------


@parser
def parse_meminfo(text: str, command: str = CMD_MEMINFO) -> int:
    """`/proc/meminfo` → MemTotal in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) != 3 or parts[2] != "kB":
                raise FactsParseError(command, f"MemTotal line is not '<n> kB': {line!r}", text)
            return _int(command, parts[1], "MemTotal", text) * 1024
    raise FactsParseError(command, "no MemTotal line", text)


@parser
def parse_dmidecode_memory(text: str, command: str = CMD_DMI_MEMORY) -> int | None:
    """`dmidecode -t 17` → installed memory in bytes (sum of the memory devices' sizes); None when the
    firmware lists no memory device."""
    total, devices = 0, 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("Size:"):
            continue
        value = line.removeprefix("Size:").strip()
        parts = value.split()
        if len(parts) == 2 and parts[1] in MEMORY_SIZE_UNITS:
            total += _int(command, parts[0], "memory device size", text) * MEMORY_SIZE_UNITS[parts[1]]
            devices += 1
        elif not value.startswith(("No Module", "Unknown", "Not ")):
            raise FactsParseError(command, f"memory device size is not '<n> <unit>': {line!r}", text)
    return total if devices else None


KERNEL_MEMORY_RE = re.compile(r"Memory: (\d+)K/(\d+)K available")


def kernel_memory_bytes(dmesg_text: str) -> int | None:
    """The kernel's view of installed memory from its boot line `Memory: <free>K/<total>K available`
    (None once the line has left the kernel log)."""
    match = KERNEL_MEMORY_RE.search(dmesg_text)
    return int(match.group(2)) * 1024 if match else None


# --- identity -------------------------------------------------------------------------------------


@parser
def parse_hostname(text: str, command: str = CMD_HOSTNAME) -> str:
    name = text.strip()
    if not name or any(c.isspace() for c in name):
        raise FactsParseError(command, "expected one host name", text)
    return name


@parser
def parse_dmi(text: str, command: str = CMD_DMI) -> dict | None:
    """`sys_vendor=...` lines from /sys/class/dmi/id → vendor, model, serial (None: no DMI)."""
    values = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in ("sys_vendor", "product_name", "product_serial"):
            raise FactsParseError(command, f"line is not '<dmi field>=<value>': {line!r}", text)
        values[key] = value.strip() or None
    if not values:
        return None
    return {
        "vendor": values.get("sys_vendor"),
        "model": values.get("product_name"),
        "serial": values.get("product_serial"),
    }


# --- disks ----------------------------------------------------------------------------------------


def _device_entry(node: dict, command: str, text: str) -> dict:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"]:
        raise FactsParseError(command, f"block device without a name: {node!r}"[:120], text)
    path = node.get("path") or f"/dev/{node['name']}"
    if not isinstance(path, str) or not path.startswith("/dev/"):
        raise FactsParseError(command, f"device path is not under /dev: {path!r}", text)
    return {
        "name": node["name"],
        "path": path,
        "type": node.get("type"),
        "size_bytes": _int(command, node.get("size"), f"size of {node['name']}", text),
        "fstype": node.get("fstype"),
        "uuid": node.get("uuid"),
        "mountpoint": node.get("mountpoint"),
    }


@parser
def parse_lsblk(text: str, command: str = CMD_LSBLK) -> list[dict]:
    """`lsblk -J -b` → the machine's disks, each with its partitions (and their LVM/crypt children).

    Loop devices count as disks (the stand-in's disk is one) unless they hold a squashfs (snap
    packages); RAM disks, zram and optical drives never do; neither do empty devices (size 0).
    """
    doc = _load_json(command, text)
    nodes = doc.get("blockdevices") if isinstance(doc, dict) else None
    if not isinstance(nodes, list):
        raise FactsParseError(command, "expected an object with a 'blockdevices' list", text)

    def children_of(node: dict) -> list[dict]:
        out = []
        for child in node.get("children") or []:
            entry = _device_entry(child, command, text)
            entry["children"] = children_of(child)
            out.append(entry)
        return out

    disks = []
    for node in nodes:
        disk = _device_entry(node, command, text)
        if disk["type"] not in ("disk", "loop") or disk["size_bytes"] == 0:
            continue
        if disk["name"].startswith(IGNORED_DISK_PREFIXES) or disk["fstype"] == "squashfs":
            continue
        disk["model"] = (node.get("model") or "").strip() or None
        disk["pttype"] = node.get("pttype")
        disk["read_only"] = bool(node.get("ro"))
        disk["transport"] = node.get("tran") or None
        disk["serial"] = (node.get("serial") or "").strip() or None
        disk["partitions"] = children_of(node)
        disks.append(disk)
    return disks


def iter_devices(disks: Iterable[dict]) -> Iterable[dict]:
    """Every disk, partition and nested device (LVM volume, dm-crypt mapping), depth first."""
    for disk in disks:
        yield disk
        stack = list(disk.get("partitions") or [])
        while stack:
            device = stack.pop(0)
            yield device
            stack[0:0] = device.get("children") or []


@parser
def parse_blkid_export(text: str, command: str = "blkid -p -o export") -> list[dict[str, str]]:
    """`blkid -o export` → one dict per probed device (blank-line separated KEY=value blocks)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_]+", key):
            raise FactsParseError(command, f"line is not KEY=value: {line!r}", text)
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


@parser
def parse_sfdisk_json(text: str, command: str) -> dict:
    """`sfdisk -J <disk>` → {"label": "dos"|"gpt", "partitions": [{node, start_bytes, size_bytes, type}]}."""
    doc = _load_json(command, text)
    table = doc.get("partitiontable") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise FactsParseError(command, "expected an object with a 'partitiontable'", text)
    sector = _int(command, table.get("sectorsize", 512), "sectorsize", text)
    parts = []
    for entry in table.get("partitions") or []:
        if not isinstance(entry, dict) or "node" not in entry:
            raise FactsParseError(command, f"partition entry without a node: {entry!r}"[:120], text)
        parts.append(
            {
                "node": entry["node"],
                "start_bytes": _int(command, entry.get("start"), "partition start", text) * sector,
                "size_bytes": _int(command, entry.get("size"), "partition size", text) * sector,
                "type": entry.get("type"),
            }
        )
    return {"label": table.get("label"), "partitions": parts}


@parser
def parse_df(text: str, command: str = CMD_DF) -> list[dict]:
    """`df -B1 --output=source,fstype,size,used,avail,target` → filesystems on block devices."""
    lines = text.splitlines()
    if not lines or not lines[0].split() or lines[0].split()[0] != "Filesystem":
        raise FactsParseError(command, "missing the 'Filesystem Type ...' header", text)
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        parts = line.split(None, 5)  # the mount point (last column) may contain spaces
        if len(parts) != 6:
            raise FactsParseError(command, f"row does not have 6 columns: {line!r}", text)
        source, fstype, size, used, avail, target = parts
        if not source.startswith("/dev/"):
            continue  # tmpfs, proc, overlay...: nothing to copy
        rows.append(
            {
                "device": source,
                "fstype": fstype,
                "size_bytes": _int(command, size, f"size of {target}", text),
                "used_bytes": _int(command, used, f"used bytes of {target}", text),
                "avail_bytes": _int(command, avail, f"available bytes of {target}", text),
                "mountpoint": target,
            }
        )
    return rows


# --- network --------------------------------------------------------------------------------------


def _json_list(command: str, text: str) -> list:
    doc = _load_json(command, text)
    if not isinstance(doc, list):
        raise FactsParseError(command, "expected a JSON list of interfaces", text)
    return doc


@parser
def parse_ip_link(text: str, command: str = CMD_IP_LINK) -> list[dict]:
    """`ip -j -d link` → ethernet NICs (not loopback, not bridges/VLANs/bonds/tunnels).

    A veth counts as a NIC unless it is a port of a bridge (a container's host end).
    """
    links = _json_list(command, text)
    by_index = {link.get("ifindex"): link for link in links if isinstance(link, dict)}
    nics = []
    for link in links:
        if not isinstance(link, dict) or "ifname" not in link:
            raise FactsParseError(command, f"interface without ifname: {link!r}"[:120], text)
        if link.get("link_type") != "ether":
            continue
        kind = (link.get("linkinfo") or {}).get("info_kind")
        if kind in SOFTWARE_LINK_KINDS:
            continue
        master = link.get("master")
        master_kind = None
        if master:
            master_link = next((item for item in by_index.values() if item.get("ifname") == master), {})
            master_kind = (master_link.get("linkinfo") or {}).get("info_kind")
        if kind == "veth" and master_kind == "bridge":
            continue
        mac = str(link.get("address") or "").lower()
        if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise FactsParseError(command, f"{link['ifname']} has no MAC address: {mac!r}", text)
        nics.append(
            {
                "name": link["ifname"],
                "mac": mac,
                "permanent_mac": (link.get("permaddr") or None),
                "mtu": link.get("mtu"),
                "state": str(link.get("operstate", "unknown")).lower(),
                "kind": kind,
                "altnames": list(link.get("altnames") or []),
                "driver": None,
                "addresses": [],
            }
        )
    return nics


@parser
def parse_ip_addr(text: str, command: str = CMD_IP_ADDR) -> dict[str, list[str]]:
    """`ip -j addr` → {ifname: ["10.0.0.2/24", ...]} (link-local IPv6 left out)."""
    out: dict[str, list[str]] = {}
    for link in _json_list(command, text):
        if not isinstance(link, dict) or "ifname" not in link:
            raise FactsParseError(command, f"interface without ifname: {link!r}"[:120], text)
        addresses = []
        for info in link.get("addr_info") or []:
            if info.get("scope") == "link" and info.get("family") == "inet6":
                continue
            if "local" in info and "prefixlen" in info:
                addresses.append(f"{info['local']}/{info['prefixlen']}")
        out[link["ifname"]] = addresses
    return out


@parser
def parse_default_route(text: str, command: str = CMD_ROUTE) -> dict | None:
    """`ip -j route show default` → {"gateway", "dev"} of the first default route (None: none)."""
    for route in _json_list(command, text):
        if isinstance(route, dict) and route.get("dst") == "default":
            return {"gateway": route.get("gateway"), "dev": route.get("dev")}
    return None


@parser
def parse_nic_drivers(text: str, command: str = CMD_NIC_DRIVERS) -> dict[str, str]:
    """`<ifname> <driver>` lines → {ifname: driver} (software links have no driver and no line)."""
    drivers = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FactsParseError(command, f"line is not '<interface> <driver>': {line!r}", text)
        drivers[parts[0]] = parts[1]
    return drivers


# --- OS, kernel, firmware -------------------------------------------------------------------------


@parser
def parse_os_release(text: str, command: str = CMD_OS_RELEASE) -> dict:
    """`/etc/os-release` → id, name, version_id, pretty_name (shell-quoted KEY=value lines)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z0-9_]+", key):
            raise FactsParseError(command, f"line is not KEY=value: {line!r}", text)
        try:
            parts = shlex.split(value)
        except ValueError:
            raise FactsParseError(command, f"unbalanced quotes in {line!r}", text) from None
        values[key] = parts[0] if parts else ""
    if not values.get("ID") and not values.get("NAME"):
        raise FactsParseError(command, "neither ID nor NAME is set", text)
    return {
        "id": values.get("ID") or None,
        "name": values.get("NAME") or None,
        "version_id": values.get("VERSION_ID") or None,
        "pretty_name": values.get("PRETTY_NAME") or None,
        "id_like": values.get("ID_LIKE", "").split() or None,
    }


@parser
def parse_uname(text: str, command: str = CMD_UNAME) -> dict:
    """`uname -s -r -m` → sysname, release, machine."""
    parts = text.split()
    if len(parts) != 3:
        raise FactsParseError(command, "expected '<sysname> <release> <machine>'", text)
    return {"sysname": parts[0], "release": parts[1], "machine": parts[2]}


@parser
def parse_firmware(text: str, command: str = CMD_FIRMWARE) -> str:
    value = text.strip()
    if value not in ("bios", "uefi"):
        raise FactsParseError(command, "expected 'bios' or 'uefi'", text)
    return value


@parser
def parse_virtio_probe(text: str, command: str = CMD_VIRTIO) -> tuple[list[str], list[str]] | None:
    """The virtio drivers the running kernel has (built in or as modules), and where that was seen.

    Returns None when no source of truth exists (no module lists, no config, no /sys/module).
    """
    sources: list[str] = []
    names: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("@source "):
            sources.append(line[len("@source ") :])
            continue
        if not line:
            continue
        if not sources:
            raise FactsParseError(command, f"driver line before any '@source' line: {line!r}", text)
        if line.startswith("CONFIG_"):
            match = re.fullmatch(r"CONFIG_([A-Z0-9_]+)=([ym])", line)
            if match and match.group(1) in VIRTIO_CONFIG_MODULES:
                names.add(VIRTIO_CONFIG_MODULES[match.group(1)])
            continue
        if line.startswith("#"):
            continue  # "# CONFIG_VIRTIO_X is not set"
        for token in line.split():
            base = token.rstrip(":").rsplit("/", 1)[-1]
            base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
            if VIRTIO_NAME_RE.fullmatch(base):
                names.add(base.lower().replace("-", "_"))
    if not sources:
        return None
    return sorted(names), sources


def builtin_virtio(text: str) -> list[str]:
    """The virtio drivers listed in the kernel's modules.builtin (in the kernel image: no initramfs
    needs them)."""
    names, in_builtin = set(), False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("@source "):
            in_builtin = line.endswith("/modules.builtin")
            continue
        if in_builtin and line:
            base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", line.rsplit("/", 1)[-1])
            if VIRTIO_NAME_RE.fullmatch(base):
                names.add(base.replace("-", "_"))
    return sorted(names)


# --- software -------------------------------------------------------------------------------------


@parser
def parse_dpkg(text: str, command: str = CMD_DPKG) -> list[str]:
    """`dpkg-query -W -f='${db:Status-Abbrev} ${Package}'` → installed package names."""
    names = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[a-zA-Z]{1,3}", parts[0]):
            raise FactsParseError(command, f"line is not '<status> <package>': {line!r}", text)
        if parts[0].startswith("ii"):
            names.append(parts[1])
    return sorted(names)


@parser
def parse_rpm(text: str, command: str = CMD_RPM) -> list[str]:
    names = []
    for line in text.splitlines():
        name = line.strip()
        if not name:
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise FactsParseError(command, f"not a package name: {name!r}", text)
        names.append(name)
    return sorted(set(names))


@parser
def parse_enabled_services(text: str, command: str = CMD_SERVICES) -> list[str]:
    """`systemctl list-unit-files --state=enabled --no-legend` → enabled unit names."""
    units = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or "." not in parts[0]:
            raise FactsParseError(command, f"line is not '<unit> <state> ...': {line!r}", text)
        units.append(parts[0])
    return sorted(units)


@parser
def parse_running_services(text: str, command: str = CMD_RUNNING) -> list[str]:
    """`systemctl list-units --type=service --state=running --plain` → running service names."""
    units = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 4 or not parts[0].endswith(".service"):
            raise FactsParseError(command, f"line is not '<unit> <load> <active> <sub> ...': {line!r}", text)
        units.append(parts[0])
    return sorted(units)


@parser
def parse_initramfs(text: str, command: str = CMD_INITRAMFS) -> dict | None:
    """The running kernel's initramfs and the kernel modules inside it (None: no initramfs found)."""
    path, modules = None, set()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("@initramfs "):
            path = path or line.removeprefix("@initramfs ")
            continue
        if not line:
            continue
        if path is None:
            raise FactsParseError(command, f"module line before any '@initramfs' line: {line!r}", text)
        name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", line.rsplit("/", 1)[-1])
        modules.add(name.replace("-", "_"))
    if path is None:
        return None
    return {
        "path": path,
        "modules_count": len(modules),
        "virtio_modules": sorted(m for m in modules if VIRTIO_NAME_RE.fullmatch(m)),
        "has_modules": bool(modules),
    }


# The guest's own initramfs builders the conversion can run (initramfs-tools, dracut), by preference.
INITRAMFS_REBUILD_TOOLS = ("update-initramfs", "dracut")


def initramfs_has_virtio_disk_driver(facts: dict) -> bool | None:
    """Whether the initramfs that boots (or the kernel itself) has a virtio disk driver; None when
    the assessment could not tell (no initramfs found, or its module list unreadable)."""
    initramfs = facts.get("initramfs")
    if not initramfs or not initramfs.get("has_modules"):
        return None
    builtin = set((facts.get("kernel") or {}).get("virtio_builtin") or [])
    inside = set(initramfs.get("virtio_modules") or [])
    return bool((inside | builtin) & set(VIRTIO_DISK_DRIVERS))


# --- health ---------------------------------------------------------------------------------------


@parser
def parse_smartctl(text: str, disk: str, command: str) -> dict:
    """`smartctl -H -j <disk>` → {"disk", "passed": bool|None, "reason"}.

    smartctl exits non-zero for ordinary findings (bit 3 = disk failing) and for devices it cannot
    talk to; the JSON says which. passed is None when smartctl could not get a health status.
    """
    doc = _load_json(command, text)
    if not isinstance(doc, dict) or "smartctl" not in doc:
        raise FactsParseError(command, "expected smartctl's JSON object with a 'smartctl' member", text)
    status = doc.get("smart_status")
    messages = [m.get("string", "") for m in (doc["smartctl"].get("messages") or []) if isinstance(m, dict)]
    exit_status = doc["smartctl"].get("exit_status")
    if isinstance(status, dict) and isinstance(status.get("passed"), bool):
        return {
            "disk": disk,
            "passed": status["passed"],
            "exit_status": exit_status,
            "reason": "; ".join(messages) or None,
        }
    return {
        "disk": disk,
        "passed": None,
        "exit_status": exit_status,
        "reason": "; ".join(messages) or "smartctl reported no health status",
    }


@parser
def count_io_errors(text: str) -> int:
    """Kernel log lines reporting block I/O errors."""
    return sum(1 for line in text.splitlines() if IO_ERROR_RE.search(line))


@parser
def parse_edac(text: str, command: str = CMD_EDAC) -> dict | None:
    """EDAC counters → {"ce": corrected, "ue": uncorrected} summed over memory controllers; None if
    the machine has no EDAC driver."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] not in ("@edac present", "@edac absent"):
        raise FactsParseError(command, "expected an '@edac present|absent' line first", text)
    if lines[0] == "@edac absent":
        return None
    totals = {"ce": 0, "ue": 0}
    for line in lines[1:]:
        path, _, count = line.rpartition(" ")
        kind = path.rsplit("/", 1)[-1].replace("_count", "")
        if kind not in totals:
            raise FactsParseError(command, f"unexpected counter line: {line!r}", text)
        totals[kind] += _int(command, count, path, text)
    return totals


# --- driving the probes ---------------------------------------------------------------------------


def _missing(tool: str) -> str:
    return f"{tool}: not installed"


def _failed(output: CommandOutput) -> str:
    return f"`{output.command}` failed: {output.first_error_line}"


def collect_facts(run: Runner, run_many: BatchRunner | None = None) -> dict:
    """Run every probe through `run` and assemble the facts document (schema 1).

    `run` raises on transport problems (timeouts, lost connection); those end the assessment.
    `run_many`, when given, runs the independent probes together (e.g. on parallel SSH channels).
    """
    unknown: list[str] = []
    tools = set(run(CMD_TOOLS).stdout.split())
    prefetched: dict[str, CommandOutput] = {}
    if run_many is not None:
        planned = [command for tool, command in _independent_probes(tools) if not tool or tool in tools]
        prefetched = dict(zip(planned, run_many(planned), strict=True))
    direct_run = run

    def run(command: str) -> CommandOutput:
        return prefetched[command] if command in prefetched else direct_run(command)

    def probe(tool: str, command: str) -> str | None:
        """stdout of `command`, or None (with the reason recorded) when the tool is absent or failed."""
        if tool and tool not in tools:
            unknown.append(_missing(tool))
            return None
        output = run(command)
        if output.exit_status == 127:
            unknown.append(_missing(tool or command.split()[0]))
            return None
        if output.exit_status != 0 and not output.stdout.strip():
            unknown.append(_failed(output))
            return None
        return output.stdout

    facts: dict[str, Any] = {"schema": FACTS_SCHEMA}

    text = probe("lscpu", CMD_LSCPU)
    facts["cpu"] = parse_lscpu(text) if text is not None else None

    facts["tools"] = sorted(tools)
    text = probe("", CMD_HOSTNAME)
    facts["hostname"] = parse_hostname(text) if text is not None else None
    text = probe("", CMD_DMI)
    facts["dmi"] = parse_dmi(text) if text is not None else None
    if facts["dmi"] is None:
        unknown.append("DMI: /sys/class/dmi is absent (vendor, model and serial unknown)")

    text = probe("", CMD_MEMINFO)
    facts["memory_total_bytes"] = parse_meminfo(text) if text is not None else None
    facts["memory_bytes"], facts["memory_source"] = _installed_memory(run, tools, facts["memory_total_bytes"])

    facts["disks"], facts["filesystems"], facts["encrypted_volumes"] = _collect_storage(
        run, tools, probe, unknown
    )
    facts["lvm"] = _collect_lvm(probe, facts["disks"] or [], unknown)
    facts["nics"] = _collect_nics(probe)

    text = probe("", CMD_FIRMWARE)
    facts["firmware"] = parse_firmware(text) if text is not None else None

    text = probe("", CMD_OS_RELEASE)
    facts["os"] = parse_os_release(text) if text is not None else None

    facts["kernel"] = _collect_kernel(probe, unknown)
    facts["packages"] = _collect_packages(probe, tools, unknown)

    text = probe("systemctl", CMD_RUNNING)
    facts["services"] = parse_running_services(text) if text is not None else None
    text = probe("systemctl", CMD_SERVICES)
    facts["enabled_services"] = parse_enabled_services(text) if text is not None else None
    text = probe("ip", CMD_ROUTE)
    facts["default_route"] = parse_default_route(text) if text is not None else None
    text = probe("", CMD_INITRAMFS)
    facts["initramfs"] = parse_initramfs(text) if text is not None else None
    if facts["initramfs"] is not None and not facts["initramfs"]["has_modules"]:
        unknown.append(f"initramfs {facts['initramfs']['path']}: its module list could not be read")
    if facts["initramfs"] is not None:
        facts["initramfs"]["rebuild_tool"] = next((t for t in INITRAMFS_REBUILD_TOOLS if t in tools), None)

    facts["health"] = _collect_health(run, tools, probe, facts["disks"] or [], unknown)
    for key in ("cpu", "memory_bytes", "disks", "nics", "firmware", "os"):
        if facts[key] is None:
            unknown.append(f"{key}: could not be determined")
    facts["unknown"] = unknown
    return facts


def _independent_probes(tools: set[str]) -> list[tuple[str, str]]:
    """(tool, command) of every probe that needs no other probe's answer ('' = shell builtins only)."""
    packages = (
        [("dpkg-query", CMD_DPKG)] if "dpkg-query" in tools else [("rpm", CMD_RPM)] if "rpm" in tools else []
    )
    return [
        ("lscpu", CMD_LSCPU),
        ("", CMD_MEMINFO),
        ("lsblk", CMD_LSBLK),
        ("df", CMD_DF),
        ("ip", CMD_IP_LINK),
        ("ip", CMD_IP_ADDR),
        ("", CMD_FIRMWARE),
        ("", CMD_OS_RELEASE),
        ("uname", CMD_UNAME),
        ("", CMD_VIRTIO),
        *packages,
        ("systemctl", CMD_RUNNING),
        ("systemctl", CMD_SERVICES),
        ("", CMD_HOSTNAME),
        ("", CMD_DMI),
        ("dmidecode", CMD_DMI_MEMORY),
        ("ip", CMD_ROUTE),
        ("", CMD_NIC_DRIVERS),
        ("", CMD_INITRAMFS),
        ("dmesg", CMD_DMESG),
        ("", CMD_EDAC),
    ]


def _collect_storage(run: Runner, tools: set[str], probe, unknown: list[str]):
    text = probe("lsblk", CMD_LSBLK)
    if text is None:
        return None, None, None
    disks = parse_lsblk(text)
    devices = list(iter_devices(disks))
    # Without udev, lsblk shows no filesystem types or UUIDs: ask blkid directly (low-level probe).
    if devices and "blkid" in tools:
        command = "blkid -p -o export " + " ".join(shlex.quote(d["path"]) for d in devices)
        output = run(command)
        by_path = {block.get("DEVNAME"): block for block in parse_blkid_export(output.stdout, command)}
        for device in devices:
            block = by_path.get(device["path"], {})
            device["fstype"] = device["fstype"] or block.get("TYPE")
            device["uuid"] = device["uuid"] or block.get("UUID")
            if "pttype" in device:
                device["pttype"] = device["pttype"] or block.get("PTTYPE")
    elif devices:
        unknown.append(_missing("blkid") + " (filesystem types may be incomplete)")
    for disk in disks:
        if disk["partitions"] or not disk.get("pttype"):
            continue
        # A partitioned disk without partition devices (a loop device without partscan, a kernel
        # that did not re-read the table): read the table and probe each partition at its offset.
        if "sfdisk" not in tools:
            unknown.append(_missing("sfdisk") + f" (partitions of {disk['path']} not read)")
            continue
        disk["partitions"] = _partitions_from_table(run, disk, tools, unknown)
    filesystems: list[dict] = []
    text = probe("df", CMD_DF)
    if text is not None:
        known = {d["path"]: d for d in iter_devices(disks)}
        for row in parse_df(text):
            device = known.get(row["device"])
            if device is None:
                continue  # a filesystem on storage that is not one of this machine's disks
            filesystems.append({**row, "uuid": device.get("uuid")})
    encrypted = [
        {"device": d["path"], "fstype": d.get("fstype"), "type": d.get("type")}
        for d in iter_devices(disks)
        if d.get("fstype") == "crypto_LUKS" or d.get("type") == "crypt"
    ]
    return disks, filesystems, encrypted


def _partitions_from_table(run: Runner, disk: dict, tools: set[str], unknown: list[str]) -> list[dict]:
    command = f"sfdisk -J {shlex.quote(disk['path'])}"
    output = run(command)
    if output.exit_status != 0:
        unknown.append(f"partitions of {disk['path']}: {_failed(output)}")
        return []
    table = parse_sfdisk_json(output.stdout, command)
    partitions = []
    for index, entry in enumerate(table["partitions"], start=1):
        node = entry["node"]
        fstype = uuid = None
        if "blkid" in tools:
            probe_cmd = f"blkid -p -O {entry['start_bytes']} -o export {shlex.quote(disk['path'])}"
            blocks = parse_blkid_export(run(probe_cmd).stdout, probe_cmd)
            if blocks:
                fstype, uuid = blocks[0].get("TYPE"), blocks[0].get("UUID")
        partitions.append(
            {
                "name": node.rsplit("/", 1)[-1],
                "path": node,
                "number": index,
                "type": "part",
                "size_bytes": entry["size_bytes"],
                "start_bytes": entry["start_bytes"],
                "fstype": fstype,
                "uuid": uuid,
                "mountpoint": None,
                "children": [],
                "device_node": False,
                "partition_type": entry["type"],
            }
        )
    return partitions


def _installed_memory(run: Runner, tools: set[str], mem_total: int | None) -> tuple[int | None, str | None]:
    """Installed memory and where it was read: the firmware's memory devices (dmidecode), else the
    kernel's boot-time count of RAM, else MemTotal (which is less than installed: the kernel keeps
    its own reservations out of it)."""
    if "dmidecode" in tools:
        output = run(CMD_DMI_MEMORY)
        if output.exit_status == 0:
            installed = parse_dmidecode_memory(output.stdout)
            if installed:
                return installed, "dmi"
    if "dmesg" in tools:
        output = run(CMD_DMESG)
        installed = kernel_memory_bytes(output.stdout) if output.exit_status == 0 else None
        if installed:
            return installed, "kernel"
    return mem_total, ("meminfo" if mem_total else None)


def _lvm_report(command: str, text: str, kind: str) -> list[dict]:
    doc = _load_json(command, text)
    try:
        rows = [row for report in doc["report"] for row in report[kind]]
    except (KeyError, TypeError) as exc:
        raise FactsParseError(command, f"expected report[].{kind}[] ({exc})", text) from exc
    if not all(isinstance(row, dict) for row in rows):
        raise FactsParseError(command, f"a {kind} row is not an object", text)
    return rows


@parser
def parse_lvs(lvs_text: str, pvs_text: str) -> dict:
    """`lvs`/`pvs` JSON reports → {"logical_volumes": [...], "physical_volumes": [...]}; each LV with
    its segments: type, byte range inside the LV, and for linear ones the PV and first extent."""
    pvs = [
        {
            "device": row.get("pv_name"),
            "vg": row.get("vg_name"),
            "pe_start_bytes": _int(CMD_PVS, row.get("pe_start"), "pe_start", pvs_text),
        }
        for row in _lvm_report(CMD_PVS, pvs_text, "pv")
    ]
    lvs: dict[str, dict] = {}
    for row in _lvm_report(CMD_LVS, lvs_text, "lv"):
        path = row.get("lv_path")
        if not isinstance(path, str) or not path:
            raise FactsParseError(CMD_LVS, f"LV without a path: {row!r}"[:120], lvs_text)
        lv = lvs.setdefault(
            path,
            {
                "path": path,
                "dm_path": row.get("lv_dm_path") or None,
                "vg": row.get("vg_name"),
                "name": row.get("lv_name"),
                "segments": [],
            },
        )
        segment = {
            "type": row.get("segtype"),
            "start_bytes": _int(CMD_LVS, row.get("seg_start"), "seg_start", lvs_text),
            "size_bytes": _int(CMD_LVS, row.get("seg_size"), "seg_size", lvs_text),
            "extent_bytes": _int(CMD_LVS, row.get("vg_extent_size"), "vg_extent_size", lvs_text),
        }
        ranges = (row.get("seg_pe_ranges") or "").split()
        if segment["type"] == "linear" and len(ranges) == 1 and ":" in ranges[0]:
            pv, _, extents = ranges[0].rpartition(":")
            segment["pv"] = pv
            segment["first_pe"] = _int(CMD_LVS, extents.split("-")[0], "seg_pe_ranges", lvs_text)
        lv["segments"].append(segment)
    return {"logical_volumes": list(lvs.values()), "physical_volumes": pvs}


def _collect_lvm(probe, disks: list[dict], unknown: list[str]) -> dict | None:
    """The LVM layout when the machine has LVM volumes; None when it has none or it cannot be read."""
    if not any(d.get("type") == "lvm" or d.get("fstype") == "LVM2_member" for d in iter_devices(disks)):
        return None
    lvs_text = probe("lvs", CMD_LVS)
    pvs_text = probe("lvs", CMD_PVS) if lvs_text is not None else None
    if lvs_text is None or pvs_text is None:
        unknown.append("LVM: the volumes' layout could not be read (lvs/pvs)")
        return None
    return parse_lvs(lvs_text, pvs_text)


def _collect_nics(probe) -> list[dict] | None:
    text = probe("ip", CMD_IP_LINK)
    if text is None:
        return None
    nics = parse_ip_link(text)
    text = probe("", CMD_NIC_DRIVERS)
    drivers = parse_nic_drivers(text) if text is not None else {}
    for nic in nics:
        nic["driver"] = drivers.get(nic["name"])
    text = probe("ip", CMD_IP_ADDR)
    if text is not None:
        addresses = parse_ip_addr(text)
        for nic in nics:
            nic["addresses"] = addresses.get(nic["name"], [])
    return nics


def _collect_kernel(probe, unknown: list[str]) -> dict | None:
    text = probe("uname", CMD_UNAME)
    kernel = parse_uname(text) if text is not None else None
    if kernel is None:
        unknown.append("kernel: could not be determined")
        return None
    text = probe("", CMD_VIRTIO)
    found = parse_virtio_probe(text) if text is not None else None
    if found is None:
        kernel["virtio_modules"] = None
        kernel["virtio_sources"] = []
        unknown.append("kernel virtio drivers: no module list, kernel config or /sys/module to read")
    else:
        kernel["virtio_modules"], kernel["virtio_sources"] = found
        kernel["virtio_builtin"] = builtin_virtio(text)
    return kernel


def _collect_packages(probe, tools: set[str], unknown: list[str]) -> dict | None:
    if "dpkg-query" in tools:
        text = probe("dpkg-query", CMD_DPKG)
        names = parse_dpkg(text) if text is not None else None
        manager = "dpkg"
    elif "rpm" in tools:
        text = probe("rpm", CMD_RPM)
        names = parse_rpm(text) if text is not None else None
        manager = "rpm"
    else:
        unknown.append("packages: neither dpkg-query nor rpm is installed")
        return None
    if names is None:
        return None
    return {"manager": manager, "count": len(names), "names": names}


def _collect_health(run: Runner, tools: set[str], probe, disks: list[dict], unknown: list[str]) -> dict:
    health: dict[str, Any] = {"smart": [], "io_errors": None, "edac": None}
    if "smartctl" not in tools:
        unknown.append(_missing("smartctl"))
    else:
        for disk in disks:
            command = f"smartctl -H -j {shlex.quote(disk['path'])}"
            output = run(command)
            if output.exit_status == 127:
                unknown.append(_missing("smartctl"))
                break
            if not output.stdout.strip():  # e.g. not allowed to open the device: nothing to parse
                unknown.append(f"SMART status of {disk['path']}: {_failed(output)}")
                continue
            result = parse_smartctl(output.stdout, disk["path"], command)
            if result["passed"] is None:
                unknown.append(f"SMART status of {disk['path']}: {result['reason']}")
            health["smart"].append(result)
    text = probe("dmesg", CMD_DMESG)
    if text is not None:
        health["io_errors"] = count_io_errors(text)
    text = probe("", CMD_EDAC)
    if text is not None:
        health["edac"] = parse_edac(text)
        if health["edac"] is None:
            unknown.append("EDAC: no memory controller reports error counts")
    return health
