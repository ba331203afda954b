"""Driving the mux daemons of a lab: desired-state documents, daemon processes, their metrics, and
TCP clients in the client namespace. Shared by tests/lab and bench/dataplane.py."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lbagent.bgp import BgpSettings
from lbagent.lab import netns
from lbagent.lab.bird import MUX_AS, ROUTER_AS
from lbagent.lab.topology import SERVICE_TCP_PORT, Lab, Node
from lbagent.metrics import parse

HASH_SEED = 24301
OWNER_SEED = 7919
TABLE_SIZE = 65537
METRICS_PORT = 9109


def backend_doc(node: Node, *, weight: int = 1, state: str = "active", port: int = SERVICE_TCP_PORT,
                with_mac: bool = True, ipv6: bool = False) -> dict[str, Any]:
    """A backend entry of the desired state: the node's IPv4 address, or its IPv6 one (ipv6=True,
    for an IPv6 VIP's listener)."""
    return {"address": node.address6 if ipv6 else node.address, "port": port, "weight": weight,
            "state": state, "mac": node.mac if with_mac else None, "host": node.name}


def listener_doc(listener_id: int, backends: list[dict], *, generation: int = 1, protocol: str = "tcp",
                 port: int = SERVICE_TCP_PORT, drain_timeout_s: int = 60,
                 previous: dict | None = None, flow_idle_timeout_s: int | None = None,
                 backend_cap: int | None = None) -> dict[str, Any]:
    doc = {"id": listener_id, "protocol": protocol, "port": port, "generation": generation,
           "drain_timeout_s": drain_timeout_s, "backends": backends, "previous": previous,
           "health_check": None}
    if flow_idle_timeout_s is not None:
        doc["flow_idle_timeout_s"] = flow_idle_timeout_s
    if backend_cap is not None:
        doc["backend_cap"] = backend_cap  # the listener's table: a prime above 100 x the cap
    return doc


def vip_doc(address: str, listeners: list[dict], *, bypass: bool = False,
            bypass_next_hop: str | None = None) -> dict[str, Any]:
    return {"address": address, "bypass": bypass, "bypass_next_hop": bypass_next_hop, "fast_path": False,
            "listeners": listeners}


def state_doc(lab: Lab, node: str, vips: list[dict], *, generation: int = 1,
              max_records: int = 100000, members: list[Node] | None = None) -> dict[str, Any]:
    """A mux's desired state; `members`: the pool's muxes (`cluster.muxes`), all the lab's by default."""
    members = lab.muxes if members is None else members
    return {
        "version": 1, "generation": generation, "node": node,
        "cluster": {"hash_seed": HASH_SEED, "table_size": TABLE_SIZE, "owner_seed": OWNER_SEED,
                    "muxes": [{"name": m.name, "address": m.address, "peer_port": 4790} for m in members],
                    "peer_key": "11" * 32, "redirect_key": "22" * 32, "max_records": max_records},
        "vips": vips,
    }


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MuxProcess:
    """One `lbagent run` inside a mux namespace of the lab."""

    def __init__(self, lab: Lab, mux: Node, *, transitions: bool = True, learn: bool = False,
                 bgp: bool = True, max_records: int = 100000) -> None:
        self.max_records = max_records
        self.lab = lab
        self.mux = mux
        self.dir = Path(lab.run_dir) / mux.name
        self.dir.mkdir(exist_ok=True)
        self.config = self.dir / "state.json"
        self.transitions = transitions
        self.learn = learn
        self.bgp = BgpSettings(lab.router.address, mux.address, MUX_AS, ROUTER_AS) if bgp else None
        self.proc = None
        self.key = f"daemon-{mux.name}"
        self.extra_args: list[str] = []  # more `lbagent run` options (baselines)

    def write_state(self, vips: list[dict], generation: int, members: list[Node] | None = None) -> None:
        doc = state_doc(self.lab, self.mux.name, vips, generation=generation, max_records=self.max_records,
                        members=members)
        write_atomically(self.config, json.dumps(doc))

    def start(self) -> None:
        argv = [sys.executable, "-m", "lbagent.daemon", "--config", str(self.config),
                "--metrics", f"127.0.0.1:{METRICS_PORT}", "--run-dir", str(self.dir)]
        if self.bgp is not None:
            argv += ["--bgp-neighbor", self.bgp.neighbor, "--bgp-local-address", self.bgp.local_address,
                     "--bgp-local-as", str(self.bgp.local_as), "--bgp-peer-as", str(self.bgp.peer_as)]
        if not self.transitions:
            argv.append("--no-transitions")
        if self.learn:
            argv.append("--learn")
        argv += self.extra_args
        self.proc = self.lab.spawn(self.key, self.mux.netns, argv, log_name=f"daemon-{self.mux.name}.log")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.lab.forget_pid(self.key)

    def kill9_with_bgp(self) -> None:
        """SIGKILL the daemon and then its ExaBGP (found by its PID file, checked by its command
        line): the BGP session drops at once and the router moves the mux's flows elsewhere. The
        mux's kernel tables stay, as after a crash."""
        self.kill9()
        pid_file = self.dir / "bgp" / "exabgp.pid"
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(self.dir / "bgp").encode() not in cmdline:
            raise RuntimeError(f"PID {pid} from {pid_file} is not this mux's ExaBGP: {cmdline[:200]!r}")
        os.kill(pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise RuntimeError(f"{self.mux.name} daemon did not stop within {timeout_s} s; "
                               f"log: {self.log_tail()}") from None
        finally:
            if self.proc.poll() is not None:
                self.lab.forget_pid(self.key)
                self.proc = None
        return code

    def metrics(self) -> dict:
        return parse(http_get(self.mux.netns, "127.0.0.1", METRICS_PORT, "/metrics"))

    def records(self) -> list[list]:
        """The daemon's flow records: [listener, [saddr, daddr, proto, sport, dport], bucket,
        backend, replica] each."""
        return json.loads(http_get(self.mux.netns, "127.0.0.1", METRICS_PORT, "/records", timeout_s=10))

    def metric(self, name: str, **labels: str) -> float:
        want = frozenset(labels.items())
        total = 0.0
        for (n, ls), value in self.metrics().items():
            if n == name and want <= ls:
                total += value
        return total

    def wait_applied(self, generation: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.mux.name} daemon exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.metric("lbagent_config_generation") >= generation:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.mux.name} did not apply generation {generation} in {timeout_s} s "
                           f"({last}); log: {self.log_tail()}")

    def wait_bgp_up(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric("lbagent_bgp_session_up") < 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mux.name}: BGP session not up within {timeout_s} s; "
                                   f"log: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, chars: int = 1500) -> str:
        path = Path(self.lab.run_dir) / f"daemon-{self.mux.name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def http_get(ns: str, host: str, port: int, path: str, timeout_s: float = 3.0) -> str:
    s = netns.socket_in(ns)
    s.settimeout(timeout_s)
    with contextlib.closing(s):
        s.connect((host, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"GET {path} on {ns}: {head[:100]!r}")
    return body.decode()


def ask(ns: str, vip: str, port: int = SERVICE_TCP_PORT, timeout_s: float = 2.0) -> str:
    """One short TCP connection from namespace `ns`: the name of the backend that answered."""
    return connect_and_ask(ns, vip, port, timeout_s)[2]


def wait_route(lab: Lab, prefix: str, want: list[str], timeout_s: float = 20.0) -> float:
    """Wait until the router's next hops for `prefix` are `want`; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        hops = lab.router_routes(prefix)
        if hops == sorted(want):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"router routes for {prefix}: {hops}, wanted {sorted(want)}")
        time.sleep(0.01)


class LabCluster:
    """The pool's muxes of a lab running `lbagent run` on one shared desired state; tests add and
    remove their VIPs and publish a new generation to every running mux. `pool_size`: the first
    that many of the lab's muxes form the pool (all by default); the others are spares a test may
    add to the pool (`join`) while one is removed from it (`leave`)."""

    def __init__(self, lab: Lab, *, learn: bool = True, max_records: int = 100000,
                 pool_size: int | None = None) -> None:
        self.lab = lab
        self.learn = learn
        self.all_muxes = [MuxProcess(lab, m, learn=learn, max_records=max_records) for m in lab.muxes]
        self.pool_size = len(lab.muxes) if pool_size is None else pool_size
        self.muxes = self.all_muxes[:self.pool_size]  # the pool's members (cluster.muxes)
        self.vips: dict[str, dict] = {}
        self.generation = 0

    @property
    def members(self) -> list[Node]:
        return [m.mux for m in self.muxes]

    def start(self) -> None:
        self.generation += 1
        for m in self.muxes:
            m.write_state(list(self.vips.values()), self.generation, self.members)
            m.start()
        for m in self.muxes:
            m.wait_applied(self.generation, timeout_s=30)
            if m.bgp is not None:
                m.wait_bgp_up()

    def publish(self) -> int:
        """Write the current VIPs as a new generation to every running mux and wait for them."""
        self.generation += 1
        running = [m for m in self.all_muxes if m.alive()]
        for m in running:
            m.write_state(list(self.vips.values()), self.generation, self.members)
        for m in running:
            m.wait_applied(self.generation)
        return self.generation

    def set_vip(self, doc: dict) -> int:
        self.vips[doc["address"]] = doc
        return self.publish()

    def remove_vip(self, address: str) -> int:
        self.vips.pop(address, None)
        return self.publish()

    def restart(self, mux: MuxProcess, *, transitions: bool = True) -> None:
        """(Re)start one mux's daemon with the current state."""
        if mux.alive():
            mux.stop()
        mux.transitions = transitions
        mux.write_state(list(self.vips.values()), self.generation, self.members)
        mux.start()
        mux.wait_applied(self.generation, timeout_s=30)
        if mux.bgp is not None:
            mux.wait_bgp_up()

    def restart_many(self, muxes: list[MuxProcess], *, transitions: bool = True) -> None:
        """`restart` for several muxes at once (stopped, then started together, then waited for):
        a lab of four pays one daemon start-up instead of four in a row."""
        for mux in muxes:
            if mux.alive():
                mux.stop()
        for mux in muxes:
            mux.transitions = transitions
            mux.write_state(list(self.vips.values()), self.generation, self.members)
            mux.start()
        for mux in muxes:
            mux.wait_applied(self.generation, timeout_s=30)
            if mux.bgp is not None:
                mux.wait_bgp_up()

    def join(self, mux: MuxProcess) -> int:
        """Add a spare mux to the pool: every running mux (the new one too, started here) gets
        `cluster.muxes` with it as a new generation; returns it once all applied it."""
        assert mux not in self.muxes
        self.muxes = [*self.muxes, mux]
        self.generation += 1
        for m in self.all_muxes:
            if m.alive() or m is mux:
                m.write_state(list(self.vips.values()), self.generation, self.members)
        mux.start()
        for m in self.all_muxes:
            if m.alive():
                m.wait_applied(self.generation, timeout_s=30)
        return self.generation

    def leave(self, mux: MuxProcess) -> int:
        """Remove a mux from the pool (its daemon keeps running until the test stops it): every
        running mux, the leaving one included, gets `cluster.muxes` without it."""
        self.muxes = [m for m in self.muxes if m is not mux]
        return self.publish()

    def set_pool(self, members: list[MuxProcess]) -> None:
        """Make `members` the pool again (clean-up after join/leave): spares stopped, members
        running with the current state."""
        self.muxes = list(members)
        for m in self.all_muxes:
            if m not in members and m.alive():
                m.stop()
        self.publish()
        for m in members:
            if not m.alive():
                self.restart(m)

    def stop_all(self) -> None:
        errors = []
        for m in self.all_muxes:
            if m.alive():
                try:
                    m.stop()
                except RuntimeError as exc:
                    errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))

    def total(self, name: str, **labels: str) -> float:
        return sum(m.metric(name, **labels) for m in self.all_muxes if m.alive())


def learned_buckets(mux: Node, listener_id: int) -> dict[tuple[str, str, int, int], int]:
    """The bucket the kernel computed for each flow of a listener (daemon run with --learn)."""
    out = netns.run(["nft", "-j", "list", "map", "netdev", "lbagent", f"learn{listener_id}"],
                    netns=mux.netns).stdout
    result: dict[tuple[str, str, int, int], int] = {}
    for item in json.loads(out)["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            s, d, sp, dp = key["concat"]
            result[(s, d, int(sp), int(dp))] = int(value)
    return result


def pins(mux: Node, protocol: str = "tcp", *, ipv6: bool = False) -> dict[tuple[str, str, int, int], str]:
    """The mux's kernel pins of IPv4 (or IPv6) flows: (saddr, daddr, sport, dport) -> backend MAC."""
    name = f"pins6_{protocol}" if ipv6 else f"pins_{protocol}"
    out = netns.run(["nft", "-j", "list", "map", "netdev", "lbagent", name],
                    netns=mux.netns, timeout_s=60).stdout
    result: dict[tuple[str, str, int, int], str] = {}
    for item in json.loads(out)["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            if isinstance(key, dict) and "elem" in key:  # elements with a timeout: {"elem": {"val": ...}}
                key = key["elem"]["val"]
            s, d, sp, dp = key["concat"]
            result[(s, d, int(sp), int(dp))] = value
    return result


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def connect_and_ask(ns: str, vip: str, port: int = SERVICE_TCP_PORT,
                    timeout_s: float = 2.0) -> tuple[str, int, str]:
    """One short TCP connection (IPv4 or IPv6 as the VIP): (client address, client port, name of
    the backend that answered)."""
    s = netns.socket_in(ns, _family(vip))
    s.settimeout(timeout_s)
    with contextlib.closing(s):
        s.connect((vip, port))
        saddr, sport = s.getsockname()[:2]
        s.sendall(b"who\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                raise ConnectionError(f"{vip}:{port} closed without an answer")
            data += chunk
    name, _, rest = data.decode().partition(" ")
    if rest.strip() != "who":
        raise ConnectionError(f"unexpected answer {data!r}")
    return saddr, sport, name


class LongConnections:
    """`count` long-lived TCP connections from one namespace to a VIP that keep exchanging lines
    (a background thread does a round every `interval_s`). A connection is broken when it resets,
    times out, or is answered by another backend than its first one."""

    def __init__(self, ns: str, vip: str, count: int, *, port: int = SERVICE_TCP_PORT,
                 interval_s: float = 0.2, reply_timeout_s: float = 5.0) -> None:
        self.ns, self.vip, self.port = ns, vip, port
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.socks: list[Any] = []
        self.backend: list[str] = []
        self.broken: dict[int, str] = {}  # index -> why
        self.broken_round: dict[int, int] = {}  # index -> exchange round in which it broke
        self.broken_at: dict[int, float] = {}  # index -> time.time() when its break was seen
        self.round_started: list[float] = []  # time.time() at the start of each exchange round
        self.last_ok: dict[int, float] = {}  # index -> time.time() of its last good answer
        self.rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for _ in range(count):
            s = netns.socket_in(ns, _family(vip))
            s.settimeout(reply_timeout_s)
            s.connect((vip, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
            self.backend.append("")
        self.exchange_round()  # learn each connection's backend

    def exchange_round(self) -> None:
        """Send one line on every live connection and check every answer."""
        with self._lock:
            live = [i for i in range(len(self.socks)) if i not in self.broken]
            self.round_started.append(time.time())
            line = f"round-{self.rounds}\n".encode()
            for i in live:
                try:
                    self.socks[i].sendall(line)
                except OSError as exc:
                    self.broken[i] = f"send: {exc}"
            pending = {self.socks[i].fileno(): i for i in live if i not in self.broken}
            buffers: dict[int, bytes] = dict.fromkeys(pending.values(), b"")
            deadline = time.monotonic() + self.reply_timeout_s
            while pending and time.monotonic() < deadline:
                ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
                for fd in ready:
                    i = pending[fd]
                    try:
                        chunk = self.socks[i].recv(4096)
                    except OSError as exc:
                        self.broken[i] = f"recv: {exc}"
                        del pending[fd]
                        continue
                    if not chunk:
                        self.broken[i] = "closed by peer"
                        del pending[fd]
                        continue
                    buffers[i] += chunk
                    if buffers[i].endswith(b"\n"):
                        del pending[fd]
                        name, _, echoed = buffers[i].decode(errors="replace").partition(" ")
                        if echoed != line.decode():
                            self.broken[i] = f"unexpected answer {buffers[i][:60]!r}"
                        elif not self.backend[i]:
                            self.backend[i] = name
                        elif self.backend[i] != name:
                            self.broken[i] = f"answered by {name}, started on {self.backend[i]}"
                        if i not in self.broken:
                            self.last_ok[i] = time.time()
            for i in pending.values():
                self.broken[i] = f"no answer within {self.reply_timeout_s} s"
            for i in self.broken:
                self.broken_round.setdefault(i, self.rounds)
                self.broken_at.setdefault(i, time.time())
            self.rounds += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.exchange_round()

    def start_background(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="long-connections", daemon=True)
        self._thread.start()

    def settle(self, rounds: int = 2) -> None:
        """Wait until `rounds` more full exchange rounds have completed."""
        target = self.rounds + rounds
        deadline = time.monotonic() + rounds * (self.interval_s + self.reply_timeout_s) + 5
        while self.rounds < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"exchange rounds stalled at {self.rounds}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()

    def broken_on(self, backends: set[str]) -> dict[int, str]:
        return {i: why for i, why in self.broken.items() if self.backend[i] in backends}

    def broken_elsewhere(self, backends: set[str]) -> dict[int, str]:
        return {i: why for i, why in self.broken.items() if self.backend[i] not in backends}


class UdpFlows:
    """`count` UDP flows (one connected socket each: a fixed source port) from one namespace to a
    VIP's UDP service, which answers every datagram with its backend's name. `exchange_round`
    sends a datagram on every flow and checks the answer: a flow is broken when another backend
    than its first one answers. A datagram may be lost (UDP): it is sent again, up to `tries`
    times, and a flow that gets no answer at all in a round is counted in `unanswered`."""

    def __init__(self, ns: str, vip: str, count: int, port: int, *, reply_timeout_s: float = 2.0,
                 tries: int = 3) -> None:
        self.vip, self.port = vip, port
        self.reply_timeout_s = reply_timeout_s
        self.tries = tries
        self.socks = []
        for _ in range(count):
            s = netns.socket_in(ns, _family(vip), socket.SOCK_DGRAM)
            s.connect((vip, port))
            s.setblocking(False)
            self.socks.append(s)
        self.backend = [""] * count
        self.broken: dict[int, str] = {}
        self.unanswered: dict[int, int] = {}  # flow -> rounds without any answer
        self.rounds = 0
        self.exchange_round()  # learn each flow's backend

    def source(self, i: int) -> tuple[str, int]:
        return self.socks[i].getsockname()[:2]

    def exchange_round(self) -> None:
        line = f"round-{self.rounds}".encode()
        waiting = {s.fileno(): i for i, s in enumerate(self.socks)}
        for _ in range(self.tries):
            if not waiting:
                break
            for i in waiting.values():
                with contextlib.suppress(OSError):  # an ICMP error from an earlier send: sent again
                    self.socks[i].send(line)
            deadline = time.monotonic() + self.reply_timeout_s
            while waiting and time.monotonic() < deadline:
                ready, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))
                for fd in ready:
                    i = waiting[fd]
                    try:
                        data = self.socks[i].recv(512)
                    except OSError:
                        continue
                    name, _, echoed = data.decode(errors="replace").partition(" ")
                    if echoed != line.decode():
                        continue  # a late answer of an earlier round
                    del waiting[fd]
                    if not self.backend[i]:
                        self.backend[i] = name
                    elif name != self.backend[i] and i not in self.broken:
                        self.broken[i] = f"answered by {name}, started on {self.backend[i]}"
        for i in waiting.values():
            self.unanswered[i] = self.unanswered.get(i, 0) + 1
        self.rounds += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()
