"""Facts parsers on output captured from this project's machines (p2v/tests/data/), and on garbage.

standin_*: captured over SSH from the stand-in physical machine (sshd in a namespace, one loop disk
holding a BIOS image, no udev); host_*: the host itself (a KVM guest with a virtio disk).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2v import facts
from p2v.facts import CommandOutput, FactsParseError

DATA = Path(__file__).with_name("data")
LOOP = "/dev/loop0"


def data(name: str) -> str:
    return (DATA / name).read_text()


def standin_outputs() -> dict[str, str]:
    """Command → stdout, as the stand-in answered them."""
    outputs = {
        facts.CMD_TOOLS: data("standin_tools.txt"),
        facts.CMD_LSCPU: data("standin_lscpu.json"),
        facts.CMD_LSBLK: data("standin_lsblk.json"),
        facts.CMD_DF: data("standin_df.txt"),
        facts.CMD_IP_ADDR: data("standin_ip_addr.json"),
        facts.CMD_IP_LINK: data("standin_ip_link.json"),
        facts.CMD_MEMINFO: data("standin_meminfo.txt"),
        facts.CMD_OS_RELEASE: data("standin_os_release.txt"),
        facts.CMD_UNAME: data("standin_uname.txt"),
        facts.CMD_FIRMWARE: data("standin_firmware.txt"),
        facts.CMD_VIRTIO: data("standin_virtio.txt"),
        facts.CMD_SERVICES: data("standin_services.txt"),
        facts.CMD_EDAC: data("standin_edac.txt"),
        facts.CMD_DPKG: data("standin_dpkg.txt"),
        facts.CMD_DMESG: data("host_dmesg.txt"),
        # The stand-in is a namespace on a host without systemd, DMI, initramfs or a default route.
        facts.CMD_RUNNING: "",
        facts.CMD_HOSTNAME: "vm\n",
        facts.CMD_DMI: "",
        facts.CMD_ROUTE: "[]",
        facts.CMD_NIC_DRIVERS: "",
        facts.CMD_INITRAMFS: "",
        f"blkid -p -o export {LOOP}": data("standin_blkid.txt"),
        f"sfdisk -J {LOOP}": data("standin_sfdisk.json"),
        f"smartctl -H -j {LOOP}": data("standin_smartctl_loop.json"),
    }
    for offset in data("partition_offsets.txt").split():
        outputs[f"blkid -p -O {offset} -o export {LOOP}"] = data(f"standin_blkid_offset_{offset}.txt")
    return outputs


class Replay:
    """A runner answering from recorded output; records what was asked."""

    def __init__(self, outputs: dict[str, str], statuses: dict[str, int] | None = None) -> None:
        self.outputs, self.statuses, self.asked = outputs, statuses or {}, []

    def __call__(self, command: str) -> CommandOutput:
        self.asked.append(command)
        if command not in self.outputs:
            raise AssertionError(f"unexpected command {command!r}")
        default = 1 if command.startswith("smartctl") or command == facts.CMD_RUNNING else 0
        status = self.statuses.get(command, default)
        return CommandOutput(command, status, self.outputs[command], "")


def test_collect_facts_from_the_stand_in_recording():
    doc = facts.collect_facts(Replay(standin_outputs()))
    assert doc["schema"] == facts.FACTS_SCHEMA
    assert doc["cpu"] == {
        "vcpus": 2,
        "sockets": 1,
        "cores_per_socket": 2,
        "threads_per_core": 1,
        "model": "AMD EPYC",
        "architecture": "x86_64",
    }
    assert doc["memory_bytes"] == 24683656 * 1024
    [disk] = doc["disks"]
    assert (disk["path"], disk["size_bytes"], disk["type"], disk["pttype"]) == (
        LOOP,
        256 * 2**20,
        "loop",
        "dos",
    )
    # No partition devices (loop without partscan): read from the table, probed at their offsets.
    assert [(p["name"], p["start_bytes"], p["size_bytes"], p["fstype"]) for p in disk["partitions"]] == [
        ("loop0p1", 1048576, 41943040, "vfat"),
        ("loop0p2", 42991616, 225443840, "ext4"),
    ]
    assert all(p["uuid"] for p in disk["partitions"])
    assert [(n["name"], n["kind"], n["state"]) for n in doc["nics"]] == [("eth0", "veth", "up")]
    assert doc["nics"][0]["mac"] == json.loads(data("standin_ip_link.json"))[1]["address"]
    assert doc["nics"][0]["addresses"][0].endswith("/30")
    assert doc["firmware"] == "bios"
    assert doc["os"]["id"] == "debian"
    assert doc["kernel"]["virtio_modules"] == [
        "virtio_blk",
        "virtio_mem",
        "virtio_net",
        "virtio_pci",
        "virtio_pci_modern_dev",
    ]
    assert doc["packages"]["manager"] == "dpkg"
    assert doc["packages"]["count"] == len(doc["packages"]["names"]) > 10
    assert "ssh.service" in doc["enabled_services"]
    assert doc["services"] is None  # no systemd running: which services run is unknown, not "none"
    assert doc["hostname"] == "vm"
    assert doc["dmi"] is None
    assert doc["default_route"] is None
    assert doc["initramfs"] is None
    # Neither dmidecode nor the kernel's boot line is there: installed memory falls back to MemTotal.
    assert (doc["memory_source"], doc["memory_total_bytes"]) == ("meminfo", 24683656 * 1024)
    assert doc["health"]["smart"] == [
        {"disk": LOOP, "passed": None, "exit_status": 1, "reason": f"{LOOP}: Unable to detect device type"}
    ]
    assert doc["health"]["io_errors"] == 0
    assert doc["filesystems"] == []  # the host's / is not on the stand-in's disk
    assert doc["unknown"] == [
        "DMI: /sys/class/dmi is absent (vendor, model and serial unknown)",
        f"`{facts.CMD_RUNNING}` failed: exit status 1",
        f"SMART status of {LOOP}: {LOOP}: Unable to detect device type",
        "EDAC: no memory controller reports error counts",
    ]


def test_collect_facts_batches_the_independent_probes():
    replay = Replay(standin_outputs())
    batches = []

    def run_many(commands):
        batches.append(list(commands))
        return [replay(c) for c in commands]

    assert facts.collect_facts(replay, run_many) == facts.collect_facts(Replay(standin_outputs()))
    assert len(batches) == 1
    assert facts.CMD_LSCPU in batches[0]
    assert facts.CMD_LSBLK in batches[0]


def test_missing_tools_are_unknown_not_a_crash():
    outputs = standin_outputs()
    outputs[facts.CMD_TOOLS] = "uname\n"  # a minimal machine: no util-linux, iproute2, dpkg, smartctl...
    doc = facts.collect_facts(Replay(outputs))
    assert doc["cpu"] is None
    assert doc["disks"] is None
    assert doc["nics"] is None
    assert doc["packages"] is None
    assert doc["memory_bytes"] == 24683656 * 1024  # /proc needs no tool
    for reason in (
        "lscpu: not installed",
        "lsblk: not installed",
        "ip: not installed",
        "smartctl: not installed",
        "packages: neither dpkg-query nor rpm is installed",
        "cpu: could not be determined",
        "disks: could not be determined",
    ):
        assert reason in doc["unknown"]


def test_command_not_found_at_run_time_is_unknown():
    outputs = standin_outputs()
    replay = Replay(outputs, statuses={facts.CMD_LSCPU: 127})
    outputs[facts.CMD_LSCPU] = ""
    doc = facts.collect_facts(replay)
    assert doc["cpu"] is None
    assert "lscpu: not installed" in doc["unknown"]


def test_failing_command_without_output_is_unknown_with_its_error():
    outputs = standin_outputs()
    outputs[facts.CMD_DMESG] = ""
    doc = facts.collect_facts(Replay(outputs, statuses={facts.CMD_DMESG: 1}))
    assert doc["health"]["io_errors"] is None
    assert any(reason.startswith("`dmesg` failed") for reason in doc["unknown"])


def test_garbage_from_a_probe_stops_with_the_command_named():
    outputs = standin_outputs()
    outputs[facts.CMD_LSBLK] = "NAME MAJ:MIN RM SIZE RO TYPE\nsda 8:0 0 1T 0 disk\n"
    with pytest.raises(FactsParseError, match=r"`lsblk -J -b .*`: output is not JSON .*NAME MAJ:MIN"):
        facts.collect_facts(Replay(outputs))


def test_host_lsblk_keeps_real_disks_only():
    disks = facts.parse_lsblk(data("host_lsblk.json"))
    assert [(d["name"], d["size_bytes"], d["mountpoint"]) for d in disks] == [("vda", 274877906944, "/")]


def test_host_df_keeps_block_device_filesystems():
    rows = facts.parse_df(data("host_df.txt"))
    assert [(r["device"], r["mountpoint"], r["fstype"]) for r in rows] == [("/dev/vda", "/", "ext4")]
    assert rows[0]["used_bytes"] + rows[0]["avail_bytes"] <= rows[0]["size_bytes"]


def test_host_nics_leave_out_loopback_and_software_links():
    nics = facts.parse_ip_link(data("host_ip_link.json"))
    assert [n["name"] for n in nics] == ["eth0"]  # ifb0/ifb1 are software (ifb), lo is loopback
    assert facts.parse_ip_addr(data("host_ip_addr.json"))["eth0"][0] == "192.0.2.2/24"


def test_bridge_ports_are_not_nics():
    links = [
        {
            "ifindex": 2,
            "ifname": "eno1",
            "link_type": "ether",
            "address": "52:54:00:aa:bb:01",
            "mtu": 1500,
            "operstate": "UP",
        },
        {
            "ifindex": 3,
            "ifname": "docker0",
            "link_type": "ether",
            "address": "02:42:00:00:00:01",
            "linkinfo": {"info_kind": "bridge"},
        },
        {
            "ifindex": 4,
            "ifname": "veth1",
            "link_type": "ether",
            "address": "02:42:00:00:00:02",
            "master": "docker0",
            "linkinfo": {"info_kind": "veth"},
        },
        {
            "ifindex": 5,
            "ifname": "eno1.10",
            "link_type": "ether",
            "address": "52:54:00:aa:bb:01",
            "linkinfo": {"info_kind": "vlan"},
        },
    ]
    assert [n["name"] for n in facts.parse_ip_link(json.dumps(links))] == ["eno1"]


def test_lsblk_with_udev_lvm_and_luks():
    doc = {
        "blockdevices": [
            {
                "name": "sda",
                "path": "/dev/sda",
                "size": 1000,
                "type": "disk",
                "model": "  WDC  ",
                "pttype": "gpt",
                "children": [
                    {
                        "name": "sda1",
                        "path": "/dev/sda1",
                        "size": 100,
                        "type": "part",
                        "fstype": "vfat",
                        "uuid": "A-B",
                        "mountpoint": "/boot/efi",
                    },
                    {
                        "name": "sda2",
                        "path": "/dev/sda2",
                        "size": 900,
                        "type": "part",
                        "fstype": "crypto_LUKS",
                        "children": [
                            {
                                "name": "root",
                                "path": "/dev/mapper/root",
                                "size": 890,
                                "type": "crypt",
                                "fstype": "ext4",
                                "uuid": "u",
                                "mountpoint": "/",
                            }
                        ],
                    },
                ],
            },
            {"name": "sr0", "path": "/dev/sr0", "size": 1000, "type": "rom"},
            {"name": "loop3", "path": "/dev/loop3", "size": 5000, "type": "loop", "fstype": "squashfs"},
        ]
    }
    disks = facts.parse_lsblk(json.dumps(doc))
    assert [d["name"] for d in disks] == ["sda"]
    assert disks[0]["model"] == "WDC"
    assert [d["path"] for d in facts.iter_devices(disks)] == [
        "/dev/sda",
        "/dev/sda1",
        "/dev/sda2",
        "/dev/mapper/root",
    ]


def test_virtio_from_module_lists_and_kernel_config():
    text = (
        "@source /lib/modules/6.1.0-13-amd64/modules.builtin\n"
        "@source /lib/modules/6.1.0-13-amd64/modules.dep\n"
        "kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz "
        "kernel/drivers/virtio/virtio_ring.ko.xz\n"
        "kernel/drivers/net/virtio_net.ko.xz: kernel/net/core/failover.ko.xz\n"
        "@source /boot/config-6.1.0-13-amd64\n"
        "CONFIG_VIRTIO_PCI=y\nCONFIG_SCSI_VIRTIO=m\n# CONFIG_VIRTIO_MMIO is not set\n"
    )
    names, sources = facts.parse_virtio_probe(text)
    assert names == ["virtio", "virtio_blk", "virtio_net", "virtio_pci", "virtio_ring", "virtio_scsi"]
    assert len(sources) == 3
    assert facts.parse_virtio_probe("") is None  # nowhere to look: unknown, not "no drivers"
    assert facts.parse_virtio_probe("@source /sys/module\n") == ([], ["/sys/module"])


def test_smartctl_failing_and_passing():
    failing = {"smartctl": {"exit_status": 8, "messages": []}, "smart_status": {"passed": False}}
    assert facts.parse_smartctl(json.dumps(failing), "/dev/sda", "smartctl -H -j /dev/sda")["passed"] is False
    passing = {"smartctl": {"exit_status": 0}, "smart_status": {"passed": True}}
    assert facts.parse_smartctl(json.dumps(passing), "/dev/sda", "x")["passed"] is True
    with pytest.raises(FactsParseError, match="smartctl -H -j /dev/sda"):
        facts.parse_smartctl('{"no": "smartctl"}', "/dev/sda", "smartctl -H -j /dev/sda")


def test_kernel_log_io_errors_and_edac():
    log = (
        "[ 12.1] blk_update_request: I/O error, dev sda, sector 1234 op 0x0:(READ)\n"
        "[ 12.2] Buffer I/O error on dev sda1, logical block 5, async page read\n"
        "[ 13.0] EXT4-fs (sda1): mounted filesystem\n"
    )
    assert facts.count_io_errors(log) == 2
    assert facts.count_io_errors(data("host_dmesg.txt")) == 0
    edac = (
        "@edac present\n/sys/devices/system/edac/mc/mc0/ce_count 3\n"
        "/sys/devices/system/edac/mc/mc1/ce_count 2\n"
        "/sys/devices/system/edac/mc/mc0/ue_count 1\n"
    )
    assert facts.parse_edac(edac) == {"ce": 5, "ue": 1}
    assert facts.parse_edac(data("standin_edac.txt")) is None


def test_os_release_quoting():
    parsed = facts.parse_os_release(
        'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n'
    )
    assert parsed["name"] == "Rocky Linux"
    assert parsed["id_like"] == ["rhel", "centos", "fedora"]


@pytest.mark.parametrize(
    ("parser", "text", "message"),
    [
        (
            facts.parse_lscpu,
            '{"lscpu": [{"field": "CPU(s):", "data": "many"}]}',
            "CPU(s) is not an integer: 'many'",
        ),
        (facts.parse_lscpu, "[1, 2]", "expected an object with an 'lscpu' list"),
        (facts.parse_meminfo, "MemTotal: lots\n", "MemTotal line is not"),
        (facts.parse_meminfo, "MemFree: 1 kB\n", "no MemTotal line"),
        (
            facts.parse_lsblk,
            '{"blockdevices": [{"name": "sda", "size": -1, "type": "disk"}]}',
            "size of sda is negative",
        ),
        (facts.parse_df, "nonsense\n", "missing the 'Filesystem Type ...' header"),
        (facts.parse_ip_link, '{"ifname": "eth0"}', "expected a JSON list of interfaces"),
        (facts.parse_os_release, "this is not os-release\n", "line is not KEY=value"),
        (facts.parse_uname, "Linux\n", "expected '<sysname> <release> <machine>'"),
        (facts.parse_firmware, "coreboot\n", "expected 'bios' or 'uefi'"),
        (facts.parse_dpkg, "ii\n", "line is not '<status> <package>'"),
        (facts.parse_edac, "1 2 3\n", "expected an '@edac present|absent' line first"),
    ],
)
def test_garbage_gets_a_clear_error(parser, text, message):
    with pytest.raises(FactsParseError) as caught:
        parser(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("`")  # names the command


PARSERS = [
    facts.parse_lscpu,
    facts.parse_meminfo,
    facts.parse_lsblk,
    facts.parse_df,
    facts.parse_ip_link,
    facts.parse_ip_addr,
    facts.parse_os_release,
    facts.parse_uname,
    facts.parse_firmware,
    facts.parse_dpkg,
    facts.parse_rpm,
    facts.parse_enabled_services,
    facts.parse_edac,
    facts.parse_blkid_export,
    facts.parse_virtio_probe,
]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(PARSERS),
    st.one_of(
        st.text(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(json.dumps),
    ),
)
def test_parsers_never_crash_on_arbitrary_input(parser, text):
    """Whatever a machine prints, a parser returns a value or raises FactsParseError, nothing else."""
    with contextlib.suppress(FactsParseError):
        parser(text)


JSON_SAMPLES = [
    (facts.parse_lscpu, "standin_lscpu.json"),
    (facts.parse_lsblk, "standin_lsblk.json"),
    (facts.parse_lsblk, "host_lsblk.json"),
    (facts.parse_ip_link, "host_ip_link.json"),
    (facts.parse_ip_addr, "host_ip_addr.json"),
    (facts.parse_smartctl, "standin_smartctl_loop.json"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def mutate(doc, draw):
    """Replace one randomly chosen node of a real document with random JSON."""
    if isinstance(doc, (dict, list)) and doc and draw(st.booleans()):
        keys = list(doc.keys()) if isinstance(doc, dict) else list(range(len(doc)))
        key = draw(st.sampled_from(keys))
        copy = dict(doc) if isinstance(doc, dict) else list(doc)
        copy[key] = mutate(doc[key], draw)
        return copy
    return draw(json_values)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(JSON_SAMPLES), st.data())
def test_parsers_survive_mutated_real_output(sample, drawn):
    """Real output with one node swapped for random JSON: a value or a FactsParseError, never a crash."""
    parser, name = sample
    text = json.dumps(mutate(json.loads(data(name)), drawn.draw))
    with contextlib.suppress(FactsParseError):
        parser(text, "/dev/sda", "smartctl -H -j /dev/sda") if parser is facts.parse_smartctl else parser(
            text
        )


def test_smartctl_and_sfdisk_failing_without_output_are_unknown():
    outputs = standin_outputs()
    outputs[f"smartctl -H -j {LOOP}"] = ""
    outputs[f"sfdisk -J {LOOP}"] = ""
    statuses = {f"smartctl -H -j {LOOP}": 2, f"sfdisk -J {LOOP}": 1}
    doc = facts.collect_facts(Replay(outputs, statuses))
    assert doc["health"]["smart"] == []
    assert doc["disks"][0]["partitions"] == []
    assert any(
        r.startswith(f"SMART status of {LOOP}: `smartctl -H -j {LOOP}` failed") for r in doc["unknown"]
    )
    assert any(r.startswith(f"partitions of {LOOP}: `sfdisk -J {LOOP}` failed") for r in doc["unknown"])
