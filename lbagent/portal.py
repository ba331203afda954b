"""Agent side of the portal control channel: a websocket client that receives desired state,
applies it atomically through a driver, acknowledges it, reports counters and health, and keeps
forwarding with the last applied state whenever the portal is unreachable (fail static).

Run standalone: `python -m lbagent.portal --portal ws://127.0.0.1:8000/ws/agents/ --token-file F`
(with the in-process table driver), or embed `PortalClient` / `run_portal_client` in a daemon that
owns a real data plane (the kernel daemon passes its own `apply`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from lbagent import __version__
from lbagent.health import HealthMonitor
from lbagent.metrics import parse as parse_metrics
from lbagent.protocol import (
    MAX_COUNTERS,
    MAX_PORTAL_MESSAGE_BYTES,
    Applied,
    BackendHealth,
    DeltaBaseMismatch,
    Health,
    Hello,
    InvalidDesiredState,
    ProtocolError,
    Stats,
    decode_portal_message,
    encode,
)
from lbagent.state import (
    DesiredState,
    StateError,
    StateParser,
    Vip,
    load_state_file,
    state_json,
    write_file_atomically,
)

logger = logging.getLogger("lbagent.portal")

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009


@dataclass(frozen=True)
class PartialApply:
    """A data plane's answer when it applied a document except some VIPs, which keep running
    their last good state (or are not served at all): what each listener runs now (0: nothing)
    and why each listener of a refused VIP is not at its desired generation. The
    acknowledgement carries both, so the portal marks only those listeners."""

    listeners: Mapping[int, int]
    listener_errors: Mapping[int, str]

    @property
    def summary(self) -> str:
        return "; ".join(sorted(set(self.listener_errors.values())))


class Driver(Protocol):
    """What the client needs from a data plane."""

    def apply(self, state: DesiredState) -> PartialApply | None:
        """Install `state`: afterwards the data plane runs exactly `state` (returns None), or
        runs it except the VIPs a PartialApply names, or raises and still runs the state it ran
        before."""

    def counters(self) -> Mapping[str, int]:
        """Monotonic counters to report to the portal (names: [a-z][a-z0-9_.]*)."""


class TableDriver:
    """In-process data plane for the simulator and tests: builds each listener's Maglev table
    with the shared core (cached by ordered backend list, so only changed listeners cost time)
    and swaps the whole set at once. `applied_file`, when given, receives the applied state
    (atomic rename) so another process can see what this agent runs."""

    def __init__(self, applied_file: Path | None = None, build_tables: bool = True) -> None:
        self.applied_file = applied_file
        self.build_tables = build_tables
        self.tables: dict[int, object] = {}
        self._cache: dict[tuple, object] = {}
        self._by_listener: dict[int, tuple[object, tuple, object]] = {}
        self._counters = {"applies": 0, "tables_built": 0}

    def apply(self, state: DesiredState) -> None:
        tables = {}
        cache: dict[tuple, object] = {}
        by_listener: dict[int, tuple[object, tuple, object]] = {}
        for _, listener in state.listeners():
            # The listener's own size (its `table_size`, else from its `backend_cap`, else the
            # cluster's): the same function the mux daemon sizes its kernel maps with.
            size = listener.table_size_in(state.cluster)
            reused = self._by_listener.get(listener.id)
            if reused is not None and reused[0] is listener and reused[1][0] == size:
                # The parser reuses unchanged VIPs' objects: same object, same table.
                key, table = reused[1], reused[2]
            else:
                serving = [b for b in listener.backends if b.state == "active" and b.weight > 0]
                key = (size, tuple((b.address, b.port, b.weight) for b in serving))
                table = self._cache[key] if key in self._cache else cache.get(key)
                if table is None and self.build_tables and serving:
                    from lbagent.core.maglev import maglev_table

                    table = maglev_table(
                        [f"{b.address}:{b.port}" for b in serving],
                        [b.weight for b in serving],
                        table_size=size,
                    )
                    self._counters["tables_built"] += 1
            cache[key] = table
            tables[listener.id] = table
            by_listener[listener.id] = (listener, key, table)
        if self.applied_file is not None:
            _write_atomically(self.applied_file, state.to_json())
        # The swap: all listeners change together.
        self.tables, self._cache, self._by_listener = tables, cache, by_listener
        self._counters["applies"] += 1

    def counters(self) -> Mapping[str, int]:
        return dict(self._counters)


def _write_atomically(path: Path, text: str, *, durable: bool = False) -> None:
    write_file_atomically(path, text, durable=durable)


def _write_json_atomically(path: Path, document: dict, *, durable: bool = False) -> None:
    _write_atomically(path, json.dumps(document, separators=(",", ":")), durable=durable)


CACHE_QUIET_S = 0.5  # the state cache is written once applies pause this long...
CACHE_MAX_DELAY_S = 5.0  # ...or after this long at the latest
CACHE_RETRY_S = 5.0  # a failed write (full disk) is tried again this often
REFUSAL_WATCH_S = 1.0  # how often portal mode looks whether the daemon healed or lost a refused VIP
INLINE_DECODE_BYTES = 256 * 1024  # larger frames are decoded off the event loop


@dataclass
class Backoff:
    """Exponential backoff with jitter: a fleet of agents that lost the portal together must not
    reconnect in lockstep when it returns."""

    initial_s: float = 0.2
    maximum_s: float = 5.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.maximum_s, self.initial_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


class PortalClient:
    """One agent's connection to the portal, reconnecting forever until `stop()`."""

    def __init__(
        self,
        url: str,
        token: str,
        driver: Driver,
        *,
        node: str,
        role: str = "mux",
        stats_interval_s: float = 5.0,
        state_cache: Path | None = None,
        health_checks: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.driver = driver
        self.node = node
        self.role = role
        self.stats_interval_s = stats_interval_s
        self.state_cache = state_cache
        self.health_checks = health_checks
        self.backoff = backoff or Backoff()
        self.applied: DesiredState | None = None
        self._applied_raw: dict | None = None  # the applied state as the portal sent it
        self._applied_partial: PartialApply | None = None  # what of it the data plane refused
        self._applying = False
        self._parser = StateParser()
        self._received: tuple[int, dict] | None = None  # last state the portal sent on this connection
        self._cache_pending: dict | None = None  # applied, not yet in state_cache
        self._cache_writer: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._pending: tuple[DesiredState, dict] | None = None
        self._pending_ready = asyncio.Event()
        self._health: HealthMonitor | None = None
        self.counters = {
            "connects": 0,
            "disconnects": 0,
            "desired_received": 0,
            "applied_ok": 0,
            "applied_failed": 0,
            "applied_partial": 0,
            "protocol_errors": 0,
            "refused": 0,
            "state_cache_writes": 0,
            "state_cache_write_errors": 0,
        }
        self.state_cache_error: str | None = None  # why the last state cache write failed (None: it did not)
        self.connected = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    def load_cached_state(self) -> None:
        """Fail static across an agent restart: re-apply the last state the portal gave us."""
        if self.state_cache is None or not self.state_cache.exists():
            return
        try:
            state = load_state_file(self.state_cache)
        except StateError as exc:
            logger.warning("ignoring state cache %s: %s", self.state_cache, exc)
            return
        self._applied_partial = self.driver.apply(state)
        self.applied, self._applied_raw = state, state.to_dict()
        logger.info("running cached state generation %s until the portal answers", state.generation)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if self.health_checks:
            self._health = HealthMonitor(self._report_health)
            if self.applied is not None:
                self._health.update(self.applied)
        applier = asyncio.create_task(self._apply_loop(), name="apply")
        try:
            while not self._stop.is_set():
                await self._connect_once()
                if self._stop.is_set():
                    break
                delay = self.backoff.next_delay_s()
                logger.info(
                    "reconnecting to the portal in %.2fs (still forwarding with generation %s)",
                    delay,
                    self.applied.generation if self.applied else None,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            applier.cancel()
            if self._health is not None:
                self._health.stop()
            if self._cache_writer is not None:  # let the last applied state reach the disk
                await asyncio.wait({self._cache_writer}, timeout=5)

    async def _connect_once(self) -> None:
        try:
            async with connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                max_size=MAX_PORTAL_MESSAGE_BYTES,
                open_timeout=5,
                # A portal busy enough to answer a ping late is not dead: under a 40-client load
                # on 2 CPUs a 10 s timeout dropped healthy connections (issue 15). The portal
                # closes connections silent for 30 s on its side.
                ping_interval=10,
                ping_timeout=30,
                close_timeout=2,
                proxy=None,
                compression=None,
            ) as ws:
                self._ws = ws
                self.counters["connects"] += 1
                logger.info("connected to %s as %s", self.url, self.node)
                session = asyncio.create_task(self._session(ws), name="session")
                stopping = asyncio.create_task(self._stop.wait(), name="stop")
                await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if session.done():
                    stopping.cancel()
                    session.result()  # re-raise what ended the session
                else:
                    session.cancel()
                    await ws.close(1001, "agent stopping")
        except InvalidStatus as exc:
            self.counters["refused"] += 1
            status = exc.response.status_code
            logger.error(
                "portal refused the connection (HTTP %s)%s",
                status,
                ": check the agent token" if status in (401, 403) else "",
            )
        except InvalidURI:
            raise
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            logger.warning("portal connection lost: %s", exc or type(exc).__name__)
        finally:
            if self._ws is not None:
                self.counters["disconnects"] += 1
            self._ws = None
            self.connected.clear()

    async def _session(self, ws: ClientConnection) -> None:
        self._received = None  # a new connection starts with a full state
        hello = self._hello()
        await ws.send(encode(hello))
        self.connected.set()
        stats = asyncio.create_task(self._stats_loop(ws), name="stats")
        try:
            async for frame in ws:
                received = time.perf_counter()
                try:
                    if len(frame) > INLINE_DECODE_BYTES:
                        # A whole document (a new connection, a resync): decoding thousands of
                        # VIPs takes long enough to starve this loop's pings and stats, which the
                        # portal reads as a dead agent. One frame at a time: order is kept.
                        message = await asyncio.to_thread(
                            decode_portal_message, frame, self._parser, self._received
                        )
                    else:
                        message = decode_portal_message(frame, self._parser, self._received)
                except InvalidDesiredState as exc:
                    self.counters["applied_failed"] += 1
                    logger.error("refusing desired state: %s", exc)
                    await ws.send(encode(Applied(generation=exc.generation or 0, ok=False, error=str(exc))))
                    continue
                except DeltaBaseMismatch as exc:
                    logger.warning("%s", exc)
                    await ws.close(1000, "resync")
                    return
                except ProtocolError as exc:
                    self.counters["protocol_errors"] += 1
                    logger.error("closing: malformed message from the portal: %s", exc)
                    await ws.close(CLOSE_POLICY_VIOLATION, str(exc)[:120])
                    return
                self.counters["desired_received"] += 1
                logger.debug(
                    "received generation %s (%d bytes), decoded in %.1f ms",
                    message.state.generation,
                    len(frame),
                    (time.perf_counter() - received) * 1000,
                )
                self.backoff.reset()  # a portal that sends us state is a healthy portal
                raw = dict(message.raw or message.state.to_dict())
                self._received = (message.state.generation, raw)  # the base of the next delta
                self._pending = (message.state, raw)
                self._pending_ready.set()
        finally:
            stats.cancel()

    def _hello(self) -> Hello:
        """The first message of a connection: who we are and what we run, in an ack's terms, so
        the portal rebuilds our acknowledgement rows from it (what an earlier connection said, or
        said late, does not count). While a document is being applied, it says what ran before."""
        if self.applied is None:
            return Hello(
                node=self.node, role=self.role, version=__version__, applied_generation=None, listeners={}
            )
        partial = self._applied_partial
        return Hello(
            node=self.node,
            role=self.role,
            version=__version__,
            applied_generation=self.applied.generation,
            listeners=dict(partial.listeners) if partial else self.applied.listener_generations(),
            listener_errors=dict(partial.listener_errors) if partial else {},
        )

    # -- applying ------------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        """Apply the newest pending state; states that arrive during an apply are coalesced."""
        while True:
            await self._pending_ready.wait()
            self._pending_ready.clear()
            pending, self._pending = self._pending, None
            if pending is None:
                continue
            state, raw = pending
            ack = await self._apply(state, raw)
            await self._send(ack)
            if ack.ok and self.state_cache is not None:
                self._cache_pending = raw
                if self._cache_writer is None or self._cache_writer.done():
                    self._cache_writer = asyncio.create_task(self._write_cache_soon())
            if ack.ok and self._health is not None:
                self._health.update(state)
                await self._send(Health(checks=tuple(self._health.snapshot()), full=True))

    async def _write_cache_soon(self) -> None:
        """Persist the newest applied state for a restart without the portal (fail static) once
        applies pause for CACHE_QUIET_S, or after CACHE_MAX_DELAY_S at the latest: serialising
        thousands of VIPs takes tens of ms of CPU (holding the GIL), which during a burst of
        pushes competed with every acknowledgement. A crash inside that window restarts from
        the previous state, and the portal resyncs it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CACHE_MAX_DELAY_S
        while not self._stop.is_set():
            seen = self._cache_pending
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), max(0.0, min(CACHE_QUIET_S, deadline - loop.time()))
                )
            if self._cache_pending is seen or loop.time() >= deadline:
                break
        while self._cache_pending is not None:
            raw, self._cache_pending = self._cache_pending, None
            try:
                await asyncio.to_thread(_write_json_atomically, self.state_cache, raw, durable=True)
            except OSError as exc:
                # A full or read-only disk: keep applying and serving (the data plane does not
                # need the cache), say so once per distinct error and count every failure (the
                # portal sees portal.state_cache_write_errors in the stats); retried every
                # CACHE_RETRY_S. A restart meanwhile would start from the older cache.
                self.counters["state_cache_write_errors"] += 1
                reason = f"{type(exc).__name__}: {exc.strerror or exc}"
                if reason != self.state_cache_error:
                    logger.error(
                        "cannot write the state cache %s (%s): still applying and serving generation %s; "
                        "after a restart without the portal this agent would run an older state",
                        self.state_cache,
                        reason,
                        raw.get("generation"),
                    )
                self.state_cache_error = reason
                if self._stop.is_set():
                    break  # stopping: no retries (run() waits for this task a bounded time)
                if self._cache_pending is None:
                    self._cache_pending = raw  # try it again unless a newer state comes first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), CACHE_RETRY_S)
            else:
                self.counters["state_cache_writes"] += 1
                if self.state_cache_error is not None:
                    logger.info(
                        "state cache %s written again (generation %s)",
                        self.state_cache,
                        raw.get("generation"),
                    )
                self.state_cache_error = None

    async def _apply(self, state: DesiredState, raw: dict) -> Applied:
        # A new document number with the same content (a change elsewhere) needs no data-plane work.
        same = self._applied_raw is not None and {**raw, "generation": 0} == {
            **self._applied_raw,
            "generation": 0,
        }
        partial = self._applied_partial
        if not same:
            started = time.perf_counter()
            try:
                self._applying = True
                partial = await asyncio.to_thread(self.driver.apply, state)
            except Exception as exc:  # any driver failure is reported to the portal, never fatal
                self.counters["applied_failed"] += 1
                logger.exception(
                    "applying generation %s failed; still running generation %s",
                    state.generation,
                    self.applied.generation if self.applied else None,
                )
                return Applied(generation=state.generation, ok=False, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._applying = False
            logger.info(
                "applied generation %s (%d VIPs) in %.1f ms",
                state.generation,
                len(state.vips),
                (time.perf_counter() - started) * 1000,
            )
            if partial is not None:
                logger.warning("generation %s applied except: %s", state.generation, partial.summary)
        self.applied, self._applied_raw, self._applied_partial = state, raw, partial
        self.counters["applied_ok"] += 1
        return self._ok(state.generation, partial)

    def _ok(self, generation: int, partial: PartialApply | None) -> Applied:
        if partial is None:
            assert self.applied is not None
            return Applied(generation=generation, ok=True, listeners=self.applied.listener_generations())
        self.counters["applied_partial"] += 1
        return Applied(
            generation=generation,
            ok=True,
            listeners=dict(partial.listeners),
            listener_errors=dict(partial.listener_errors),
        )

    async def reacknowledge(self, generation: int, partial: PartialApply | None) -> None:
        """The data plane healed (or lost) part of the running document without a new one, e.g. a
        refused VIP's backend answered ARP on a retry: acknowledge `generation` again with what
        runs now. Ignored if another document was applied meanwhile."""
        if self.applied is None or self.applied.generation != generation or self._applying:
            return
        self._applied_partial = partial
        await self._send(self._ok(generation, partial))

    # -- reporting -----------------------------------------------------------------------------

    async def _send(self, message: Applied | Stats | Health) -> None:
        ws = self._ws
        if ws is None:
            return  # offline: the next hello + desired exchange resynchronises everything
        try:
            await ws.send(encode(message))
        except ConnectionClosed:
            logger.info("could not send %s: connection closed", message.type)

    def _report_health(self, changes: list[BackendHealth]) -> None:
        if self._ws is not None:
            asyncio.get_running_loop().create_task(self._send(Health(checks=tuple(changes))))

    async def _stats_loop(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.stats_interval_s)
            # Off the event loop: a kernel mux reads its counters from the kernel (seconds with
            # thousands of listeners on a busy host), and the loop must keep answering pings.
            driver_counters = await asyncio.to_thread(self.driver.counters)
            counters = {**{f"portal.{k}": v for k, v in self.counters.items()}, **driver_counters}
            await self._send(Stats(counters=counters))


async def run_portal_client(
    url: str,
    token: str,
    apply: Callable[[DesiredState], None],
    stats: Callable[[], Mapping[str, int]] = dict,
    *,
    node: str,
    role: str = "mux",
    state_cache: Path | None = None,
) -> None:
    """Entry point for a daemon that owns its data plane: `apply` must be atomic (see Driver)."""

    class _CallbackDriver:
        def apply(self, state: DesiredState) -> None:
            apply(state)

        def counters(self) -> Mapping[str, int]:
            return stats()

    client = PortalClient(url, token, _CallbackDriver(), node=node, role=role, state_cache=state_cache)
    client.load_cached_state()
    await client.run()


# The kernel daemon's metrics (lbagent/daemon.py, `Daemon.collect`) -> the counter names the
# portal's dashboard reads (the demo muxes report the same names, lbagent/demo.py): the sum of the
# metric's samples over its labels.
HEADLINE_FROM_METRICS = {
    "packets": "lbagent_listener_packets_total",  # packets of every listener the kernel saw
    # SYNs the kernel pinned on buckets in transition; a stable bucket's flows are forwarded
    # statelessly and are not counted one by one (only their packets are)
    "new_flows": "lbagent_kernel_new_flows_total",
    "slowpath_decisions": "lbagent_slowpath_decisions_total",
    "flow_records": "lbagent_flow_records",
}
# Only when the daemon speaks BGP (the metric has samples; without a router it has none).
BGP_FROM_METRICS = {
    "bgp.session_up": "lbagent_bgp_session_up",
    "bgp.speaker_restarts": "lbagent_bgp_speaker_restarts_total",
}
METRIC_PREFIX = "lbagent_"


def counters_from_metrics(text: str) -> dict[str, int]:
    """The counters a kernel mux reports to the portal, from its Prometheus text (what
    `Daemon.collect()` renders for /metrics): the dashboard's headline names, `bgp.*` when the
    daemon runs BGP, and every unlabelled metric as `daemon.<name>` (`lbagent_` and `_total`
    dropped: lbagent_apply_errors_total -> daemon.apply_errors). Values are whole numbers
    (durations, `*_seconds`, are left out); at most the protocol's MAX_COUNTERS names."""
    sums: dict[str, float] = {}
    sample_counts: dict[str, int] = {}
    unlabelled: dict[str, float] = {}
    for (name, labels), value in parse_metrics(text).items():
        sums[name] = sums.get(name, 0.0) + value
        sample_counts[name] = sample_counts.get(name, 0) + 1
        if not labels:
            unlabelled[name] = value
    out: dict[str, int] = {}
    for counter, metric in HEADLINE_FROM_METRICS.items():
        out[counter] = int(sums.get(metric, 0))
    if "lbagent_bgp_session_up" in sums:
        for counter, metric in BGP_FROM_METRICS.items():
            if metric in sums:
                out[counter] = int(sums[metric])
        out["bgp.routes"] = sample_counts.get("lbagent_bgp_routes", 0)  # one sample per route
    for metric, value in sorted(unlabelled.items()):
        if len(out) >= MAX_COUNTERS:
            break
        short = metric.removeprefix(METRIC_PREFIX).removesuffix("_total")
        if (
            metric.startswith(METRIC_PREFIX)
            and not metric.endswith("_seconds")  # a duration, not a count (and rarely whole)
            and float(value).is_integer()
            and value >= 0
        ):
            out.setdefault(f"daemon.{short}", int(value))
    return out


class DaemonBridge:
    """Portal mode for the kernel daemon (lbagent/daemon.py). Each state from the portal is
    handed to the daemon in memory (`daemon.submit`: its parsed VIPs are the parser's reused
    objects, so the daemon plans only what changed); the apply returns once the daemon reports
    that generation applied, and raises with the daemon's failure otherwise, so the portal's
    acknowledgement means "in the kernel". Each applied state is then written to the daemon's
    config file (atomically, by a writer thread, off the acknowledgement's path), which a
    restarted daemon runs until the portal answers (fail static)."""

    # A first load of thousands of listeners takes minutes on a busy host (the daemon reports a
    # failure at once; this only bounds a daemon that hangs).
    APPLY_TIMEOUT_S = 600.0
    # The daemon's wait for its first state at start (without a config file from an earlier run):
    # connecting, the portal's hello and first document take seconds, more on a busy host.
    FIRST_STATE_TIMEOUT_S = 300.0
    POLL_S = 0.002  # how often apply looks whether the daemon applied (a change takes ~10-100 ms)

    def __init__(
        self, url: str, token: str, node: str, role: str = "mux", *, stats_interval_s: float = 5.0
    ) -> None:
        self.url, self._token, self.node, self.role = url, token, node, role
        self.stats_interval_s = stats_interval_s
        self.daemon = None
        self._confirmed: int | None = None  # the last generation the daemon reported applied to us
        self._thread: threading.Thread | None = None
        self._client: PortalClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_write: DesiredState | None = None  # applied, not yet in the config file
        self._write_wanted = threading.Condition()
        self._writer: threading.Thread | None = None
        self._texts: dict[str, tuple[Vip, str]] = {}  # the config file's VIPs, as last written
        self._writer_stopping = False
        self.config_write_errors = 0

    def apply(self, state: DesiredState) -> PartialApply | None:
        daemon = self.daemon
        errors = (daemon.apply_errors, daemon.config_errors)
        daemon.submit(state)
        deadline = time.monotonic() + self.APPLY_TIMEOUT_S
        while daemon.applied_generation != state.generation:
            if daemon.stopping:  # SIGTERM mid-apply: do not hold the daemon's exit for the timeout
                raise RuntimeError(f"the daemon is stopping; generation {state.generation} was not applied")
            if (daemon.apply_errors, daemon.config_errors) != errors:
                raise RuntimeError(
                    f"the data plane refused generation {state.generation} (see the agent's log)"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the data plane did not apply generation {state.generation} within "
                    f"{self.APPLY_TIMEOUT_S:g}s"
                )
            time.sleep(self.POLL_S)
        self._confirmed = state.generation
        self._write_soon(state)
        return self._partial(daemon)

    def _write_soon(self, state: DesiredState) -> None:
        with self._write_wanted:
            self._to_write = state
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="config-writer", daemon=True)
                self._writer.start()
            self._write_wanted.notify()

    def _write_loop(self) -> None:
        """Write the newest applied state to the config file (states applied meanwhile are
        skipped: only the newest matters after a restart)."""
        while True:
            with self._write_wanted:
                while self._to_write is None and not self._writer_stopping:
                    self._write_wanted.wait()
                if self._to_write is None:
                    return  # stopping, everything written
                state, self._to_write = self._to_write, None
            try:
                _write_atomically(self.daemon.o.config, state_json(state, self._texts))
            except OSError as exc:
                # Serving goes on (the daemon runs the state from memory); a restart meanwhile
                # would start from the older file, and the portal resyncs it.
                self.config_write_errors += 1
                logger.error(
                    "cannot write %s (generation %s): %s", self.daemon.o.config, state.generation, exc
                )

    @staticmethod
    def _partial(daemon) -> PartialApply | None:
        errors = daemon.listener_errors
        return PartialApply(daemon.running_generations, errors) if errors else None

    async def _watch_refusals(self) -> None:
        """A refused VIP is retried by the daemon on its own; tell the portal when that changes
        what runs, without waiting for the next document."""
        while True:
            await asyncio.sleep(REFUSAL_WATCH_S)
            client, daemon = self._client, self.daemon
            if client is None or client.applied is None or self._confirmed is None:
                continue
            if daemon.applied_generation != self._confirmed:
                continue  # a document is being applied: its own ack will say
            partial = self._partial(daemon)
            if partial != client._applied_partial:
                # The running document's number (content the portal re-sent under a new number
                # is acknowledged without reaching the daemon).
                await client.reacknowledge(client.applied.generation, partial)

    def counters(self) -> Mapping[str, int]:
        """What the daemon's /metrics shows, under the names the portal reads
        (counters_from_metrics), plus its apply counters read directly."""
        daemon = self.daemon
        out: dict[str, int] = {}
        try:
            out.update(counters_from_metrics(daemon.collect(summary=True)))
        except Exception:  # a metric read failing must not stop the stats frames
            # (collect() reads kernel counters and the daemon's tables while its loop changes
            # them); this frame carries the apply counters only, the next one tries again.
            logger.warning("cannot read the daemon's metrics for the portal", exc_info=True)
        out.update(
            {
                "daemon.applies": daemon.apply_count,
                "daemon.apply_errors": daemon.apply_errors,
                "daemon.config_errors": daemon.config_errors,
            }
        )
        return out

    def attach(self, daemon) -> None:
        """Start the portal client in a thread; call before daemon.start(), which waits for the
        first state (from the portal, or the config file a previous run left: fail static)."""
        self.daemon = daemon
        self._thread = threading.Thread(target=self._run, name="portal-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._client = PortalClient(
                self.url,
                self._token,
                self,
                node=self.node,
                role=self.role,
                stats_interval_s=self.stats_interval_s,
            )
            watcher = asyncio.create_task(self._watch_refusals(), name="refusals")
            try:
                await self._client.run()
            finally:
                watcher.cancel()

        asyncio.run(serve())

    def stop(self) -> None:
        if self._loop is not None and self._client is not None:
            self._loop.call_soon_threadsafe(self._client.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._write_wanted:  # the last applied state reaches the config file before exit
            self._writer_stopping = True
            self._write_wanted.notify()
        if self._writer is not None:
            self._writer.join(timeout=10)


def portal_mode(argv: list[str] | None) -> tuple[list[str], DaemonBridge | None]:
    """Split `--portal URL --token-file F [--node N] [--portal-stats-interval S]` off the
    daemon's arguments. Without
    `--config`, the daemon's config file becomes /var/lib/lbagent/portal-state.json (it then
    also serves as the state cache across restarts)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--portal")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--node", default=socket.gethostname().split(".")[0])
    parser.add_argument("--portal-stats-interval", type=float, default=5.0)
    known, rest = parser.parse_known_args(args)
    if known.portal is None:
        return args, None
    if known.token_file is None:
        raise SystemExit("lbagent run: --portal needs --token-file")
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        rest += ["--config", "/var/lib/lbagent/portal-state.json"]
    if known.portal_stats_interval <= 0:
        raise SystemExit("lbagent run: --portal-stats-interval must be a positive number of seconds")
    bridge = DaemonBridge(
        known.portal,
        read_token_file(known.token_file),
        known.node,
        stats_interval_s=known.portal_stats_interval,
    )
    return rest, bridge


def read_token_file(path: Path) -> str:
    """The agent token, from a file only root can read (never on the command line: ps shows it)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"lbagent: cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise SystemExit(f"lbagent: token file {path} is empty")
    if path.stat().st_mode & 0o077:
        logger.warning("token file %s is readable by group or others; chmod 600 it", path)
    return token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbagent run", description=__doc__.splitlines()[0])
    parser.add_argument("--portal", required=True, help="ws:// or wss:// URL of the portal's /ws/agents/")
    parser.add_argument("--token-file", required=True, type=Path, help="file holding this agent's token")
    parser.add_argument("--node", default=socket.gethostname().split(".")[0], help="agent node name")
    parser.add_argument("--role", choices=("mux", "host"), default="mux")
    parser.add_argument(
        "--state-cache",
        type=Path,
        help="keep the last applied state here (fail static across agent restarts)",
    )
    parser.add_argument("--applied-file", type=Path, help="write the applied state here (tests, tooling)")
    parser.add_argument("--no-tables", action="store_true", help="do not build Maglev tables (protocol only)")
    parser.add_argument("--no-health", action="store_true", help="do not run backend health checks")
    parser.add_argument("--stats-interval", type=float, default=5.0, help="seconds between stats reports")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    token = read_token_file(args.token_file)
    driver = TableDriver(applied_file=args.applied_file, build_tables=not args.no_tables)
    client = PortalClient(
        args.portal,
        token,
        driver,
        node=args.node,
        role=args.role,
        stats_interval_s=args.stats_interval,
        state_cache=args.state_cache,
        health_checks=not args.no_health and args.role == "mux",  # only muxes vote on health
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, client.stop)
        client.load_cached_state()
        await client.run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Backoff",
    "DaemonBridge",
    "Driver",
    "PortalClient",
    "TableDriver",
    "main",
    "portal_mode",
    "run_portal_client",
]
