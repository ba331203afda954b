"""An isolated network for proving a converted VM: the VM is a copy of the source, with its MAC, IP
address and host key, so it must never meet the source's LAN. The verify stage puts its NICs on a
bridge of its own with no uplink and no address in the host's network; the only other member is a
veth whose far end lives in a network namespace of its own, holding the source's gateway address
(or another address of the VM's subnet). The worker reaches the VM from that namespace only
(p2v.ssh.Endpoint.netns), so the host's routes to the real source are never involved.

Runs on the hypervisor as root (it creates the bridge libvirt attaches the VM to). Names carry the
job's prefix and are removed by name, even after a failure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess


class IsolationError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class IsolatedNetwork:
    bridge: str  # host side: libvirt attaches the VM's NICs here
    netns: str  # where the worker connects from
    veth_host: str
    probe_address: str | None  # the namespace's address (CIDR) on the VM's subnet
    vm_address: str | None  # the address the VM keeps from the source (no prefix)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise IsolationError(f"ip {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def reachable_address(facts: dict) -> tuple[str, str, str] | None:
    """(NIC name, the VM's IPv4 address, the probe's address in CIDR) from the source's assessment:
    the NIC of the default route first, else the first NIC with an IPv4 address; None: no static
    IPv4 address to reach the VM at."""
    nics = [n for n in facts.get("nics") or [] if n.get("addresses")]
    route = facts.get("default_route") or {}
    nics.sort(key=lambda n: n.get("name") != route.get("dev"))
    for nic in nics:
        for cidr in nic["addresses"]:
            try:
                interface = ipaddress.ip_interface(cidr)
            except ValueError:
                continue
            if interface.version != 4 or interface.network.prefixlen > 30:
                continue
            gateway = route.get("gateway")
            candidates = [gateway] if gateway and route.get("dev") == nic["name"] else []
            candidates += [str(h) for h in interface.network.hosts()]
            for candidate in candidates:
                if (
                    candidate
                    and candidate != str(interface.ip)
                    and ipaddress.ip_address(candidate) in (interface.network)
                ):
                    return nic["name"], str(interface.ip), f"{candidate}/{interface.network.prefixlen}"
    return None


def names_for(prefix: str) -> dict[str, str]:
    """Interface and namespace names for one verification (Linux limits names to 15 characters)."""
    short = prefix[:11]
    return {"bridge": f"{short}vb", "netns": f"{short}vn", "veth_host": f"{short}vh", "veth_ns": f"{short}vp"}


def create(prefix: str, vm_address: str | None, probe_address: str | None) -> IsolatedNetwork:
    """The bridge, the namespace and the veth between them; the namespace end gets probe_address
    (None: a bridge the VM is alone on, for a guest only its console can prove)."""
    names = names_for(prefix)
    network = IsolatedNetwork(
        bridge=names["bridge"],
        netns=names["netns"],
        veth_host=names["veth_host"],
        probe_address=probe_address,
        vm_address=vm_address,
    )
    try:
        _ip("netns", "add", network.netns)
        _ip("link", "add", network.bridge, "type", "bridge")
        _ip("link", "add", network.veth_host, "type", "veth", "peer", "name", names["veth_ns"])
        _ip("link", "set", names["veth_ns"], "netns", network.netns)
        _ip("link", "set", network.veth_host, "master", network.bridge)
        for link in (network.veth_host, network.bridge):
            _ip("link", "set", link, "up")
        if probe_address:
            _ip("-n", network.netns, "addr", "add", probe_address, "dev", names["veth_ns"])
        _ip("-n", network.netns, "link", "set", names["veth_ns"], "up")
        _ip("-n", network.netns, "link", "set", "lo", "up")
    except BaseException:
        remove(prefix)
        raise
    return network


def remove(prefix: str) -> list[str]:
    """Delete what create() made for this prefix; problems are returned, absent pieces are fine."""
    names = names_for(prefix)
    problems = []
    for argv in (
        ["link", "del", names["veth_host"]],
        ["link", "del", names["bridge"]],
        ["netns", "del", names["netns"]],
    ):
        done = _ip(*argv, check=False)
        gone = ("Cannot find device", "No such file", "not exist")
        if done.returncode != 0 and not any(text in done.stderr for text in gone):
            problems.append(f"ip {' '.join(argv)}: {done.stderr.strip()}")
    return problems
