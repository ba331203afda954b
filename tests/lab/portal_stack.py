"""The portal reachable from inside a lab, and the lab's muxes running the kernel daemon in portal
mode (`lbagent run --portal URL --token-file F --node NAME`).

The portal (uvicorn) stays in the root namespace, where PostgreSQL and Redis listen on loopback;
a veth pair links it to the lab's router namespace, on a /30 of 10.92.0.0/16 picked from the lab's
unique prefix (labs of concurrent sessions all use 10.90.0.0/24 inside, so the root namespace gets
no route into a lab):

    root namespace  <prefix>pt  10.92.a.b+1/30  <-->  pt0  10.92.a.b+2/30  router namespace

The muxes reach the portal through their default route (the router), which masquerades what it
sends out of pt0 (an nft table of its own in the router namespace). Deleting the root end removes
the pair; deleting the router namespace (lab teardown) removes both the pair and the table, so
nothing outlives the lab even after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import sys
from pathlib import Path

from lbagent.lab import netns
from lbagent.lab.harness import METRICS_PORT, MuxProcess
from lbagent.lab.topology import Lab, Node

LINK_SPACE = ipaddress.ip_network("10.92.0.0/16")
ROUTER_IFACE = "pt0"
NAT_TABLE = "lbagent_lab_portal"


def _routed(prefix: str) -> bool:
    """True when the root namespace has a route (other than the default) covering or inside `prefix`."""
    for selector in ("match", "root"):
        out = netns.run(["ip", "-j", "route", "show", selector, prefix]).stdout
        if any(r.get("dst") != "default" for r in json.loads(out or "[]")):
            return True
    return False


class PortalLink:
    """The veth between the root namespace and the lab's router, made and removed by name."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.name = f"{lab.prefix}pt"  # e.g. dcl1a2bpt: ours, by the lab's unique prefix
        self.network: ipaddress.IPv4Network | None = None
        self.made = False

    @property
    def portal_address(self) -> str:
        assert self.network is not None
        return str(self.network.network_address + 1)

    @property
    def router_address(self) -> str:
        assert self.network is not None
        return str(self.network.network_address + 2)

    def _pick_network(self) -> ipaddress.IPv4Network:
        count = LINK_SPACE.num_addresses // 4
        first = int(hashlib.sha256(self.lab.prefix.encode()).hexdigest()[:8], 16) % count
        for k in range(64):
            base = LINK_SPACE.network_address + ((first + k) % count) * 4
            candidate = ipaddress.ip_network(f"{base}/30")
            if not _routed(str(candidate)):
                return candidate
        raise RuntimeError(f"no free /30 in {LINK_SPACE} near index {first} for the portal link")

    def _exists(self) -> bool:
        return netns.run(["ip", "link", "show", "dev", self.name], check=False).returncode == 0

    def up(self) -> None:
        self.network = self._pick_network()
        self.made = True  # from here on, down() removes whatever part exists
        r = self.lab.router.netns
        netns.run(["ip", "link", "add", self.name, "type", "veth", "peer", "name", ROUTER_IFACE, "netns", r])
        netns.run(["ip", "addr", "add", f"{self.portal_address}/30", "dev", self.name])
        netns.run(["ip", "link", "set", self.name, "up"])
        netns.run(["ip", "-n", r, "addr", "add", f"{self.router_address}/30", "dev", ROUTER_IFACE])
        netns.run(["ip", "-n", r, "link", "set", ROUTER_IFACE, "up"])
        netns.run(["nft", "-f", "-"], netns=r, input_text=(
            f"table ip {NAT_TABLE} {{\n"
            "  chain post {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{ROUTER_IFACE}" masquerade\n'
            "  }\n"
            "}\n"))

    def down(self) -> None:
        if not self.made:
            return
        if self._exists():
            netns.run(["ip", "link", "del", "dev", self.name])  # the peer goes with it
        if Path(f"/run/netns/{self.lab.router.netns}").exists():
            netns.run(["nft", "delete", "table", "ip", NAT_TABLE], netns=self.lab.router.netns, check=False)
        self.made = False


class PortalMux(MuxProcess):
    """The lab daemon of one mux in portal mode, with its own config file and run directory (the
    file-mode daemon's state, history and ExaBGP files are left alone)."""

    def __init__(self, lab: Lab, mux: Node, *, portal_url: str, token: str) -> None:
        super().__init__(lab, mux)
        self.portal_url = portal_url
        self.dir = Path(lab.run_dir) / mux.name / "portal"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "state.json"  # written by the daemon's portal client
        self.token_file = self.dir / "token"
        self.token_file.write_text(token)
        self.token_file.chmod(0o600)
        self.key = f"portal-daemon-{mux.name}"
        self.log_name = f"portal-daemon-{mux.name}.log"

    def start(self) -> None:
        assert self.bgp is not None
        argv = [sys.executable, "-m", "lbagent.daemon",
                "--portal", self.portal_url, "--token-file", str(self.token_file), "--node", self.mux.name,
                "--config", str(self.config), "--metrics", f"127.0.0.1:{METRICS_PORT}",
                "--run-dir", str(self.dir),
                "--bgp-neighbor", self.bgp.neighbor, "--bgp-local-address", self.bgp.local_address,
                "--bgp-local-as", str(self.bgp.local_as), "--bgp-peer-as", str(self.bgp.peer_as)]
        self.proc = self.lab.spawn(self.key, self.mux.netns, argv, log_name=self.log_name)

    def log_tail(self, chars: int = 1500) -> str:
        path = Path(self.lab.run_dir) / self.log_name
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
