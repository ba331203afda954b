"""Domain XML from assessment facts: topology, memory cap, virtio disks, MACs, firmware, console."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from p2v.conversion import domain_xml as dx

MiB = 1024 * 1024


def spec(**overrides) -> dx.DomainSpec:
    values = dict(
        name="p2v-web-1",
        domain_type="qemu",
        vcpus=4,
        sockets=2,
        cores=2,
        threads=1,
        memory_bytes=512 * MiB,
        firmware="bios",
        disks=(
            dx.DiskSpec("/pool/a.raw", "vda", 10 * MiB, "sda"),
            dx.DiskSpec("/pool/b.raw", "vdb", 20 * MiB, "sdb"),
        ),
        nics=(dx.NicSpec("52:54:00:12:34:56", "eth0"),),
        network="user",
        console_log="/var/log/c.log",
        nvram_path="/pool/p2v-web-1_VARS.fd",
    )
    values.update(overrides)
    return dx.DomainSpec(**values)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 (our own output)


def test_bios_domain_carries_the_assessed_hardware():
    root = parse(dx.render_domain_xml(spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "4"
    topology = root.find("cpu/topology")
    assert (topology.get("sockets"), topology.get("cores"), topology.get("threads")) == ("2", "2", "1")
    assert root.findtext("memory") == str(512 * 1024)
    assert [d.find("target").get("dev") for d in root.findall("devices/disk")] == ["vda", "vdb"]
    assert {d.find("target").get("bus") for d in root.findall("devices/disk")} == {"virtio"}
    assert [i.find("mac").get("address") for i in root.findall("devices/interface")] == ["52:54:00:12:34:56"]
    assert root.find("devices/interface/model").get("type") == "virtio"
    assert root.find("features/acpi") is not None
    assert root.find("features/apic") is not None
    assert root.find("os/loader") is None
    assert root.find("devices/serial/source").get("path") == "/var/log/c.log"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"


def test_uefi_domain_uses_ovmf_with_its_own_nvram():
    root = parse(dx.render_domain_xml(spec(firmware="uefi")))
    assert root.findtext("os/loader") == dx.OVMF_CODE
    assert root.find("os/loader").get("type") == "pflash"
    assert root.findtext("os/nvram") == "/pool/p2v-web-1_VARS.fd"


def test_bridge_network_names_its_source():
    root = parse(dx.render_domain_xml(spec(network="bridge:br-p2v")))
    assert root.find("devices/interface").get("type") == "bridge"
    assert root.find("devices/interface/source").get("bridge") == "br-p2v"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "bad name!", "domain name"),
        ("firmware", "coreboot", "firmware"),
        ("network", "vlan:7", "network must be"),
        ("disks", (), "at least one disk"),
        ("nics", (dx.NicSpec("01:00:5e:00:00:01", "eth0"),), "unicast"),
        ("nics", (dx.NicSpec("52:54:00:zz:00:01", "eth0"),), "unicast"),
    ],
)
def test_bad_specs_are_refused_naming_the_value(field, value, message):
    with pytest.raises(dx.DomainSpecError, match=message):
        dx.render_domain_xml(spec(**{field: value}))


def test_memory_is_capped_by_policy_and_defaults_to_the_cap():
    assert dx.cap_memory(32 * 1024 * MiB, 4096 * MiB) == 4096 * MiB
    assert dx.cap_memory(1024 * MiB, 4096 * MiB) == 1024 * MiB
    assert dx.cap_memory(None, 4096 * MiB) == 4096 * MiB


def test_topology_that_does_not_multiply_out_falls_back_to_one_socket():
    assert dx.cpu_topology({"vcpus": 8, "sockets": 2, "cores_per_socket": 2, "threads_per_core": 2}) == (
        8,
        2,
        2,
        2,
    )
    assert dx.cpu_topology({"vcpus": 6, "sockets": 4, "cores_per_socket": 2, "threads_per_core": 1}) == (
        6,
        1,
        6,
        1,
    )
    with pytest.raises(dx.DomainSpecError, match="vcpus"):
        dx.cpu_topology({"vcpus": "two"})


def test_target_devices_follow_virtio_naming():
    assert [dx.target_dev(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]
