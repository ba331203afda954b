"""`lbagent run`: the mux daemon. Reads the desired state from a file (re-read when it changes),
turns it into kernel tables (lbagent.dataplane.nft, one transaction per change), runs the slow
path for listeners in transition, tells the router through ExaBGP where each VIP goes, and serves
its counters in Prometheus text format. On SIGTERM/SIGINT it withdraws its routes and removes its
tables and rules.

Order is what keeps connections alive: a VIP is announced only after its tables are applied; on
scale-up from bypass the tables (old table = every bucket to the single backend) go in before
the mux announces itself; on shutdown the routes go before the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lbagent.bgp import BgpSettings, BgpSpeaker
from lbagent.core.flowhash import flow_buckets
from lbagent.core.ownership import build_ownership
from lbagent.core.records import RecordStore
from lbagent.core.transition import GenerationTable, ListenerTables, OldTable, build_generation
from lbagent.dataplane.nflog import NflogReader
from lbagent.dataplane.nft import NFLOG_SNAPLEN, NFLOG_SNAPLEN6, ListenerPlan, Nft, NftDataplane, NftError
from lbagent.dataplane.slowpath import (
    INJECT_IFACE,
    INJECT_PEER,
    CoreDecider,
    PeerBridge,
    SlowListener,
    SlowPath,
    ensure_inject_veth,
    install_iptables,
    remove_inject_veth,
    remove_iptables,
)
from lbagent.metrics import Metric, MetricsServer, render
from lbagent.pool import PoolMembership
from lbagent.state import (
    Backend,
    DesiredState,
    Listener,
    StateError,
    StateParser,
    Vip,
    load_state_file,
)
from lbagent.state_files import HistoryFiles, LastGoodFiles

REFUSED_RETRY_S = 10.0  # how often a VIP whose state could not be planned is tried again
# Keep-alive rounds (active pins renew their owners' records) run every third of the shortest
# idle timeout in transition, so a record is renewed at least twice before it could expire;
# bounded so a short test timeout does not spin and a long one still notices a restarted owner.
KEEPALIVE_MIN_S, KEEPALIVE_MAX_S = 1.0, 60.0
# Entering bypass, the route's next hop moves to the backend's host first; the router switches
# some time later (BGP UPDATE, best-path run, FIB write). Until then packets still reach the mux,
# so it keeps forwarding the VIP (every bucket to the single backend) for this long after the
# move was announced, then removes the VIP's kernel state (make before break).
BYPASS_HANDOVER_S = 5.0
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)

log = logging.getLogger("lbagent.daemon")


def backend_name(backend: Backend) -> str:
    """The name a backend has in Maglev tables (and in flow records): `address:port`."""
    return f"{backend.address}:{backend.port}"


def _table_backends(backends: tuple[Backend, ...]) -> tuple[list[str], list[int]]:
    """Names and weights for a generation's table: draining backends keep their name with weight 0
    (no new flows, but pins and records can still point at them); disabled ones are left out."""
    names, weights = [], []
    for b in backends:
        if b.state == "disabled":
            continue
        names.append(backend_name(b))
        weights.append(b.weight if b.state == "active" else 0)
    return names, weights


class _TableCache:
    """Maglev tables cost ~0.3 s each: build each (names, weights, size) once."""

    def __init__(self) -> None:
        self._cache: dict[tuple, GenerationTable | None] = {}

    def get(self, generation: int, backends: tuple[Backend, ...], table_size: int) -> GenerationTable | None:
        names, weights = _table_backends(backends)
        key = (generation, tuple(names), tuple(weights), table_size)
        if key not in self._cache:
            if not names or max(weights, default=0) == 0:
                self._cache[key] = None  # nothing can take new flows
            else:
                self._cache[key] = build_generation(generation, names, weights, table_size)
        return self._cache[key]


class BackendUnreachable(LookupError):
    """A backend's MAC cannot be resolved on the mux's segment (may heal: retried)."""


def resolve_mac(address: str, iface: str, timeout_s: float = 1.0) -> str:
    """The MAC of a neighbour on `iface`, from the neighbour table (probing it when unknown)."""
    deadline = time.monotonic() + timeout_s
    probed = False
    while True:
        out = subprocess.run(["ip", "-j", "neigh", "show", "to", address, "dev", iface],
                             capture_output=True, text=True, check=False).stdout
        for entry in json.loads(out or "[]"):
            mac = entry.get("lladdr")
            if mac and "FAILED" not in entry.get("state", []) and "INCOMPLETE" not in entry.get("state", []):
                return mac
        if time.monotonic() > deadline:
            raise BackendUnreachable(f"no MAC for backend {address} on {iface} within {timeout_s} s (is it "
                                     f"on the mux's L2 segment?)")
        if not probed:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                s.sendto(b"", (address, 9))  # makes the kernel ARP for it (IPv6: neighbour discovery)
            probed = True
        time.sleep(0.02)


def interface_of(address: str) -> tuple[str, str]:
    """(interface, MAC) holding `address` in this namespace."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            if a.get("local") == address:
                return link["ifname"], link["address"]
    raise LookupError(f"no interface here holds {address} (the cluster's address for this mux)")


@dataclass
class _VipPlan:
    """One VIP's plan as an apply made it: reused as long as nothing it was made from changed
    (the same Vip object, the same cluster, no drain deadline reached, no lingering table ended),
    so a change costs what changed, not the number of VIPs on the mux."""

    vip: Vip
    planned: tuple[list[ListenerPlan], list[SlowListener], str | None, dict[int, ListenerTables]]
    valid_until: float  # the earliest drain deadline of its tables (inf: none)
    running: dict[int, int]  # listener id -> the generation this plan puts in the kernel
    listener_ids: tuple[int, ...]  # of its kernel plans
    keys: tuple[tuple[str, str, int], ...]  # their dispatch keys (VIP, protocol, port)


@dataclass
class DaemonOptions:
    config: Path
    iface: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9109
    run_dir: Path = Path("/run/lbagent")
    queue_num: int = 7
    nflog_group: int = 7
    bgp: BgpSettings | None = None
    transitions: bool = True  # False: ignore previous generations (baseline for tests/benchmarks)
    learn: bool = False
    poll_s: float = 0.1
    pool_handover: bool = True  # False: no SYNC, no hand-over (baseline for tests)
    # How long start() waits for a first desired state (a valid config file, or one submitted by
    # the portal client, whose connection and first document can take longer on a busy host).
    first_state_timeout_s: float = 10.0


class MuxDaemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.o = options
        self.state: DesiredState | None = None
        self.tables: dict[int, ListenerTables] = {}
        self.bypass_backend: dict[int, tuple[Backend, float]] = {}  # listener -> (backend, since)
        self.macs: dict[str, str] = {}
        self._cache = _TableCache()
        self._config_sig: tuple | None = None
        self._applied_sig: tuple | None = None
        # stop() runs in the SIGTERM handler, on the main thread, possibly while that thread is
        # inside the loop's wait. A threading.Event would deadlock there (set() needs the lock
        # wait() holds); a flag plus a byte down a pipe takes no lock.
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Closed by shutdown(), or when the object goes away without one (tests build many).
        self._close_wake_fds = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self.dataplane: NftDataplane | None = None
        self.slowpath: SlowPath | None = None
        self.nflog: NflogReader | None = None
        self.peers: PeerBridge | None = None
        self.pool: PoolMembership | None = None  # who is in the pool; hand-over when that changes
        self._route_mode_applied = "announce"  # the pool's route mode the last apply() used
        self.bgp: BgpSpeaker | None = None
        self.store: RecordStore | None = None
        self.applied_generation = 0
        self.apply_count = 0
        self.apply_errors = 0
        self.config_errors = 0
        self.last_apply_s = 0.0
        self.iface = options.iface
        self.mux_mac = ""
        self._slow_keys: set[tuple[str, str, int]] = set()
        self._last_good: dict[str, Vip] = {}  # VIP address -> the last state of it in the kernel
        self._state_write_error: str | None = None  # why the state files could not be written
        self.state_write_errors = 0
        # listener id -> every backend its live tables name (current and old): a listener changed
        # again during its drain keeps an old table whose backends neither the new generation nor
        # its `previous` lists, and their addresses and MACs are still needed.
        self._backends_in_tables: dict[int, dict[str, Backend]] = {}
        self._refused: dict[str, str] = {}  # VIP address -> why its desired state is not applied
        self.running_generations: dict[int, int] = {}  # listener id -> generation in the kernel (0: none)
        self.listener_errors: dict[int, str] = {}  # listener id -> why it is not at its generation
        self._retry_refused = False  # a refused VIP may heal on a retry (unresolved MAC)
        self._planned: tuple = ({}, {}, {}, {}, False)  # the five above, from _plan
        self._mac_failures: dict[str, tuple[float, str]] = {}  # address -> (retry after, reason)
        self._state_sig: tuple | None = None  # file signature of the last *valid* config
        self._applied_state_sig: tuple | None = None
        self._slow: list[SlowListener] = []  # listeners in transition (draining or lingering)
        self._next_keepalive = 0.0
        self._keepalive_interval = KEEPALIVE_MAX_S
        self._linger_quiet_since: dict[int, float] = {}  # listener -> since when no moved flow is left
        self._linger_epoch = 0  # bumped when a lingering table ends (forces a re-apply)
        self._no_previous_seen: set[tuple[int, int]] = set()
        self._bypass_waiting: set[str] = set()  # bypass VIPs kept on the muxes until their drain ends
        # bypass VIP -> until when this mux keeps forwarding it after announcing the host as next hop
        self._bypass_handover: dict[str, float] = {}
        self._kernel_vips: set[str] = set()  # VIPs with listeners in the kernel (set after an apply)
        self._planned_vips: set[str] = set()
        self._kernel_listener_ids: set[int] = set()  # listeners in the kernel (after an apply)
        self._plan_hints: tuple[list[ListenerPlan], set[int], set[tuple[str, str, int]]] = ([], set(), set())
        self.keepalive_rounds = 0
        self.lingers_ended = 0
        self._applied_tables: dict[int, ListenerTables] = {}  # what the kernel holds (set after the apply)
        self._renew_wanted = threading.Event()
        # Incremental applies. The parser reuses the Vip objects of unchanged VIPs, and each VIP's
        # plan is kept while its Vip object is the same (`_VipPlan`): the driver then gets the very
        # ListenerPlan objects it applied before and skips them without a look.
        self._parser = StateParser()
        self._vip_plans: dict[str, _VipPlan] = {}
        self._plan_cluster: object | None = None  # the cluster the cached plans were made for
        self.vips_planned = 0  # VIPs planned afresh (counter; the others reused their last plan)
        # A state handed over in memory (portal mode: `submit`), taken by the main loop.
        self._submitted: DesiredState | None = None
        self._submitted_lock = threading.Lock()
        self._watch_config = True  # False once states come from `submit` (portal mode)
        # Kept across restarts, one file per VIP / listener (lbagent.state_files).
        self._last_good_files = LastGoodFiles(options.run_dir)
        self._history_files = HistoryFiles(options.run_dir)

    # -- config -------------------------------------------------------------------------------
    def _read_config(self) -> bool:
        """Load the config file if it changed; True when a new valid state was loaded."""
        try:
            st = self.o.config.stat()
        except FileNotFoundError:
            return False
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._config_sig:
            return False
        self._config_sig = sig
        try:
            # Through the daemon's parser: an unchanged VIP keeps its Vip object (and its plan).
            state = self._parser.parse(self.o.config.read_bytes())
        except (StateError, OSError, ValueError) as exc:
            self.config_errors += 1
            log.error("config %s refused, keeping the applied one: %s", self.o.config, exc)
            return False
        self.state = state
        self._state_sig = sig
        return True

    def submit(self, state: DesiredState) -> None:
        """Hand the daemon a new desired state in memory (portal mode; any thread): the main loop
        applies it at once, with no file to write, read and parse again on the way. From then on
        the config file is the portal client's copy of the state (read at the next start: fail
        static), no longer watched."""
        with self._submitted_lock:
            self._submitted = state
        self.wake()

    def wake(self) -> None:
        """Wake the main loop now (otherwise it looks every `poll_s`)."""
        if self._close_wake_fds.alive:
            with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
                os.write(self._wake_w, b"\0")

    def _take_submitted(self) -> bool:
        """Take the state `submit` handed over, if any (main loop)."""
        with self._submitted_lock:
            state, self._submitted = self._submitted, None
        if state is None:
            return False
        self.state = state
        self._state_sig = ("submitted", state.generation, id(state))  # each one is new
        self._watch_config = False
        return True

    def _new_state(self) -> bool:
        """A new desired state (submitted, or a changed config file): True when one was loaded."""
        if self._take_submitted():
            return True
        return self._watch_config and self._read_config()

    # -- planning -------------------------------------------------------------------------------
    def _listener_tables(self, vip: Vip, listener: Listener, now: float) -> ListenerTables | None:
        size = listener.table_size_in(self.state.cluster)  # type: ignore[union-attr]
        current = self._cache.get(listener.generation, listener.backends, size)
        if current is None:
            return None
        held = self.tables.get(listener.id)
        if not self.o.transitions:
            tables = ListenerTables(current=current)
        elif held is not None and held.generation == listener.generation:
            tables = held
        elif (held is not None and listener.previous is not None and held.generation < listener.generation
              and held.current.table_size == current.table_size):
            # In transition from what this mux runs. When that is not the portal's previous
            # generation (this mux refused or missed it), flows may sit on either: keep both.
            deadline = listener.previous.drain_deadline
            tables = held.with_generation(current, drain_deadline=deadline)
            if held.generation != listener.previous.generation:
                prev = self._cache.get(listener.previous.generation, listener.previous.backends, size)
                if prev is not None and prev.generation > held.generation:
                    tables = ListenerTables(current=current, old=(OldTable(prev, deadline), *tables.old))
        elif held is not None and held.generation < listener.generation and held.current.table_size == size:
            # A change without `previous` (an operator's hand-written document, a portal that lost
            # it): this mux still knows what it runs, so it drains from that, for the listener's
            # drain timeout. Never a silent cut-over.
            deadline = now + listener.drain_timeout_s
            tables = held.with_generation(current, drain_deadline=deadline)
            if (listener.id, listener.generation) not in self._no_previous_seen:
                self._no_previous_seen.add((listener.id, listener.generation))
                log.warning("listener %d: generation %d has no `previous`: draining from the running "
                            "generation %d for %d s", listener.id, listener.generation, held.generation,
                            listener.drain_timeout_s)
        elif listener.previous is not None:
            prev = self._cache.get(listener.previous.generation, listener.previous.backends, size)
            old = (OldTable(prev, listener.previous.drain_deadline),) if prev is not None else ()
            tables = ListenerTables(current=current, old=old)
        elif listener.id in self.bypass_backend:
            # Leaving bypass without a previous generation from the portal: connections opened
            # while the router sent the VIP straight to the host must stay there (make before break).
            backend, _since = self.bypass_backend[listener.id]
            single = build_generation(max(0, listener.generation - 1), [backend_name(backend)], None, size)
            tables = ListenerTables(current=current, old=(OldTable(single, now + listener.drain_timeout_s),))
        else:
            tables = ListenerTables(current=current)
        return tables.after_deadlines(now)

    def _mac_of(self, backend: Backend) -> str:
        if backend.mac:
            return backend.mac
        if backend.address not in self.macs:
            # A failed lookup blocks for its timeout: remember it until the next retry, so each
            # unresolvable backend costs one timeout per REFUSED_RETRY_S, not one per apply.
            failed = self._mac_failures.get(backend.address)
            if failed is not None and time.monotonic() < failed[0]:
                raise BackendUnreachable(failed[1])
            try:
                self.macs[backend.address] = resolve_mac(backend.address, self.iface or "eth0")
            except BackendUnreachable as exc:
                self._mac_failures[backend.address] = (time.monotonic() + REFUSED_RETRY_S - 1, str(exc))
                raise
            self._mac_failures.pop(backend.address, None)
        return self.macs[backend.address]

    def _plan(self, now: float) -> tuple[list[ListenerPlan], list[SlowListener], dict[str, str | None]]:
        """Kernel plans, slow-path listeners and routes (vip -> next hop, None = this mux).

        Each VIP is planned on its own: one that cannot be (a backend whose MAC does not resolve,
        a bypass without a single host) keeps running its last good state, or is not served if
        it never had one, and is listed in `refused`. One tenant's bad backend must not take
        every other VIP off this mux."""
        assert self.state is not None
        plans: list[ListenerPlan] = []
        slow: list[SlowListener] = []
        routes: dict[str, str | None] = {}
        new_tables: dict[int, ListenerTables] = {}
        running: dict[int, int] = {}
        refused: dict[str, str] = {}
        retryable = False  # a refusal that may heal by itself (an ARP miss), not one the config causes
        listener_errors: dict[int, str] = {}
        last_good: dict[str, Vip] = {}
        if self.state.cluster != self._plan_cluster:  # table sizes may follow the cluster's
            self._vip_plans = {}
            self._plan_cluster = self.state.cluster
        cached_plans = self._vip_plans
        planned_vips: set[str] = set()  # VIPs with listeners in this plan
        vip_plans: dict[str, _VipPlan] = {}
        # For the driver: the plans that are new objects (planned now), every listener in the
        # plans and their dispatch keys, gathered per VIP (no walk over every listener).
        changed: list[ListenerPlan] = []
        listener_ids: set[int] = set()
        keys: set[tuple[str, str, int]] = set()
        for vip in self.state.vips:
            cached = cached_plans.get(vip.address)
            if cached is not None and cached.vip is vip and now < cached.valid_until:
                # Nothing this VIP's plan was made from changed: the very same plans, tables and
                # slow-path listeners (the driver skips same-object plans without a look).
                vip_plans[vip.address] = cached
                vip_plans_, vip_slow, hop, vip_tables = cached.planned
                if vip_plans_:
                    plans += vip_plans_
                    planned_vips.add(vip.address)
                if vip_slow:
                    slow += vip_slow
                routes[vip.address] = hop
                new_tables.update(vip_tables)
                running.update(cached.running)
                listener_ids.update(cached.listener_ids)
                keys.update(cached.keys)
                last_good[vip.address] = vip
                continue
            self.vips_planned += 1
            served: Vip | None = vip
            planned = None
            try:
                planned = self._plan_vip(vip, now)
            except (BackendUnreachable, ValueError) as exc:
                reason = str(exc)
                retryable = retryable or isinstance(exc, BackendUnreachable)
                served = self._last_good.get(vip.address)
                if served is not None:
                    try:
                        planned = self._plan_vip(served, now)
                    except (BackendUnreachable, ValueError):
                        served = None
            if planned is None or served is not vip:
                refused[vip.address] = reason
                if self._refused.get(vip.address) != reason:
                    log.error("VIP %s: cannot apply its desired state (%s); %s", vip.address, reason,
                              "still serving its last applied state" if served is not None
                              else "not served by this mux")
                for listener in vip.listeners:
                    listener_errors[listener.id] = f"VIP {vip.address}: {reason}"
                    running[listener.id] = 0  # until `served` says otherwise: not in this kernel
            if planned is None or served is None:
                continue
            vip_plans_, vip_slow, hop, vip_tables = planned
            plans += vip_plans_
            changed += vip_plans_
            planned_vips.update(p.vip for p in vip_plans_)
            vip_ids = tuple(p.listener_id for p in vip_plans_)
            vip_keys = tuple(p.dispatch_key for p in vip_plans_)
            listener_ids.update(vip_ids)
            keys.update(vip_keys)
            slow += vip_slow
            routes[vip.address] = hop
            new_tables.update(vip_tables)
            running.update({listener.id: listener.generation for listener in served.listeners})
            last_good[vip.address] = served
            if served is vip and not vip.bypass:
                # Bypass VIPs (hand-over timers, drains before the route moves) and refused ones
                # (retried) are planned at every apply; a served VIP's plan holds until its next
                # drain deadline (its tables change phase then).
                deadlines = [d for t in vip_tables.values() if (d := t.next_deadline()) is not None]
                vip_plans[vip.address] = _VipPlan(vip, planned, min(deadlines, default=math.inf),
                                                  {ln.id: ln.generation for ln in vip.listeners},
                                                  vip_ids, vip_keys)
        self._vip_plans = vip_plans
        for address in set(self._bypass_handover) - {v.address for v in self.state.vips if v.bypass}:
            del self._bypass_handover[address]  # left bypass (or gone): no hand-over to finish
        self.tables = new_tables
        self._planned_vips = planned_vips
        self._plan_hints = (changed, listener_ids, keys)
        self._planned = (last_good, refused, running, listener_errors, retryable)  # once the kernel has it
        return plans, slow, routes

    def _plan_vip(
        self, vip: Vip, now: float
    ) -> tuple[list[ListenerPlan], list[SlowListener], str | None, dict[int, ListenerTables]]:
        """One VIP's kernel plans, slow-path listeners, route and tables; raises BackendUnreachable
        or ValueError when it cannot be served as described."""
        assert self.state is not None
        plans: list[ListenerPlan] = []
        slow: list[SlowListener] = []
        tables_of: dict[int, ListenerTables] = {}
        draining = [ln.id for ln in vip.listeners if vip.bypass and self._draining(vip, ln, now)]
        if draining:
            # Make before break on the way into bypass too: while removed backends still drain,
            # their connections need the muxes; the route moves to the host after the last deadline.
            if vip.address not in self._bypass_waiting:
                self._bypass_waiting.add(vip.address)
                log.info("VIP %s: bypass waits until listener(s) %s finish draining", vip.address, draining)
        elif vip.address in self._bypass_waiting:
            self._bypass_waiting.discard(vip.address)
            log.info("VIP %s: drain over, entering bypass", vip.address)
        if vip.bypass and not draining:
            hop = vip.bypass_next_hop or self._single_backend_host(vip)
            handover_until = self._bypass_handover.get(vip.address)
            if handover_until is None and vip.address in self._kernel_vips:
                # This mux forwards the VIP now: announce the host as next hop while the kernel
                # keeps forwarding, and remove the VIP's state only once the router has switched.
                # (A mux that starts while the VIP is in bypass never had it: nothing to hand over.)
                handover_until = self._bypass_handover[vip.address] = now + BYPASS_HANDOVER_S
                log.info("VIP %s: entering bypass, next hop %s; forwarding it for %.0f s more",
                         vip.address, hop, BYPASS_HANDOVER_S)
            if handover_until is not None and now < handover_until:
                plans, slow, _, tables_of = self._plan_listeners(vip, now)
            elif handover_until is not None and vip.address in self._kernel_vips:
                log.info("VIP %s: bypass hand-over over, removing its kernel state", vip.address)
            for listener in vip.listeners:
                active = [b for b in listener.backends if b.state == "active"]
                if active:
                    self.bypass_backend[listener.id] = (active[0], now)
            return plans, slow, hop, tables_of
        return self._plan_listeners(vip, now)

    def _plan_listeners(
        self, vip: Vip, now: float
    ) -> tuple[list[ListenerPlan], list[SlowListener], str | None, dict[int, ListenerTables]]:
        """The kernel plans of a VIP served by this mux (this mux is its next hop)."""
        assert self.state is not None
        plans: list[ListenerPlan] = []
        slow: list[SlowListener] = []
        tables_of: dict[int, ListenerTables] = {}
        for listener in vip.listeners:
            tables = self._listener_tables(vip, listener, now)
            by_name = {backend_name(b): b for b in listener.backends}
            if listener.previous is not None:
                for b in listener.previous.backends:
                    by_name.setdefault(backend_name(b), b)
            if listener.id in self.bypass_backend:
                b = self.bypass_backend[listener.id][0]
                by_name.setdefault(backend_name(b), b)
            # a change without `previous` drains from the running table: its backends are those of
            # the last state of this VIP the kernel got
            last = self._last_good.get(vip.address)
            for ran in last.listeners if last is not None else ():
                if ran.id == listener.id:
                    for b in ran.backends:
                        by_name.setdefault(backend_name(b), b)
            if tables is None:
                plans.append(ListenerPlan(listener.id, vip.address, listener.protocol, listener.port, (),
                                          np.full(listener.table_size_in(self.state.cluster), -1,
                                                  dtype=np.int32)))
                continue
            known = self._backends_in_tables.get(listener.id, {})
            for n in tables.names:
                if n not in by_name and n in known:
                    by_name[n] = known[n]
            self._backends_in_tables[listener.id] = {n: by_name[n] for n in tables.names}
            backends = tuple((by_name[n].address, self._mac_of(by_name[n])) for n in tables.names)
            tables_of[listener.id] = tables
            unstable = tables.unstable_buckets() if tables.in_transition else None
            alive = tables.alive_backends()
            plans.append(ListenerPlan(
                listener.id, vip.address, listener.protocol, listener.port, backends,
                np.asarray(tables.current_ids), np.asarray(tables.fallback_ids) if unstable is not None
                else None, unstable, pin_timeout_s=listener.idle_timeout_s,
                pin_macs=tuple(self._mac_of(by_name[n]) for n in tables.names if n in alive)))
            if tables.in_transition:
                slow.append(SlowListener(
                    listener.id, vip.address, listener.protocol, listener.port, tables,
                    {n: self._mac_of(by_name[n]) for n in tables.names},
                    tables.next_deadline() or float("inf"), float(listener.idle_timeout_s)))
        for lid, tables in tables_of.items():
            if not tables.in_transition:
                self.bypass_backend.pop(lid, None)
        return plans, slow, None, tables_of

    def _draining(self, vip: Vip, listener: Listener, now: float) -> bool:
        """True while some old table of the listener has its drain deadline ahead."""
        if not self.o.transitions:
            return False
        tables = self._listener_tables(vip, listener, now)
        return tables is not None and tables.draining

    @staticmethod
    def _single_backend_host(vip: Vip) -> str:
        hosts = {b.address for ln in vip.listeners for b in ln.backends if b.state == "active"}
        if len(hosts) != 1:
            raise ValueError(f"VIP {vip.address} is in bypass without bypass_next_hop and has "
                             f"{len(hosts)} active backend hosts (need exactly 1)")
        return hosts.pop()

    def _signature(self, now: float) -> tuple:
        """Changes when what the kernel should hold changes: the config, an old table expiring, or
        (while a VIP is refused) every REFUSED_RETRY_S, to try that VIP again (an ARP miss heals)."""
        draining = tuple(sorted((lid, sum(1 for o in t.old if not o.lingering and o.drain_deadline > now))
                                for lid, t in self.tables.items()))
        retry = int(now // REFUSED_RETRY_S) if self._retry_refused else None
        # a bypass hand-over ending removes that VIP's kernel state
        handover = tuple(sorted(vip for vip, until in self._bypass_handover.items() if until > now))
        # the last *valid* config: a refused file changes nothing, so it must not trigger an apply
        return (self._state_sig, draining, retry, self._linger_epoch, handover)

    # -- applying ---------------------------------------------------------------------------------
    def apply(self) -> None:
        now = time.time()
        started = time.monotonic()
        planned_before = self.vips_planned
        plans, slow, routes = self._plan(now)
        assert self.dataplane is not None
        assert self.state is not None
        t0 = time.monotonic()
        changed, listener_ids, keys = self._plan_hints
        # One transaction (bounded batches for a whole-document load); the hints spare the driver
        # a look at each of thousands of unchanged plans.
        self.dataplane.apply(plans, changed=changed, removed=self._kernel_listener_ids - listener_ids)
        self._kernel_listener_ids = listener_ids
        self._kernel_vips = self._planned_vips
        if self.slowpath is not None:
            if keys != self._slow_keys:
                install_iptables(sorted(keys), self.o.queue_num)
                self._slow_keys = keys
            self.slowpath.update(slow)
        self._slow = slow
        self._keepalive_interval = min((max(KEEPALIVE_MIN_S, min(KEEPALIVE_MAX_S, ln.idle_timeout_s / 3))
                                        for ln in slow), default=KEEPALIVE_MAX_S)
        self._next_keepalive = min(self._next_keepalive, time.time() + self._keepalive_interval)
        self.last_apply_s = time.monotonic() - t0
        route_mode = self.pool.route_mode() if self.pool is not None else "announce"
        self._route_mode_applied = route_mode
        if route_mode == "withdraw":
            routes = {}  # this mux left the pool
        if self.bgp is not None and route_mode != "hold":
            # Tables first, then routes: announce (or move the next hop) only now.
            for vip, hop in routes.items():
                self.bgp.announce(vip, hop)
            for prefix in list(self.bgp.announced):
                if prefix.split("/")[0] not in routes:
                    self.bgp.withdraw(prefix)
        # the phase shown is what the kernel now holds, not what was planned before the transaction
        self._applied_tables = dict(self.tables)
        (self._last_good, self._refused, self.running_generations, self.listener_errors,
         self._retry_refused) = self._planned
        self._save_state_files()
        self.applied_generation = self.state.generation
        self.apply_count += 1
        what = "applied generation" if self._state_sig != self._applied_state_sig else "re-applied generation"
        self._applied_state_sig = self._state_sig
        log.info("%s %d: %d listeners (%d in transition, %d lingering) in %.3f s (%d VIP(s) planned, %d "
                 "listener(s) written; %.3f s in all with planning and saving)%s", what,
                 self.state.generation, len(plans), sum(1 for ln in slow if ln.tables.draining),
                 sum(1 for ln in slow if not ln.tables.draining), self.last_apply_s,
                 self.vips_planned - planned_before, self.dataplane.last_changed_listeners,
                 time.monotonic() - started,
                 f"; {len(self._refused)} VIP(s) not at their desired state" if self._refused else "")

    # -- what survives a restart: each VIP's last good state, the live tables in transition --------
    def _save_state_files(self) -> None:
        """Persist what each VIP runs in the kernel now and every live table of each listener
        (per-object files: lbagent.state_files), so a restart keeps serving a VIP whose document
        is then refused, and keeps the flows of every live old table. A write that fails (full
        disk) is logged once and counted; the daemon keeps serving."""
        try:
            self._history_files.save(self.tables)
            self._last_good_files.save(self._last_good)
        except OSError as exc:
            self.state_write_errors += 1
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
            if reason != self._state_write_error:
                log.error("cannot write the state kept for a restart under %s (%s): serving on; after a "
                          "restart, a VIP whose desired state is refused would fall back to an older last "
                          "good state, and flows of old tables could be reset", self.o.run_dir, reason)
            self._state_write_error = reason
            return
        if self._state_write_error is not None:
            log.info("the state kept for a restart is written again under %s", self.o.run_dir)
        self._state_write_error = None

    def _load_state_files(self, now: float) -> None:
        if self.o.transitions:
            self.tables = self._history_files.load(now)
        self._last_good = self._last_good_files.load()
        if self._last_good:
            log.info("last good state of %d VIP(s) loaded from %s (kept for a VIP whose desired state is "
                     "refused)", len(self._last_good), self._last_good_files.directory)

    # -- flow state that lives as long as its flow ------------------------------------------------
    def keepalive_round(self, now: float) -> None:
        """Start a renewal of the records (on the keep-alive thread: reading a large pin map takes
        seconds, and the main loop must stay free to apply a drain deadline on time) and end
        lingering tables no flow needs any more."""
        self._next_keepalive = now + self._keepalive_interval
        if self.slowpath is None or self.dataplane is None or not self._slow:
            return
        self._renew_wanted.set()
        self.end_idle_lingers(now)

    def _renewal_loop(self) -> None:
        nft = Nft()  # its own libnftables context: the main loop's may be in a transaction
        while not self._stopping:
            if not self._renew_wanted.wait(0.5):
                continue
            self._renew_wanted.clear()
            try:
                self.renew_records(self._slow, self._keepalive_interval, time.time(), nft)
            except (NftError, ValueError, OSError) as exc:
                if not self._stopping:
                    log.error("keep-alive round failed: %s", exc)

    def renew_records(self, slow: list[SlowListener], interval_s: float, now: float,
                      nft: Nft | None = None) -> None:
        """Renew, here and at both owners, the records of every flow this mux's kernel forwarded
        by a pin since the last round; then expire idle records."""
        if self.slowpath is None or self.dataplane is None or not slow:
            return
        per_listener: dict[int, tuple[SlowListener, list[tuple[int, int, int, int, int]], list[str]]] = {}
        by_mac: dict[int, dict[str, str]] = {}
        protos = {ln.protocol for ln in slow}
        for proto in sorted(protos):
            number = 6 if proto == "tcp" else 17
            try:
                pins = self.dataplane.pins_with_idle(proto, nft=nft)
            except NftError as exc:
                log.error("keep-alive: cannot read the %s pins: %s", proto, exc)
                continue
            for saddr, daddr, sport, dport, mac, idle_s in pins:
                if idle_s > interval_s + 1:
                    continue  # no packet since the last round: its records age like it
                listener = self.slowpath.listener_of(daddr, number, dport)
                if listener is None:
                    continue
                names = by_mac.get(listener.listener_id)
                if names is None:
                    alive = listener.tables.alive_backends()
                    names = {m: n for n, m in listener.macs.items() if n in alive}
                    by_mac[listener.listener_id] = names
                backend = names.get(mac)
                if backend is None:
                    continue  # a pin to an ended backend: its flow is over
                entry = per_listener.setdefault(listener.listener_id, (listener, [], []))
                entry[1].append((saddr, daddr, number, sport, dport))
                entry[2].append(backend)
        batches = []
        assert self.state is not None
        for listener, flows, backends in per_listener.values():
            arr = np.asarray(flows, dtype=np.int64)
            cluster = self.state.cluster
            buckets = flow_buckets(arr[:, 0], arr[:, 1], int(arr[0, 2]), arr[:, 3], arr[:, 4],
                                   seed=cluster.hash_seed, table_size=listener.tables.current.table_size)
            batches.append((listener, np.column_stack([arr, np.asarray(buckets, dtype=np.int64)]), backends))
        for proto in sorted({ln.protocol for ln in slow if ":" in ln.vip}):  # IPv6: by fingerprint
            try:
                pins6 = self.dataplane.pins6_with_idle(proto, nft=nft)
            except NftError as exc:
                log.error("keep-alive: cannot read the IPv6 %s pins: %s", proto, exc)
                continue
            batches += self.slowpath.ipv6_keepalive_batches(pins6, interval_s, self.state.cluster.hash_seed)
        self.slowpath.keep_alive(batches)
        self.slowpath.expire_records(now)
        self.keepalive_rounds += 1

    def end_idle_lingers(self, now: float) -> None:
        """Drop a lingering table once no record of the listener has been on a moved bucket for
        the listener's idle timeout (main loop: it changes the tables the next apply uses)."""
        assert self.slowpath is not None
        assert self.state is not None
        for lid, tables in list(self.tables.items()):
            listener = next((ln for ln in self._slow if ln.listener_id == lid), None)
            if not tables.lingering or listener is None:
                self._linger_quiet_since.pop(lid, None)
                continue
            if self.slowpath.moved_records(lid):
                self._linger_quiet_since.pop(lid, None)
                # keeps every other mux's lingering table as long as ours (see beacon_moved)
                self.slowpath.beacon_moved(lid, [m.name for m in self.state.cluster.muxes])
                continue
            since = self._linger_quiet_since.setdefault(lid, now)
            if now - since >= listener.idle_timeout_s:
                self.tables[lid] = tables.without_lingering()
                self._vip_plans.pop(listener.vip, None)  # planned again from its new tables
                self._linger_quiet_since.pop(lid, None)
                self._linger_epoch += 1
                self.lingers_ended += 1
                log.info("listener %d: no flow on a moved bucket for %.0f s (its idle timeout): old tables "
                         "dropped%s", lid, now - since,
                         "" if self.tables[lid].in_transition else ", stateless again")

    def withdraw_all(self) -> None:
        if self.bgp is not None:
            for prefix in list(self.bgp.announced):
                self.bgp.withdraw(prefix)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        # During a transition the record store gains tens of thousands of small objects a second
        # (a record, its key tuples). CPython's default thresholds run a young collection every
        # 700 allocations and keep re-scanning the survivors: replaying 200,000 reports through
        # on_new_flows on the project VM cost 4.5 us per flow with the collector on, 2.1 with it
        # off, 2.8-3.7 with a 10,000-allocation threshold. Records hold no
        # reference cycles (reference counting frees them), so collect less often; and see
        # the end of start() for the start-up objects.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        self.o.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.o.first_state_timeout_s
        while not self._new_state():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no valid config in {self.o.config} (nor a state from the portal) "
                                   f"within {self.o.first_state_timeout_s:g} s")
            time.sleep(0.1)
        assert self.state is not None
        cluster = self.state.cluster
        me = next((m for m in cluster.muxes if m.name == self.state.node), None)
        if self.iface is None:
            if me is None:
                raise ValueError(f"node {self.state.node!r} is not among cluster.muxes and no --iface "
                                 "was given")
            self.iface, self.mux_mac = interface_of(me.address)
        else:
            self.mux_mac = Path(f"/sys/class/net/{self.iface}/address").read_text().strip()
        ensure_inject_veth()
        self.dataplane = NftDataplane(self.iface, self.mux_mac, seed=cluster.hash_seed,
                                      table_size=cluster.table_size, learn=self.o.learn,
                                      inject_iface=INJECT_PEER, nflog_group=self.o.nflog_group)
        self.store = RecordStore(max_records=cluster.max_records)
        ownership = build_ownership([m.name for m in cluster.muxes] or [self.state.node],
                                    owner_seed=cluster.owner_seed, table_size=cluster.table_size)
        self.slowpath = SlowPath(INJECT_IFACE, self.mux_mac, self.o.queue_num,
                                 decider=CoreDecider(self.state.node, self.store, ownership))
        others = {m.name: (m.address, m.peer_port) for m in cluster.muxes if m.name != self.state.node}
        if me is not None and others:
            # Owner queries, records and replicas between muxes (HMAC-authenticated UDP).
            self.peers = PeerBridge(self.state.node, cluster.peer_key, others, (me.address, me.peer_port),
                                    handler=self.slowpath)
            self.peers.start()
            self.slowpath.peers = self.peers
        # Routes wait for the records this mux owns (SYNC with every member) before the first announce.
        self.pool = PoolMembership(self.state.node, self.slowpath, self.peers, handover=self.o.pool_handover)
        self.pool.change(cluster.muxes, ownership, starting=True)
        self.slowpath.start()
        # The kernel pins and forwards SYNs of unstable buckets itself and reports them here
        # (nfnetlink_log): bound before the first apply, so no report of ours goes unread.
        self.nflog = NflogReader(self.o.nflog_group, self.slowpath.on_new_flows, snaplen=NFLOG_SNAPLEN,
                                 copy_range=NFLOG_SNAPLEN6)
        try:
            self.nflog.start()
        except OSError as exc:
            # The kernel still pins and forwards new flows; only their records at the owner are
            # missing (the stateless fallback if a flow changes mux). Serve traffic, say so loudly.
            log.error("cannot read the kernel's new-flow reports (nfnetlink_log group %d): %s; new flows "
                      "get no owner record", self.o.nflog_group, exc)
            self.nflog = None
        if self.o.bgp is not None:
            self.bgp = BgpSpeaker(self.o.bgp, self.o.run_dir / "bgp")
            self.bgp.start()
        self._load_state_files(time.time())
        self.apply()
        self._applied_sig = self._signature(time.time())
        self.metrics = MetricsServer(self.o.metrics_host, self.o.metrics_port, self.metric_families,
                                     extra={"/records": lambda: json.dumps(self.slowpath.record_dump()
                                                                           if self.slowpath else [])})
        self.metrics.start()
        threading.Thread(target=self._renewal_loop, name="keepalive", daemon=True).start()
        # Everything built so far (modules, tables, sockets) lives as long as the daemon: keep it
        # out of every later full collection.
        gc.freeze()

    def run_forever(self) -> None:
        while not self._wait_for_stop(self.o.poll_s):
            if self.bgp is not None:
                self.bgp.restart_if_dead()
            if time.time() >= self._next_keepalive:
                try:
                    self.keepalive_round(time.time())
                except (NftError, ValueError, OSError) as exc:
                    log.error("keep-alive round failed: %s", exc)
            changed = self._new_state()
            if changed:
                self._pool_change()
            if self.pool is not None:
                self.pool.expire_departed()  # a departed mux stops being a known sender after its grace
            sig = self._signature(time.time())
            # a starting mux announces once its records are synced, a leaving one withdraws once
            # they are handed over: the pool's route mode changes on the peer thread, at any time
            routes_due = self.pool is not None and self.pool.route_mode() != self._route_mode_applied
            if not changed and sig == self._applied_sig and not routes_due:
                continue
            try:
                self.apply()
                self._applied_sig = self._signature(time.time())
            except (NftError, LookupError, ValueError, subprocess.CalledProcessError) as exc:
                self.apply_errors += 1
                log.error("apply failed, withdrawing routes until it succeeds: %s", exc)
                self.withdraw_all()
                self._applied_sig = None

    def _pool_change(self) -> None:
        """`cluster.muxes` changed: re-derive the owners and hand records over (lbagent/pool.py)."""
        assert self.state is not None
        cluster = self.state.cluster
        if self.pool is None or cluster.muxes == self.pool.members:
            return
        ownership = build_ownership([m.name for m in cluster.muxes] or [self.state.node],
                                    owner_seed=cluster.owner_seed, table_size=cluster.table_size)
        me = next((m for m in cluster.muxes if m.name == self.state.node), None)
        if self.peers is None and me is not None and len(cluster.muxes) > 1 and self.slowpath is not None:
            # a pool of one that others join: the peer protocol starts now
            self.peers = PeerBridge(self.state.node, cluster.peer_key, {}, (me.address, me.peer_port),
                                    handler=self.slowpath)
            self.peers.start()
            self.slowpath.peers = self.peers
            self.pool.bridge = self.peers
        self.pool.change(cluster.muxes, ownership, starting=False)

    @property
    def applied_phases(self) -> dict[int, str]:
        """Listener -> the phase its tables in the kernel are in (draining, lingering, stateless)."""
        return {lid: "draining" if t.draining else "lingering" if t.lingering else "stateless"
                for lid, t in self._applied_tables.items()}

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ask run_forever to return; safe to call from a signal handler or any thread."""
        self._stopping = True
        if self._close_wake_fds.alive:  # after shutdown() there is no loop left to wake
            with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
                os.write(self._wake_w, b"\0")

    def _wait_for_stop(self, timeout_s: float) -> bool:
        if not self._stopping and self._close_wake_fds.alive:
            readable, _, _ = select.select([self._wake_r], [], [], timeout_s)
            if readable and not self._stopping:
                with contextlib.suppress(OSError):  # bytes from `wake`: read them, or it never sleeps
                    os.read(self._wake_r, 4096)
        return self._stopping

    def shutdown(self) -> None:
        """Routes first (the router stops sending), then the slow path, rules and tables."""
        t0 = time.monotonic()
        if self.bgp is not None:
            self.bgp.stop()
        log.info("shutdown: routes withdrawn, ExaBGP stopped (%.2f s)", time.monotonic() - t0)
        if self.nflog is not None:
            self.nflog.stop()
        if self.slowpath is not None:
            self.slowpath.stop()
        if self.peers is not None:
            self.peers.stop()
        remove_iptables()
        log.info("shutdown: slow path and rules removed (%.2f s)", time.monotonic() - t0)
        if self.dataplane is not None:
            with contextlib.suppress(NftError):
                self.dataplane.remove()
        remove_inject_veth()
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        self._stopping = True
        self._close_wake_fds()
        log.info("shutdown: done (%.2f s)", time.monotonic() - t0)

    # -- metrics ----------------------------------------------------------------------------------
    def collect(self, *, summary: bool = False) -> str:
        """The Prometheus text /metrics serves (the portal client reads its counters from it).
        `summary`: each per-listener and per-backend family as one sample, its sum, labelled
        `listener="*"` (what the portal's counters read: sums and unlabelled metrics), and no
        per-listener phases. At 4,000 listeners the full text has about 80,000 samples and took
        over 2 s of CPU to render and parse back, every 5 s, in the middle of the applies."""
        return render(self.metric_families(summary=summary))

    def metric_families(self, *, summary: bool = False) -> list[Metric]:
        ms: list[Metric] = []
        lp = Metric("lbagent_listener_packets_total", "Packets of a listener seen by the kernel", "counter")
        lb = Metric("lbagent_listener_bytes_total", "Bytes of a listener seen by the kernel", "counter")
        bp = Metric("lbagent_backend_packets_total", "Packets forwarded to a backend by its table", "counter")
        bb = Metric("lbagent_backend_bytes_total", "Bytes forwarded to a backend by its table", "counter")
        pp = Metric("lbagent_pinned_packets_total", "Packets forwarded by a flow pin", "counter")
        sp = Metric("lbagent_slowpath_accepted_packets_total",
                    "Packets the kernel handed to the slow path (unstable bucket, no pin, not a SYN)",
                    "counter")
        nf = Metric("lbagent_kernel_new_flows_total",
                    "SYNs of unstable buckets the kernel pinned to the current table and forwarded",
                    "counter")
        try:
            # The summary needs the listeners' counters only, not the backends' (8 per listener).
            wanted = ("l", "newflows", "slowpath_reinjected") if summary else None
            counters = self.dataplane.counters(wanted) if self.dataplane is not None else {}
        except NftError:
            counters = {}  # table not there (yet, or removed by someone): report no kernel counters
        if summary:
            # Only what the portal reads (counters_from_metrics): the sums of the headline
            # families, labelled, and the unlabelled metrics. No per-backend or per-listener samples.
            listeners = [c for name, c in counters.items() if name[:1] == "l" and name[1:].isdigit()]
            lp.add(sum(c[0] for c in listeners), listener="*")
            lb.add(sum(c[1] for c in listeners), listener="*")
            nf.add(sum(c[0] for name, c in counters.items() if name.startswith("newflows")), listener="*")
            counters = {name: c for name, c in counters.items() if name == "slowpath_reinjected"}
        for name, (packets, nbytes) in counters.items():
            if name.startswith("cb"):
                lid, _, addr = name[2:].partition("_")
                labels = {"listener": lid, "backend": addr.replace("_", ".")}
                bp.add(packets, **labels)
                bb.add(nbytes, **labels)
            elif name.startswith("l") and name[1:].isdigit():
                lp.add(packets, listener=name[1:])
                lb.add(nbytes, listener=name[1:])
            elif name.startswith("pinned"):
                pp.add(packets, listener=name[6:])
            elif name.startswith("slow") and name[4:].isdigit():
                sp.add(packets, listener=name[4:])
            elif name.startswith("newflows"):
                nf.add(packets, listener=name[8:])
        ms += [lp, lb, bp, bb, pp, sp, nf]
        ks = self.slowpath.kernel_stats if self.slowpath is not None else None
        nl = self.nflog.stats if self.nflog is not None else None
        ms.append(Metric("lbagent_new_flow_reader_up",
                         "1 when the daemon reads the kernel's new-flow reports (nfnetlink_log)")
                  .add(1 if self.nflog is not None else 0))
        ms.append(Metric("lbagent_new_flow_reports_total",
                         "New flows the kernel reported (nfnetlink_log) and the daemon decided for their "
                         "owner's record", "counter").add(ks.new_flows if ks else 0))
        ms.append(Metric("lbagent_new_flow_reports_lost_total",
                         "New-flow reports lost (sequence gaps): those flows have no record at their "
                         "owner (stateless fallback if they move mux)", "counter").add(nl.lost if nl else 0))
        ms.append(Metric("lbagent_new_flow_report_overruns_total",
                         "Times the report socket overflowed (ENOBUFS)", "counter")
                  .add(nl.overruns if nl else 0))
        ms.append(Metric("lbagent_records_replicated_total",
                         "Records this mux created as owner and queued for the backup owner", "counter")
                  .add(ks.replicas_queued if ks else 0))
        ms.append(Metric("lbagent_records_stored_total", "Records created here as their owner", "counter")
                  .add(self.store.counters.stored if self.store is not None else 0))
        stats = self.slowpath.stats if self.slowpath is not None else None
        ms.append(Metric("lbagent_slowpath_packets_total", "Packets decided in userspace (NFQUEUE)",
                         "counter").add(stats.packets if stats else 0))
        reasons = Metric("lbagent_slowpath_decisions_total", "Slow-path decisions by reason", "counter")
        for reason, n in (stats.reasons.items() if stats else []):
            reasons.add(n, reason=str(reason))
        ms.append(reasons)
        ms.append(Metric("lbagent_slowpath_reinjected_total",
                         "Decided packets re-injected (the kernel pins their flow)", "counter")
                  .add(stats.reinjected if stats else 0))
        ms.append(Metric("lbagent_kernel_reinjected_packets_total",
                         "Re-injected packets the kernel pinned and forwarded", "counter")
                  .add(counters.get("slowpath_reinjected", (0, 0))[0]))
        ms.append(Metric("lbagent_owner_queries_total", "Flows whose owner is another mux", "counter")
                  .add(stats.owner_queries if stats else 0))
        ms.append(Metric("lbagent_owner_unreachable_total", "Owner queries answered statelessly", "counter")
                  .add(stats.owner_unreachable if stats else 0))
        ms.append(Metric("lbagent_records_sent_total", "Flow records sent to their owner mux", "counter")
                  .add((stats.records_sent if stats else 0) + (ks.records_sent if ks else 0)))
        peer = Metric("lbagent_peer_messages_total", "Peer protocol messages by outcome", "counter")
        if self.peers is not None:
            c = self.peers.peer.counters
            for outcome in ("sent", "received", "answered", "timeouts", "backup_retries"):
                peer.add(getattr(c, outcome), outcome=outcome)
            peer.add(c.dropped(), outcome="dropped")
        ms.append(peer)
        answered = Metric("lbagent_owner_queries_answered_total",
                          "Owner queries this mux answered, by the role it was asked in (backup: the "
                          "asker's primary did not answer) and the source (record held, or table)", "counter")
        if self.peers is not None:
            for role in ("primary", "backup"):
                for source in ("record", "table"):
                    answered.add(self.peers.peer.counters.owner_answers(role, source),
                                 **{"as": role, "source": source})
        ms.append(answered)
        if self.pool is not None:
            ms.append(Metric("lbagent_pool_members", "Muxes in the pool (cluster.muxes) as this mux runs it")
                      .add(len(self.pool.members)))
            ms.append(Metric("lbagent_pool_changes_total", "Pool member sets applied (start included)",
                             "counter").add(self.pool.changes))
            ms.append(Metric("lbagent_pool_synced_members",
                             "Members that delivered this mux's records after the last change")
                      .add(self.pool.synced_members))
            ms.append(Metric("lbagent_pool_route_hold",
                             "1 while routes wait for a pool change (records synced or handed over)")
                      .add(1 if self.pool.route_mode() == "hold" else 0))
        if self.peers is not None:
            ms.append(Metric("lbagent_records_handed_over_total",
                             "Records sent to a mux that owns them after a pool change", "counter")
                      .add(self.peers.peer.counters.handed_over))
        ms.append(Metric("lbagent_flow_records", "Flow records held")
                  .add(len(self.store) if self.store is not None else 0))
        ms.append(Metric("lbagent_listeners_in_transition", "Listeners with an old table still draining")
                  .add(sum(1 for t in self.tables.values() if t.draining)))
        ms.append(Metric("lbagent_listeners_lingering",
                         "Listeners whose drain is over but whose moved flows still live (old tables kept)")
                  .add(sum(1 for t in self.tables.values() if t.lingering)))
        phase = Metric("lbagent_listener_transition",
                       "1 per listener, labelled with its phase: draining (an old table's drain deadline is "
                       "ahead), lingering (drain over, flows of moved buckets still live) or stateless")
        for lid, state in sorted(self.applied_phases.items()) if not summary else ():
            phase.add(1, listener=str(lid), state=state)
        ms.append(phase)
        ms.append(Metric("lbagent_flow_record_quota", "Records this mux may hold (cluster.max_records)")
                  .add(self.store.max_records if self.store is not None else 0))
        ms.append(Metric("lbagent_records_quota_full_total",
                         "Flows answered statelessly and not recorded because the record quota was full",
                         "counter").add(self.store.counters.degraded if self.store is not None else 0))
        ms.append(Metric("lbagent_records_expired_total", "Records removed after their flow's idle timeout",
                         "counter").add(self.store.counters.expired if self.store is not None else 0))
        ms.append(Metric("lbagent_keepalive_flows_total",
                         "Active pinned flows whose records were renewed here and at their owners", "counter")
                  .add(ks.keepalives if ks else 0))
        ms.append(Metric("lbagent_lingering_ended_total", "Lingering old tables dropped (no moved flow left)",
                         "counter").add(self.lingers_ended))
        ms.append(Metric("lbagent_config_generation", "Generation of the applied desired state")
                  .add(self.applied_generation))
        refused = Metric("lbagent_vip_refused",
                         "1 per VIP whose desired state this mux does not run (it keeps its last applied "
                         "state, or is not served); the log says why")
        for address in sorted(self._refused):
            refused.add(1, vip=address)
        ms.append(refused)
        ms.append(Metric("lbagent_applies_total", "Successful applies", "counter").add(self.apply_count))
        ms.append(Metric("lbagent_vips_planned_total",
                         "VIPs planned afresh by an apply (a VIP nothing changed for keeps its last plan)",
                         "counter").add(self.vips_planned))
        ms.append(Metric("lbagent_last_apply_listeners_written",
                         "Listeners whose kernel objects the last apply wrote (the others were left alone)")
                  .add(self.dataplane.last_changed_listeners if self.dataplane is not None else 0))
        ms.append(Metric("lbagent_apply_errors_total", "Failed applies", "counter").add(self.apply_errors))
        ms.append(Metric("lbagent_config_errors_total", "Refused config files", "counter")
                  .add(self.config_errors))
        ms.append(Metric("lbagent_state_write_errors_total",
                         "Failed saves of the state kept for a restart (run_dir/last-good/, "
                         "run_dir/history/; e.g. a full disk)", "counter").add(self.state_write_errors))
        ms.append(Metric("lbagent_last_apply_seconds", "Duration of the last apply").add(self.last_apply_s))
        bgp_up = Metric("lbagent_bgp_session_up", "1 when the BGP session to the router is established")
        routes = Metric("lbagent_bgp_routes", "Routes announced, by next hop")
        if self.bgp is not None:
            bgp_up.add(1 if self.bgp.session_state() == "up" else 0, neighbor=self.bgp.settings.neighbor)
            for prefix, hop in self.bgp.announced.items():
                routes.add(1, prefix=prefix, next_hop=hop)
        restarts = Metric("lbagent_bgp_speaker_restarts_total", "ExaBGP processes restarted after dying",
                          "counter").add(self.bgp.restarts if self.bgp is not None else 0)
        ms += [bgp_up, routes, restarts]
        return ms


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse_args(argv: list[str] | None) -> DaemonOptions:
    p = argparse.ArgumentParser(prog="lbagent run",
                                description="Run the mux daemon from a desired-state file.")
    p.add_argument("--config", required=True, type=Path, help="desired-state JSON (re-read when it changes)")
    p.add_argument("--iface", help="mux interface (default: the one holding this node's cluster address)")
    p.add_argument("--metrics", default="127.0.0.1:9109", help="HOST:PORT of the Prometheus endpoint")
    p.add_argument("--run-dir", type=Path, default=Path("/run/lbagent"), help="ExaBGP files, PID files")
    p.add_argument("--queue-num", type=int, default=7, help="NFQUEUE number of the slow path")
    p.add_argument("--nflog-group", type=int, default=7,
                   help="nfnetlink_log group of the kernel's new-flow reports")
    p.add_argument("--bgp-neighbor", help="router address (no BGP without it)")
    p.add_argument("--bgp-local-address", help="this mux's address for BGP (default: cluster address)")
    p.add_argument("--bgp-local-as", type=int, default=65001)
    p.add_argument("--bgp-peer-as", type=int, default=65000)
    p.add_argument("--no-transitions", action="store_true",
                   help="ignore previous generations (baseline: moved buckets break connections)")
    p.add_argument("--no-pool-handover", action="store_true",
                   help="on a pool membership change, re-derive owners but sync and hand over no record "
                        "(baseline: records stay at their old owners)")
    p.add_argument("--learn", action="store_true", help="record each flow's bucket in the kernel (debugging)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    host, _, port = a.metrics.rpartition(":")
    if not port.isdigit() or not host:
        p.error(f"--metrics: expected HOST:PORT, got {a.metrics!r}")
    if not 0 <= a.queue_num <= 65535:
        p.error(f"--queue-num: {a.queue_num} is not 0..65535")
    if not 0 <= a.nflog_group <= 65535:
        p.error(f"--nflog-group: {a.nflog_group} is not 0..65535")
    bgp = None
    if a.bgp_neighbor:
        local = a.bgp_local_address
        if local is None:
            state = load_state_file(a.config)
            me = next((m for m in state.cluster.muxes if m.name == state.node), None)
            if me is None:
                p.error(f"node {state.node!r} is not in cluster.muxes: give --bgp-local-address")
            local = me.address
        bgp = BgpSettings(a.bgp_neighbor, local, a.bgp_local_as, a.bgp_peer_as)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return DaemonOptions(config=a.config, iface=a.iface, metrics_host=host, metrics_port=int(port),
                         run_dir=a.run_dir, queue_num=a.queue_num, nflog_group=a.nflog_group, bgp=bgp,
                         transitions=not a.no_transitions, learn=a.learn,
                         pool_handover=not a.no_pool_handover)


def main(argv: list[str] | None = None) -> int:
    from lbagent.portal import portal_mode  # `--portal URL --token-file F`: desired state from the portal

    argv, portal = portal_mode(argv)
    options = _parse_args(argv)
    if portal is not None:
        options.first_state_timeout_s = portal.FIRST_STATE_TIMEOUT_S
    daemon = MuxDaemon(options)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    try:
        if portal is not None:
            portal.attach(daemon)  # writes each state to the config file, acks once applied
        daemon.start()
        (options.run_dir / "daemon.pid").write_text(str(os.getpid()))
        daemon.run_forever()
    finally:
        if portal is not None:
            portal.stop()
        daemon.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
