"""Acceptance of issue 15, "a status that cannot stick", with real processes: the portal under
uvicorn and two `lbagent` agent processes, each behind a proxy that kills its connection the way
a network fault does while the agent acknowledges a stream of REST changes (the portal's side
stays open and receives the agent's last acknowledgements late, after the agent reconnected).

Two layouts: the embedded one (SQLite, in-memory channel layer, one process) and the production
one (PostgreSQL, Redis channel layer, uvicorn with two workers, so the old and the new connection
may live in different processes). After the changes stop, every listener must be ACTIVE, and
every agent must really run each listener's current table, within 5 s (the issue's acceptance
figure), in each of 20 repetitions. A second test overflows the agents' channels (capacity 1, the
worker holding them frozen while changes commit): the listeners still end ACTIVE.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.environment import need
from tests.push.stack import (
    AgentProcess,
    ChangeStream,
    CuttableProxy,
    PortalServer,
    api_call,
    seed_layout,
    seed_sqlite_layout,
    unsettled_listeners,
    wait_settled,
)
from tests.services import database_url_for_test_db, redis_answers, wait_until

# django_db: pytest-django then points the connection (and its pool) at the test database.
pytestmark = [pytest.mark.slow, pytest.mark.django_db]

REPETITIONS = 20
SETTLE_BUDGET_S = 5.0  # the acceptance: every listener ACTIVE within 5 s of the last change
START_TIMEOUT_S = 60.0  # first start on a loaded 2-core machine: generous, it is not what we test


@dataclass
class Layout:
    name: str
    portal: PortalServer
    agents: dict[str, AgentProcess]
    proxies: dict[str, CuttableProxy]
    keys: dict[str, str]
    listeners: dict[int, str]  # listener id -> the role that may change it
    query: Callable[[str], list[tuple]]
    host_token: str
    settle_times: list[float] = field(default_factory=list)

    def api(self, role: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return api_call(self.portal.http_url, self.keys[role], method, path, body)

    def statuses(self) -> dict[int, tuple[str, int]]:
        """listener id -> (provisioning_status, current table number), from the database."""
        rows = self.query(
            "SELECT l.id, l.provisioning_status, t.number FROM loadbalancing_listener l "
            "JOIN loadbalancing_listenertable t ON t.listener_id = l.id"
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    def unsettled(self) -> list[str]:
        """What is not yet true: listeners not ACTIVE, agents not running a listener's table."""
        return unsettled_listeners(
            {lid: (status, number, None) for lid, (status, number) in self.statuses().items()}, self.agents
        )


def _start_agents(layout_dir: Path, portal: PortalServer, tokens: dict[str, str]) -> tuple[dict, dict]:
    agents, proxies = {}, {}
    for name, token in tokens.items():
        proxies[name] = CuttableProxy(portal.port)
        agents[name] = AgentProcess(
            name, token, portal, layout_dir, url=f"ws://127.0.0.1:{proxies[name].port}/ws/agents/"
        )
        agents[name].start()
    return agents, proxies


def _stop_all(agents: dict, proxies: dict, portal: PortalServer | None) -> None:
    for agent in agents.values():
        agent.stop()
    for proxy in proxies.values():
        proxy.close()
    if portal is not None:
        portal.stop()


def _wait_converged(layout: Layout, timeout_s: float, what: str) -> float:
    """Until nothing is unsettled; returns how long it took (fails naming what was left)."""
    return wait_settled(layout.unsettled, timeout_s, f"{layout.name}: {what}", layout.portal.log)


def _portal_env(extra: dict[str, str]) -> dict[str, str]:
    from django.conf import settings

    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        {
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "DATACENTER_EMBEDDED_WORKER": "0",
            "PYTHONPATH": str(settings.BASE_DIR),
            "LB_AGENT_WATCH_INTERVAL_S": "0.5",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[Layout]:
    workdir = tmp_path_factory.mktemp("embedded")
    database = workdir / "db.sqlite3"
    seeded = seed_sqlite_layout(database)
    env = _portal_env({"DATABASE_URL": f"sqlite:///{database}"})
    env.pop("REDIS_URL", None)  # no Redis: the in-memory channel layer, as `make run` has it
    portal = PortalServer(env=env, workdir=workdir)
    agents: dict = {}
    proxies: dict = {}
    try:
        portal.start()
        agents, proxies = _start_agents(workdir, portal, seeded["tokens"])

        def query(sql: str) -> list[tuple]:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=20) as db:
                return db.execute(sql).fetchall()

        yield _layout("embedded (SQLite, in-memory layer)", portal, agents, proxies, seeded, query)
    finally:
        _stop_all(agents, proxies, portal)


@pytest.fixture(scope="module")
def production(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Layout]:
    import psycopg
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    need(redis_answers(getattr(settings, "REDIS_URL", None)), "needs Redis (REDIS_URL; `make services`)")
    need(
        connection.vendor == "postgresql", "needs PostgreSQL (DATABASE_URL) shared with the portal processes"
    )
    workdir = tmp_path_factory.mktemp("production")
    url = database_url_for_test_db()
    agents: dict = {}
    proxies: dict = {}
    portal = None
    with django_db_blocker.unblock():
        try:
            seeded = seed_layout()
            env = _portal_env({"DATABASE_URL": url, "REDIS_URL": settings.REDIS_URL})
            portal = PortalServer(env=env, workdir=workdir, workers=2)
            portal.start()
            agents, proxies = _start_agents(workdir, portal, seeded["tokens"])

            def query(sql: str) -> list[tuple]:
                with psycopg.connect(url, autocommit=True) as db:
                    return db.execute(sql).fetchall()

            yield _layout("PostgreSQL, Redis, 2 uvicorn workers", portal, agents, proxies, seeded, query)
        finally:
            _stop_all(agents, proxies, portal)
            call_command("flush", interactive=False, verbosity=0)  # leave no rows for later tests


def _layout(name, portal, agents, proxies, seeded, query) -> Layout:
    listeners = {lid: "a_member" for lid in seeded["listeners_a"]}
    listeners[seeded["listener_b"]] = "b_member"
    layout = Layout(name, portal, agents, proxies, seeded["keys"], listeners, query, seeded["host_token"])
    _wait_converged(layout, START_TIMEOUT_S, "start-up")
    return layout


def _kill_connections_while_acknowledging(layout: Layout) -> None:
    names = sorted(layout.agents)
    for repetition in range(REPETITIONS):
        # Vary when the dead connection's last frames arrive: before, around and after the
        # agent's new hello reaches the portal.
        for proxy in layout.proxies.values():
            proxy.late_s = (0.1, 0.3, 0.5, 1.0)[repetition % 4]
        victims = names if repetition % 5 == 4 else [names[repetition % len(names)]]
        with ChangeStream(layout.api, layout.listeners, tag=9) as stream:
            stream.wait_for_changes(3)
            for name in victims:
                assert layout.proxies[name].cut() >= 1, f"{name} had no connection to cut"
            stream.wait_for_changes(stream.count(ok=True) + 6)
        assert not stream.failures(), stream.failures()[:3]
        layout.settle_times.append(
            _wait_converged(layout, SETTLE_BUDGET_S, f"repetition {repetition + 1} (cut {victims})")
        )
    # The cuts happened and the portal saw the dead connections for what they were.
    assert sum(proxy.cuts for proxy in layout.proxies.values()) >= REPETITIONS
    log = layout.portal.log()
    assert "while its previous connection" in log, "no replaced connection was detected and logged"
    assert "Traceback" not in log, log[-4000:]


def test_embedded_every_listener_active_within_5s_after_connections_killed_under_changes(embedded) -> None:
    _kill_connections_while_acknowledging(embedded)
    print(f"\n{embedded.name}: settle times {[round(t, 2) for t in embedded.settle_times]}")


def test_production_every_listener_active_within_5s_after_connections_killed_under_changes(
    production,
) -> None:
    _kill_connections_while_acknowledging(production)
    print(f"\n{production.name}: settle times {[round(t, 2) for t in production.settle_times]}")


def _workers_holding_agent_connections(port: int) -> dict[int, int]:
    """uvicorn worker pid -> established connections it holds on the portal's port (between
    changes, these are the agents' websockets: the tests' REST calls do not keep theirs open)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    held: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        held[int(pid)] = held.get(int(pid), 0) + 1
    return held


def test_overflowed_agent_channels_still_end_active(production) -> None:
    """Channel capacity 1, and the worker process that holds agents' connections frozen (SIGSTOP)
    so nothing drains their channels while changes are committed through the other worker: the
    next notifications overflow (channels_redis drops them and the portal logs it at WARNING).
    Once the worker runs again, its consumers see the document counter ahead of what they sent
    and resync, so every listener still ends ACTIVE. The consumers never block on a send, so
    without the freeze the overflow would depend on the machine being slow at the right moment."""
    portal = production.portal
    portal.stop()
    portal.env = {**portal.env, "CHANNEL_LAYER_CAPACITY": "1", "LB_AGENT_ACK_LAG_S": "2"}
    portal.start()
    _wait_converged(production, START_TIMEOUT_S, "reconnect after the restart with capacity 1")
    listener_id, role = next(iter(production.listeners.items()))
    changes = 0
    # A worker whose connections' consumers have not joined the agents' group yet (their hello is
    # still being handled) receives no notification, so its channel cannot overflow: then the
    # attempt is repeated once everything settled. The overflow must happen in one of them.
    for attempt in range(1, 6):
        # Converged proves the tables, not the connections: the agents may still be in their
        # reconnect backoff after the restart. Wait until every one of them is connected again.
        def all_connected() -> dict[int, int] | None:
            now = _workers_holding_agent_connections(portal.port)
            return now if sum(now.values()) >= len(production.agents) else None

        held = wait_until(all_connected, timeout_s=START_TIMEOUT_S, what="every agent connected again")
        frozen = max(held, key=held.get)
        tried = 0
        os.kill(frozen, signal.SIGSTOP)
        try:
            while "channels over capacity in group lb.agents" not in portal.log() and tried < 6:
                tried += 1
                changes += 1
                backends = [
                    {"address": f"10.8.{changes}.{i + 1}", "port": 8000 + i} for i in range(1 + changes % 3)
                ]
                code, body = production.api(
                    role, "PUT", f"/api/listeners/{listener_id}/backends/", {"backends": backends}
                )
                assert code == 200, (code, body)
        finally:
            os.kill(frozen, signal.SIGCONT)
        if "channels over capacity in group lb.agents" in portal.log():
            break
        _wait_converged(production, START_TIMEOUT_S, f"attempt {attempt}: no overflow, everything settles")
    else:
        pytest.fail(f"{changes} changes in 5 attempts, each with a worker frozen, never overflowed a channel")
    assert "WARNING channels_redis.core" in portal.log()  # counted where operators look
    _wait_converged(
        production, SETTLE_BUDGET_S, f"after {changes} change(s) that overflowed a frozen worker's channel"
    )


def test_an_agent_that_does_not_acknowledge_is_resent_its_full_state(production) -> None:
    """(After the overflow test: its portal runs with LB_AGENT_ACK_LAG_S=2.) A host agent that
    receives its state and never acknowledges it is sent the full state again, once, and the
    portal says why; a connection's consumer does not give up on a silent-but-alive agent."""
    import asyncio

    from websockets.asyncio.client import connect

    async def silent_agent() -> tuple[dict, dict, float]:
        async with connect(
            production.portal.ws_url,
            additional_headers={"Authorization": f"Bearer {production.host_token}"},
            max_size=16 * 1024 * 1024,
            proxy=None,
        ) as ws:
            hello = {"type": "hello", "protocol": 1, "node": "host-1", "role": "host", "version": "0.1.0"}
            await ws.send(json.dumps({**hello, "applied_generation": None, "listeners": {}}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 60))
            sent = time.monotonic()
            again = json.loads(await asyncio.wait_for(ws.recv(), 60))  # no ack from us: a re-send
            return first, again, time.monotonic() - sent

    first, again, after_s = asyncio.run(silent_agent())
    assert first["type"] == "desired"
    assert again["type"] == "desired"  # the full state, not a delta
    assert again["state"]["generation"] >= first["state"]["generation"]
    assert after_s >= 2 * 0.9  # not before the configured lag (the clock of another process)
    log = production.portal.log()
    assert "agent host-1 has not acknowledged generation" in log
    assert "re-sending its full state" in log
