"""Builds and tears down one lab: a router namespace (bird2, ECMP) holding the L2 segment's bridge,
mux namespaces and backend-host namespaces on that segment, and client namespaces behind the router.

Everything gets the lab's unique prefix (`dcl<4 hex>`), and a state file written *before* each
resource is made records it, so `down` removes exactly what this lab made, even after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lbagent.lab import netns
from lbagent.lab.bird import render_bird_conf

RUN_ROOT = Path(os.environ.get("LBAGENT_LAB_DIR", "/run/lbagent-lab"))
SEGMENT = "10.90.0"  # the L2 segment: router .1, muxes .11+, backends .21+
CLIENT_NET = "10.91"  # client i: 10.91.i.2, router side 10.91.i.1
VIPS = tuple(f"203.0.113.{i}" for i in range(10, 20))
# IPv6 beside IPv4 on the same links (dual stack): the segment fd00:90::/64 (router ::1, muxes
# ::11+, backends ::21+), client i fd00:91:i::2 behind fd00:91:i::1, VIPs 2001:db8:113::10-19.
SEGMENT6 = "fd00:90::"
CLIENT_NET6 = "fd00:91"
VIPS6 = tuple(f"2001:db8:113::{i}" for i in range(10, 20))
SERVICE_TCP_PORT = 80
SERVICE_UDP_PORT = 5001


@dataclass
class Node:
    """One namespace of the lab and its address on its first interface (`eth0`)."""

    role: str
    name: str  # what the node calls itself (mux-1, web-1, client-1, router)
    netns: str
    address: str
    mac: str
    iface: str = "eth0"
    address6: str = ""  # its IPv6 address on `iface`


@dataclass
class Lab:
    prefix: str
    run_dir: str
    router: Node
    muxes: list[Node]
    backends: list[Node]
    clients: list[Node]
    vips: list[str] = field(default_factory=lambda: list(VIPS))
    vips6: list[str] = field(default_factory=lambda: list(VIPS6))
    namespaces: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)

    # -- state file -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, prefix: str) -> Lab:
        path = RUN_ROOT / prefix / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LookupError(f"no lab named {prefix!r} (no {path})") from None
        nodes = {k: [Node(**n) for n in data[k]] for k in ("muxes", "backends", "clients")}
        return cls(prefix=data["prefix"], run_dir=data["run_dir"], router=Node(**data["router"]),
                   vips=data["vips"], vips6=data.get("vips6", []), namespaces=data["namespaces"],
                   pids=data["pids"], **nodes)

    # -- helpers ------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in [self.router, *self.muxes, *self.backends, *self.clients]:
            if n.name == name:
                return n
        raise LookupError(f"lab {self.prefix} has no node {name!r}")

    def backend_by_address(self, address: str) -> Node:
        for n in self.backends:
            if address in (n.address, n.address6):
                return n
        raise LookupError(f"lab {self.prefix} has no backend at {address!r}")

    def spawn(self, key: str, netns_name: str, argv: list[str], *, env: dict[str, str] | None = None,
              log_name: str | None = None) -> subprocess.Popen:
        """Start a process inside one of this lab's namespaces; its PID is recorded for `down`."""
        if netns_name not in self.namespaces:
            raise ValueError(f"{netns_name!r} is not a namespace of lab {self.prefix}")
        log = open(Path(self.run_dir) / (log_name or f"{key}.log"), "ab")  # noqa: SIM115 - child owns it
        proc = subprocess.Popen(["ip", "netns", "exec", netns_name, *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.pids[key] = proc.pid
        self.save()
        return proc

    def forget_pid(self, key: str) -> None:
        self.pids.pop(key, None)
        self.save()

    def birdc(self, *command: str) -> str:
        return netns.run(["birdc", "-s", str(Path(self.run_dir) / "bird.ctl"), *command]).stdout

    def router_routes(self, prefix: str) -> list[str]:
        """Next hops the router's kernel uses for `prefix` (an IPv4 or IPv6 address; empty when
        it has no route)."""
        family, length = ("-6", 128) if ":" in prefix else ("-4", 32)
        out = netns.run(["ip", family, "-j", "route", "show", f"{prefix}/{length}"],
                        netns=self.router.netns).stdout
        hops: list[str] = []
        for route in json.loads(out or "[]"):
            if "gateway" in route:
                hops.append(route["gateway"])
            hops.extend(h["gateway"] for h in route.get("nexthops", []) if "gateway" in h)
        return sorted(hops)


def _mac(prefix: str, group: int, index: int) -> str:
    h = hashlib.sha256(prefix.encode()).hexdigest()[:4]  # any prefix, two stable bytes
    return f"02:dc:{h[:2]}:{h[2:]}:{group:02x}:{index:02x}"


def _sh(netns_name: str, *commands: str) -> None:
    """Run several `ip` commands in one namespace through one `ip -batch` (fast)."""
    netns.run(["ip", "-n", netns_name, "-batch", "-"], input_text="\n".join(commands) + "\n")


def _sysctl(netns_name: str, values: dict[str, str]) -> None:
    netns.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())], netns=netns_name)


def build(*, prefix: str | None = None, mux_count: int = 2, backend_count: int = 4, client_count: int = 1,
          with_bird: bool = True) -> Lab:
    """Make a lab and return it; on any failure, remove what was made and re-raise."""
    if not 2 <= mux_count <= 9 or not 3 <= backend_count <= 9 or not 1 <= client_count <= 9:
        raise ValueError(f"lab sizes out of range: muxes={mux_count} (2-9), backends={backend_count} (3-9), "
                         f"clients={client_count} (1-9)")
    prefix = prefix or f"dcl{secrets.token_hex(2)}"
    run_dir = RUN_ROOT / prefix
    run_dir.mkdir(parents=True, exist_ok=False)
    ns = lambda role: f"{prefix}-{role}"  # noqa: E731
    lab = Lab(
        prefix=prefix, run_dir=str(run_dir),
        router=Node("router", "router", ns("router"), f"{SEGMENT}.1", _mac(prefix, 0, 1), iface="br0",
                    address6=f"{SEGMENT6}1"),
        muxes=[Node("mux", f"mux-{i}", ns(f"mux{i}"), f"{SEGMENT}.{10 + i}", _mac(prefix, 1, i),
                    address6=f"{SEGMENT6}{10 + i}")
               for i in range(1, mux_count + 1)],
        backends=[Node("backend", f"web-{i}", ns(f"be{i}"), f"{SEGMENT}.{20 + i}", _mac(prefix, 2, i),
                       address6=f"{SEGMENT6}{20 + i}")
                  for i in range(1, backend_count + 1)],
        clients=[Node("client", f"client-{i}", ns(f"cl{i}"), f"{CLIENT_NET}.{i}.2", _mac(prefix, 3, i),
                      address6=f"{CLIENT_NET6}:{i}::2")
                 for i in range(1, client_count + 1)],
    )
    lab.save()
    try:
        _build(lab, with_bird=with_bird)
    except BaseException:
        teardown(lab)
        raise
    return lab


def _build(lab: Lab, *, with_bird: bool) -> None:
    all_nodes = [lab.router, *lab.muxes, *lab.backends, *lab.clients]
    for node in all_nodes:
        lab.namespaces.append(node.netns)
        lab.save()  # recorded before it exists: a crash in between leaves nothing unrecorded
        netns.run(["ip", "netns", "add", node.netns])
    r = lab.router.netns
    _sh(r, "link set lo up", f"link add br0 address {lab.router.mac} type bridge",
        f"addr add {lab.router.address}/24 dev br0", f"addr add {lab.router.address6}/64 dev br0 nodad",
        "link set br0 up")
    # Bridged frames must not go through the router's iptables (br_netfilter is built in here).
    _sysctl(r, {"net.bridge.bridge-nf-call-iptables": "0", "net.bridge.bridge-nf-call-ip6tables": "0",
                "net.ipv6.conf.all.forwarding": "1", "net.ipv6.fib_multipath_hash_policy": "1",
                "net.ipv4.ip_forward": "1",
                "net.ipv4.fib_multipath_hash_policy": "1",  # ECMP spreads flows by ports too
                "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0"})
    for i, node in enumerate([*lab.muxes, *lab.backends], start=1):
        port = f"p{i}"
        netns.run(["ip", "link", "add", "eth0", "netns", node.netns, "address", node.mac, "type", "veth",
                   "peer", "name", port, "netns", r])
        _sh(r, f"link set {port} master br0", f"link set {port} up")
        # nodad: no seconds of tentative state before the address can be used
        _sh(node.netns, "link set lo up", f"addr add {node.address}/24 dev eth0",
            f"addr add {node.address6}/64 dev eth0 nodad", "link set eth0 up",
            f"route add default via {lab.router.address}", f"route add ::/0 via {lab.router.address6}")
    for i, node in enumerate(lab.clients, start=1):
        port = f"c{i}"
        netns.run(["ip", "link", "add", "eth0", "netns", node.netns, "address", node.mac, "type", "veth",
                   "peer", "name", port, "netns", r])
        _sh(r, f"addr add {CLIENT_NET}.{i}.1/24 dev {port}",
            f"addr add {CLIENT_NET6}:{i}::1/64 dev {port} nodad", f"link set {port} up")
        _sh(node.netns, "link set lo up", f"addr add {node.address}/24 dev eth0",
            f"addr add {node.address6}/64 dev eth0 nodad", "link set eth0 up",
            f"route add default via {CLIENT_NET}.{i}.1", f"route add ::/0 via {CLIENT_NET6}:{i}::1")
    for node in lab.muxes:
        # A mux never routes VIP traffic through its own stack: what reaches the stack is for the
        # slow path (NFQUEUE) or is dropped.
        _sysctl(node.netns, {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "0",
                             "net.ipv4.conf.eth0.rp_filter": "0"})
    for node in lab.backends:
        _sh(node.netns, *[f"addr add {vip}/32 dev lo" for vip in lab.vips],
            *[f"addr add {vip}/128 dev lo nodad" for vip in lab.vips6])
        # Direct server return: the VIP lives on lo and must never be answered for in ARP.
        _sysctl(node.netns, {
            "net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2",
            "net.ipv4.conf.eth0.arp_ignore": "1", "net.ipv4.conf.eth0.arp_announce": "2",
            "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.eth0.rp_filter": "0"})
        _start_service(lab, node)
    if with_bird:
        _start_bird(lab)
    for node in lab.backends:
        _wait_for_log(Path(lab.run_dir) / f"service-{node.name}.log", "serving", timeout_s=10)
    _warm_arp(lab)


def _start_service(lab: Lab, node: Node) -> None:
    argv = [sys.executable, "-m", "lbagent.lab.service", "--name", node.name]
    for vip in [*lab.vips, *lab.vips6]:
        argv += ["--bind", f"{vip}:{SERVICE_TCP_PORT}", "--udp", f"{vip}:{SERVICE_UDP_PORT}"]
    lab.spawn(f"service-{node.name}", node.netns, argv)


def _start_bird(lab: Lab) -> None:
    run_dir = Path(lab.run_dir)
    conf = run_dir / "bird.conf"
    conf.write_text(render_bird_conf(lab.router.address, [m.address for m in lab.muxes],
                                     str(run_dir / "bird.log")))
    pid_file = run_dir / "bird.pid"
    netns.run(["bird", "-c", str(conf), "-s", str(run_dir / "bird.ctl"), "-P", str(pid_file)],
              netns=lab.router.netns)
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bird did not write {pid_file} within 5 s")
        time.sleep(0.02)
    lab.pids["bird"] = int(pid_file.read_text().strip())
    lab.save()


def _wait_for_log(path: Path, needle: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.02)
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    raise RuntimeError(f"{path.name}: no {needle!r} within {timeout_s} s; log: {text[-500:]}")


def _warm_arp(lab: Lab) -> None:
    # Resolve neighbours once so the first test packets are not delayed by ARP.
    targets = " ".join(a for n in [*lab.muxes, *lab.backends] for a in (n.address, n.address6) if a)
    netns.run(["sh", "-c", f"for a in {targets}; do ping -c1 -W1 $a >/dev/null & done; wait"],
              netns=lab.router.netns, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def teardown(lab: Lab) -> None:
    """Remove everything this lab recorded: its processes (by PID), then its namespaces."""
    pids = set(lab.pids.values())
    for name in lab.namespaces:
        if Path(f"/run/netns/{name}").exists():
            pids.update(netns.namespace_pids(name))  # processes inside our own namespaces are ours
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in lab.namespaces:
        netns.forget(name)
        if Path(f"/run/netns/{name}").exists():
            netns.run(["ip", "netns", "del", name], check=False)
    shutil.rmtree(lab.run_dir, ignore_errors=True)


def known_labs() -> list[str]:
    if not RUN_ROOT.exists():
        return []
    return sorted(p.name for p in RUN_ROOT.iterdir() if (p / "state.json").exists())
