"""Channels consumers: `/ws/agents/`, the control channel of lbagent agents (protocol 1, see
lbagent/protocol.py and docs/agent-protocol.md).

An agent authenticates with its AgentNode token in `Authorization: Bearer <token>` (hashed at
rest; a rotated token or a disabled node disconnects it at once). The first frame must be
`hello`; the portal answers with the full desired state, and again after every relevant change.
A malformed, unknown or oversized frame closes the connection with a logged reason.

Every hello opens a new connection epoch (agent_sync.agent_connected): acknowledgements are
recorded only under the current epoch, and the consumer of a replaced connection closes itself.
Each consumer also watches its connection (`_watch`): a document counter ahead of what it sent
with no notification (the channel layer dropped it) is logged, counted and resynced; an agent
whose acknowledgement lags the sent document is re-sent the full state; a silent connection is
closed as dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from lbagent.protocol import (
    MAX_AGENT_MESSAGE_BYTES,
    Applied,
    Health,
    Hello,
    ProtocolError,
    Stats,
    decode_agent_message,
)

from . import agent_sync
from .desired_state import desired_frame_for, splice_node
from .models import AgentNode
from .models_sync import PushSettings

logger = logging.getLogger("datacenter.loadbalancing.agents")

HELLO_TIMEOUT_S = 10.0
CLOSE_UNAUTHORIZED = 4401  # token revoked or node disabled while connected
CLOSE_WRONG_NODE = 4403
CLOSE_HELLO_TIMEOUT = 4408
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_REPLACED = 4409  # the agent connected again: this connection is dead or dying
CLOSE_SILENT = 4410  # nothing from the agent for too long

# The connection watch (settings override them; tests shorten them).
WATCH_INTERVAL_S = float(getattr(settings, "LB_AGENT_WATCH_INTERVAL_S", 1.0))
ACK_LAG_S = float(getattr(settings, "LB_AGENT_ACK_LAG_S", 10.0))
SILENCE_TIMEOUT_S = float(getattr(settings, "LB_AGENT_SILENCE_TIMEOUT_S", 30.0))

# Changes queued for one connection beyond which a single full resync replaces them.
MAX_PENDING_CHANGES = 256

# Why a connection ended, for the log and the agent API (websocket close codes).
_CLOSE_REASONS = {
    1000: "closed by the agent",
    1001: "agent going away",
    1006: "connection lost without a close frame",
    1011: "keepalive ping timeout or server error",
}


def _bearer_token(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return ""


def _peer(scope: dict[str, Any]) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"


@database_sync_to_async
def _authenticate(token: str) -> AgentNode | None:
    return AgentNode.authenticate(token)


# Off Channels' single thread-sensitive executor (the REST views' thread). Across processes,
# batches run concurrently; each status evaluation runs after its own commit, so the last one
# always sees every acknowledgement.
_record_applied_batch = database_sync_to_async(agent_sync.record_applied_batch, thread_sensitive=False)

# How long a batch waits for the other agents' acks of the same push. ACTIVE needs them all
# anyway, so waiting for the slowest delays nothing that matters.
ACK_GATHER_MAX_S = 0.1


class AckRecorder:
    """Records this process's agent acknowledgements in batches. A batch waits (at most
    ACK_GATHER_MAX_S) until every agent this process sent a document to has acknowledged it:
    four agents acknowledging one push then cost one transaction and one status evaluation
    instead of four of each, which took 40-110 ms apiece when recorded one by one on 2 CPUs."""

    def __init__(self) -> None:
        self._queue: list[tuple[AgentNode, Applied, dict[int, int] | None, int | None, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._awaited: dict[int, int] = {}  # agent id -> generation sent and not yet acknowledged
        self._arrived = asyncio.Event()

    def expect(self, agent_id: int, generation: int) -> None:
        self._awaited[agent_id] = generation

    def forget(self, agent_id: int) -> None:
        self._awaited.pop(agent_id, None)
        self._arrived.set()

    async def record(
        self, agent: AgentNode, applied: Applied, known: dict[int, int] | None, epoch: int | None = None
    ) -> dict[int, int] | None:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((agent, applied, known, epoch, future))
        if self._awaited.get(agent.pk, applied.generation + 1) <= applied.generation:
            del self._awaited[agent.pk]
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())
        return await future

    async def _gather(self) -> None:
        """Wait until no agent owes an acknowledgement of a generation already in the queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACK_GATHER_MAX_S
        while True:
            newest = max(applied.generation for _, applied, *_ in self._queue)
            if not any(generation <= newest for generation in self._awaited.values()):
                return
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _drain(self) -> None:
        while self._queue:
            await self._gather()
            batch, self._queue = self._queue, []
            started = time.perf_counter()
            try:
                results = await _record_applied_batch(
                    [(agent, applied, known, epoch) for agent, applied, known, epoch, _ in batch]
                )
            except Exception as exc:  # every waiting consumer sees the failure, as if it had recorded alone
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            logger.debug(
                "recorded %d acknowledgement(s) in %.1f ms",
                len(batch),
                (time.perf_counter() - started) * 1000,
            )
            for (*_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


_ack_recorders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AckRecorder] = (
    weakref.WeakKeyDictionary()
)


def _ack_recorder() -> AckRecorder:
    loop = asyncio.get_running_loop()
    recorder = _ack_recorders.get(loop)
    if recorder is None:
        recorder = _ack_recorders[loop] = AckRecorder()
    return recorder


# Off the thread-sensitive executor that runs the REST views: an agent's document must not
# wait behind the request that caused it.
_desired_frame_for = database_sync_to_async(desired_frame_for, thread_sensitive=False)


_agent_connected = database_sync_to_async(agent_sync.agent_connected, thread_sensitive=False)
_agent_disconnected = database_sync_to_async(agent_sync.agent_disconnected, thread_sensitive=False)
_count_sync_event = database_sync_to_async(agent_sync.count_sync_event, thread_sensitive=False)


def _read_cluster_generation() -> int:
    return PushSettings.objects.filter(pk=1).values_list("generation", flat=True).first() or 0


# Every connection asks once per watch interval: off the thread-sensitive executor as well.
_cluster_generation = database_sync_to_async(_read_cluster_generation, thread_sensitive=False)


@database_sync_to_async
def _still_authorized(agent_id: int, token_hash: str) -> bool:
    return AgentNode.objects.filter(pk=agent_id, enabled=True, token_hash=token_hash).exists()


class AgentConsumer(AsyncJsonWebsocketConsumer):
    agent: AgentNode | None = None
    hello: Hello | None = None
    sent_generation: int = -1
    # The generation of the last frame the document cache built for this agent, and the VIPs
    # that listener deltas forwarded since: what the cache's next delta must cover.
    cache_generation: int | None = None
    forwarded_vips: frozenset[int] = frozenset()
    acked: dict[int, int] | None = None  # listener -> generation this connection acknowledged
    epoch: int | None = None  # this connection's epoch (agent_sync.agent_connected)
    acked_generation: int = -1  # the newest document the agent acknowledged on this connection
    close_reason: str = ""
    closing: bool = False  # a close was sent: nothing more may be

    async def connect(self) -> None:
        token = _bearer_token(self.scope)
        agent = await _authenticate(token) if token else None
        if agent is None:
            # Never log the token; say where the refused attempt came from.
            logger.warning(
                "refused agent connection from %s: %s",
                _peer(self.scope),
                "no bearer token" if not token else "unknown, revoked or disabled token",
            )
            await self.close(code=CLOSE_UNAUTHORIZED)  # before accept: the handshake gets HTTP 403
            return
        self.agent = agent
        self._send_lock = asyncio.Lock()
        self._last_received = self._sent_at = time.monotonic()
        self._watcher: asyncio.Task | None = None
        self._changes: list[dict[str, Any]] = []  # committed changes not yet sent (state_changed)
        self._sender: asyncio.Task | None = None
        await self.accept()
        await self.channel_layer.group_add(agent_sync.agent_group(agent.pk), self.channel_name)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._hello_timeout)

    def _hello_timeout(self) -> None:
        if self.hello is None:
            self._timeout_task = asyncio.ensure_future(
                self._refuse(CLOSE_HELLO_TIMEOUT, f"no hello within {HELLO_TIMEOUT_S:g}s")
            )

    async def disconnect(self, code: int) -> None:
        if self.agent is None:
            return
        timer = getattr(self, "_hello_timer", None)
        if timer is not None:
            timer.cancel()
        for task in (self._watcher, self._sender):
            if task is not None:
                task.cancel()
        await self.channel_layer.group_discard(agent_sync.agent_group(self.agent.pk), self.channel_name)
        reason = self.close_reason or _CLOSE_REASONS.get(code, f"close code {code}")
        current = False
        if self.hello is not None:
            await self.channel_layer.group_discard(agent_sync.AGENTS_GROUP, self.channel_name)
            current = await _agent_disconnected(self.agent, self.epoch, reason)
        if current:  # a replaced connection's recorder entry belongs to the new one now
            _ack_recorder().forget(self.agent.pk)
        # A clean close is routine; anything else is a dead or killed connection worth a warning.
        level = logging.INFO if code in (1000, 1001) or not current else logging.WARNING
        logger.log(
            level, "agent %s disconnected (epoch %s, code %s): %s", self.agent.name, self.epoch, code, reason
        )

    async def _refuse(self, code: int, reason: str) -> None:
        if self.closing:
            return  # one close per connection (the server refuses a second one)
        self.closing = True
        # Nothing is sent after the close: stop this connection's background work (but not the
        # task that is closing it, e.g. the watch closing a silent connection).
        current = asyncio.current_task()
        for task in (getattr(self, "_watcher", None), getattr(self, "_sender", None)):
            if task is not None and task is not current:
                task.cancel()
        name = self.agent.name if self.agent else "?"
        logger.warning("closing agent %s connection from %s: %s", name, _peer(self.scope), reason)
        self.close_reason = reason[:200]
        await self.close(code=code, reason=reason[:120])

    # -- frames from the agent ---------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        self._last_received = time.monotonic()
        if bytes_data is not None and text_data is None:
            if len(bytes_data) > MAX_AGENT_MESSAGE_BYTES:
                await self._refuse(
                    CLOSE_TOO_BIG, f"binary frame of {len(bytes_data)} bytes exceeds the limit"
                )
            else:
                await self._refuse(CLOSE_POLICY_VIOLATION, "binary frames are not part of the protocol")
            return
        if len(text_data or "") > MAX_AGENT_MESSAGE_BYTES:
            await self._refuse(
                CLOSE_TOO_BIG,
                f"message of {len(text_data)} characters exceeds {MAX_AGENT_MESSAGE_BYTES} bytes",
            )
            return
        try:
            message = decode_agent_message(text_data or "")
        except ProtocolError as exc:
            await self._refuse(CLOSE_POLICY_VIOLATION, f"malformed message: {exc}")
            return
        if self.hello is None and not isinstance(message, Hello):
            await self._refuse(CLOSE_POLICY_VIOLATION, f"expected hello first, got {message.type}")
            return
        if isinstance(message, Hello):
            await self._on_hello(message)
        elif isinstance(message, Applied):
            started = time.perf_counter()
            if message.ok:
                self.acked_generation = max(self.acked_generation, message.generation)
            self.acked = await _ack_recorder().record(self.agent, message, self.acked, self.epoch)
            logger.debug(
                "recorded %s's ack of generation %s in %.1f ms",
                self.agent.name,
                message.generation,
                (time.perf_counter() - started) * 1000,
            )
        elif isinstance(message, Health):
            await database_sync_to_async(agent_sync.record_health)(self.agent, message)
        elif isinstance(message, Stats):
            await database_sync_to_async(agent_sync.touch_agent)(
                self.agent.pk, last_stats=dict(message.counters)
            )

    async def _on_hello(self, hello: Hello) -> None:
        if self.hello is not None:
            await self._refuse(CLOSE_POLICY_VIOLATION, "second hello on one connection")
            return
        if hello.node != self.agent.name or hello.role != self.agent.role:
            await self._refuse(
                CLOSE_WRONG_NODE,
                f"token belongs to {self.agent.role} {self.agent.name!r}, "
                f"hello says {hello.role} {hello.node!r}",
            )
            return
        self.hello = hello
        self._hello_timer.cancel()
        # Before the epoch exists, so no ack of this connection can be recorded under an older one.
        self.epoch = await _agent_connected(self.agent, hello.version, hello, _peer(self.scope))
        if hello.listeners is not None:
            self.acked = dict(hello.listeners)  # what the rows now say: the base of the next ack
        logger.info(
            "agent %s (%s, lbagent %s) connected from %s, epoch %s, running generation %s",
            hello.node,
            hello.role,
            hello.version,
            _peer(self.scope),
            self.epoch,
            hello.applied_generation,
        )
        # Older connections of this agent (in any web worker) close themselves.
        await self.channel_layer.group_send(
            agent_sync.agent_group(self.agent.pk), {"type": "agent.replaced", "epoch": self.epoch}
        )
        await self.channel_layer.group_add(agent_sync.AGENTS_GROUP, self.channel_name)
        await self._send_desired()  # reconnect means full resync
        self._watcher = asyncio.ensure_future(self._watch())
        self._watcher.add_done_callback(self._background_done)

    async def _watch(self) -> None:
        """Repair what no message will: a dropped notification, a lagging agent, a dead peer."""
        # (cluster generation committed but unsent at the previous tick, when it was seen)
        behind: tuple[int, float] | None = None
        resent_for = -1
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            if now - self._last_received > SILENCE_TIMEOUT_S:
                await self._refuse(
                    CLOSE_SILENT, f"nothing received for {SILENCE_TIMEOUT_S:g}s: connection presumed dead"
                )
                return
            cluster = await _cluster_generation()
            busy = bool(self._changes) or (self._sender is not None and not self._sender.done())
            if cluster > self.sent_generation and not busy:
                # Committed but not sent. Its notification may still be on its way: only a
                # generation that was already committed at the previous tick and is still
                # unsent now was dropped (under a stream of changes there is nearly always a
                # newer one in flight, which proves nothing).
                if behind is not None and self.sent_generation < behind[0]:
                    logger.warning(
                        "agent %s missed the notification of generation %s (sent %s): none arrived "
                        "within %.1fs of its commit (dropped by the channel layer, or late); resyncing",
                        self.agent.name,
                        behind[0],
                        self.sent_generation,
                        now - behind[1],
                    )
                    await _count_sync_event(self.agent.pk, "missed_notifications")
                    await self._send_desired()
                    behind = None
                else:
                    behind = (cluster, now)
                continue
            behind = None
            lagging = self.acked_generation < self.sent_generation and now - self._sent_at > ACK_LAG_S
            if lagging and resent_for != self.sent_generation:
                resent_for = self.sent_generation
                logger.warning(
                    "agent %s has not acknowledged generation %s for %.0fs (last ack %s): re-sending "
                    "its full state",
                    self.agent.name,
                    self.sent_generation,
                    now - self._sent_at,
                    self.acked_generation,
                )
                await _count_sync_event(self.agent.pk, "lag_resends")
                await self._send_desired(force=True)

    # -- messages from the channel layer ------------------------------------------------------

    async def state_changed(self, event: dict[str, Any]) -> None:
        """A change was committed. Queued for this connection's sender task and the handler
        returns at once, so the channel drains as fast as messages arrive and cannot overflow
        while a slow send is in progress: a burst of changes coalesces into what is pending."""
        if self.hello is None or event.get("generation", 0) <= self.sent_generation:
            return
        if len(self._changes) >= MAX_PENDING_CHANGES:
            self._changes = [{"generation": event["generation"]}]  # too many: one full resync covers them
        else:
            self._changes.append(event)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_changes())
            self._sender.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        """A background task of this connection (sender, watch) failed: log it and close the
        connection, so the agent reconnects and resyncs instead of silently missing changes."""
        if task.cancelled() or task.exception() is None or self.closing:
            return
        if isinstance(task.exception(), OSError):  # uvicorn's ClientDisconnected: the peer is gone
            logger.info("agent %s connection went away while sending: %s", self.agent.name, task.exception())
            return
        logger.error(
            "agent %s connection task failed; closing the connection for a resync",
            self.agent.name,
            exc_info=task.exception(),
        )
        self._closing = asyncio.ensure_future(self._refuse(1011, "internal error; reconnect to resync"))

    async def _send_changes(self) -> None:
        while self._changes and not self.closing:
            changes, self._changes = sorted(self._changes, key=lambda e: e["generation"]), []
            for event in changes:
                if event["generation"] <= self.sent_generation:
                    continue  # a document sent meanwhile already covers it
                if not await self._forward(event.get("delta"), event["generation"]):
                    await self._send_desired()  # the cache covers everything committed so far

    async def _forward(self, delta: dict[str, Any] | None, generation: int) -> bool:
        """Forward the change's own delta if the agent holds exactly its base."""
        if delta is None or delta["base"] != self.sent_generation:
            return False
        async with self._send_lock:
            if self.closing:
                return True  # nothing to send on a closing connection, and nothing to resync
            if delta["base"] != self.sent_generation:  # something else was sent meanwhile
                return False
            self.sent_generation = generation
            self._sent_at = time.monotonic()
            self.forwarded_vips = self.forwarded_vips | frozenset(delta["vips"])
            _ack_recorder().expect(self.agent.pk, self.sent_generation)
            await self.send(text_data=splice_node(delta, self.agent.name))
            logger.debug("forwarded generation %s to %s", self.sent_generation, self.agent.name)
            return True

    async def agent_replaced(self, event: dict[str, Any]) -> None:
        if self.epoch is not None and event["epoch"] > self.epoch:
            await self._refuse(
                CLOSE_REPLACED, f"agent connected again (epoch {event['epoch']}); this connection is dead"
            )

    async def agent_recheck(self, event: dict[str, Any]) -> None:
        if self.agent is not None and not await _still_authorized(self.agent.pk, self.agent.token_hash):
            await self._refuse(CLOSE_UNAUTHORIZED, "token revoked or agent disabled")

    async def _send_desired(self, *, force: bool = False) -> None:
        """The next document (a delta from the cache when possible); `force`: the full state even
        if nothing new was committed (an agent that lost or ignored what it was sent)."""
        async with self._send_lock:  # one document at a time, newest last
            started = time.perf_counter()
            generation, frame = await _desired_frame_for(
                self.agent,
                None if force else self.cache_generation,  # None: the full state
                base=self.sent_generation,
                extra_vips=self.forwarded_vips,
            )
            if (generation <= self.sent_generation and not force) or self.closing:
                return
            self.sent_generation = self.cache_generation = generation
            self._sent_at = time.monotonic()
            self.forwarded_vips = frozenset()
            _ack_recorder().expect(self.agent.pk, generation)
            built = time.perf_counter()
            await self.send(text_data=frame)
            logger.debug(
                "sent generation %s to %s: %d bytes, built in %.1f ms, sent in %.1f ms",
                generation,
                self.agent.name,
                len(frame),
                (built - started) * 1000,
                (time.perf_counter() - built) * 1000,
            )
