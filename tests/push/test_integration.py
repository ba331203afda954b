"""Acceptance of the portal -> agent push, end to end with real processes: the portal under
uvicorn with the Redis channel layer and PostgreSQL, two `lbagent` agent processes (portal client
with the in-process table driver) connected over websockets, tenants calling the REST API.

The module shares one portal and two agents (starting them costs seconds); tests run in file
order and each leaves the stack running and converged for the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.environment import need
from tests.push.stack import AgentProcess, PortalServer
from tests.services import database_url_for_test_db, redis_answers, wait_until

# `django_db` (not transactional) gives each test a rolled-back transaction for its own reads; the
# stack's rows are committed by the module fixture so the portal process sees them, and a test
# that must commit a change does it on a connection of its own (committed_in_own_connection).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]

# A generous bound on each event, not a speed goal: bench/propagation.py measures the time from the
# REST call to ACTIVE (issue 4's 1 s figure is recorded there, p50 ~50 ms on the idle machine).
EVENT_BOUND_S = 60.0


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    """Wait for an event of the push path: polled every 20 ms, bounded by EVENT_BOUND_S."""
    return wait_until(condition, timeout_s=EVENT_BOUND_S, what=what, interval_s=0.02)


class TcpService:
    """A TCP backend on loopback that accepts and closes connections; stop() makes it refuse."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # the listening socket was closed: the service is down
            conn.close()

    def stop(self) -> None:
        self.sock.close()
        self._thread.join(timeout=5)


@dataclass
class Stack:
    portal: PortalServer
    agents: dict[str, AgentProcess]
    keys: dict[str, str]
    world: Any
    host_agent_token: str

    def api(self, role: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (a loopback http URL built here)
            self.portal.http_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Token {self.keys[role]}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback URL we built)
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def status_tree(self, vip_id: int) -> dict:
        code, body = self.api("a_viewer", "GET", f"/api/vips/{vip_id}/status/")
        assert code == 200, body
        return body

    def listener_status(self, listener_id: int) -> str:
        from datacenter.loadbalancing.models import Listener

        return Listener.objects.values_list("provisioning_status", flat=True).get(pk=listener_id)


def committed_in_own_connection(work: Callable[[], Any]) -> Any:
    """Run ORM work in a thread (its own connection, autocommit), outside the test's transaction."""
    from django.db import connection

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # handed to the test thread below
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Stack]:
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test import override_settings

    need(
        redis_answers(getattr(settings, "REDIS_URL", None)),
        "needs Redis (REDIS_URL set and answering; `make services` starts it)",
    )
    need(connection.vendor == "postgresql", "needs PostgreSQL (DATABASE_URL) shared with the portal process")
    from datacenter.testing import build_world, new_agent

    workdir = tmp_path_factory.mktemp("push")
    portal = agents = None
    with django_db_blocker.unblock():
        try:
            with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
                world = build_world()
            # Maglev builds at the default M=65537 cost the table driver ~0.3-0.6 s per changed listener
            # on this machine (lbagent core's cost, measured in bench/propagation.py); the push path is
            # what these tests time, so the cluster uses a smaller prime table.
            from datacenter.loadbalancing.desired_state import push_settings

            cluster = push_settings()
            cluster.table_size = 4093
            cluster.save()
            tokens = {}
            for name in ("mux-a", "mux-b"):
                _, tokens[name] = new_agent(name, world.host_shared, f"10.0.0.{2 if name == 'mux-a' else 3}")
            _, host_token = new_agent("host-1", world.host_shared, None, role="host")
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            env.update(
                {
                    "DATABASE_URL": database_url_for_test_db(),
                    "REDIS_URL": settings.REDIS_URL,
                    "DJANGO_SECRET_KEY": settings.SECRET_KEY,
                    "DATACENTER_EMBEDDED_WORKER": "0",
                    "PYTHONPATH": str(settings.BASE_DIR),
                }
            )
            portal = PortalServer(env=env, workdir=workdir)
            portal.start()
            agents = {name: AgentProcess(name, token, portal, workdir) for name, token in tokens.items()}
            for agent in agents.values():
                agent.start()
            stack = Stack(
                portal=portal, agents=agents, keys=world.keys, world=world, host_agent_token=host_token
            )
            wait_for(
                lambda: stack.listener_status(world.listener_a.pk) == "active",
                "the demo listener to become ACTIVE on both agents",
            )
            # Warm the server (first requests import the API stack) so tests time the push, not that.
            _replace(
                stack, world.listener_b.pk, [{"address": "10.2.0.5", "port": 8443, "weight": 2}], "b_member"
            )
            wait_for(lambda: stack.listener_status(world.listener_b.pk) == "active", "warm-up change")
            yield stack
        finally:
            for agent in (agents or {}).values():
                agent.stop()
            if portal is not None:
                portal.stop()
            call_command("flush", interactive=False, verbosity=0)  # leave no rows for later tests


def _replace(stack: Stack, listener_id: int, backends: list[dict], role: str = "a_member") -> dict:
    code, body = stack.api(role, "PUT", f"/api/listeners/{listener_id}/backends/", {"backends": backends})
    assert code == 200, body
    return body


def _loopback_backends(listener_id: int, ports: list[int]) -> None:
    from django.db import transaction

    from datacenter.loadbalancing import services
    from datacenter.loadbalancing.models import Backend, Listener

    with transaction.atomic():
        listener = Listener.objects.select_for_update().get(pk=listener_id)
        for position, port in enumerate(ports):
            Backend.objects.create(listener=listener, position=position, address="127.0.0.1", port=port)
        services.new_generation(listener)


def _applied_addresses(agent: AgentProcess, listener_id: int) -> list[tuple[str, int, str]] | None:
    listener = agent.listener(listener_id)
    if listener is None:
        return None
    return [(b["address"], b["port"], b["state"]) for b in listener["backends"]]


def test_replaced_backends_reach_both_agents_and_listener_becomes_active(stack) -> None:
    listener_id = stack.world.listener_a.pk
    wanted = [{"address": "10.1.0.7", "port": 8080}, {"address": "10.1.0.8", "port": 8080, "weight": 3}]
    started = time.monotonic()
    _replace(stack, listener_id, wanted)
    answered = time.monotonic() - started
    expected = [("10.1.0.7", 8080, "active"), ("10.1.0.8", 8080, "active")]
    wait_for(
        lambda: all(_applied_addresses(a, listener_id) == expected for a in stack.agents.values()),
        "both agents to apply the new backends",
    )
    applied = time.monotonic() - started
    wait_for(lambda: stack.listener_status(listener_id) == "active", "listener ACTIVE")
    elapsed = time.monotonic() - started
    print(
        f"\nAPI call to ACTIVE took {elapsed:.3f} s (API answered after {answered:.3f} s, "
        f"both agents applied after {applied:.3f} s)"
    )
    tree = stack.status_tree(stack.world.vip_a.pk)
    listener = next(li for li in tree["listeners"] if li["id"] == listener_id)
    assert {a["agent"]: a["status"] for a in listener["agents"]} == {"mux-a": "active", "mux-b": "active"}
    assert listener["draining_until"] is not None  # the old table stays until the drain deadline


def test_offline_agent_is_pending_until_it_reconnects_and_resyncs(stack) -> None:
    listener_id = stack.world.listener_a.pk
    mux_b = stack.agents["mux-b"]
    mux_b.stop()
    try:
        _replace(stack, listener_id, [{"address": "10.1.0.9", "port": 8080}])
        wait_for(
            lambda: _applied_addresses(stack.agents["mux-a"], listener_id) == [("10.1.0.9", 8080, "active")],
            "mux-a to apply",
        )

        def mux_a_recorded() -> tuple[dict, dict] | None:
            tree = stack.status_tree(stack.world.vip_a.pk)
            listener = next(li for li in tree["listeners"] if li["id"] == listener_id)
            by_agent = {a["agent"]: a["status"] for a in listener["agents"]}
            return (tree, listener) if by_agent.get("mux-a") == "active" else None

        tree, listener = wait_for(mux_a_recorded, "the portal to record mux-a's acknowledgement")
        assert {a["agent"]: a["status"] for a in listener["agents"]} == {
            "mux-a": "active",
            "mux-b": "pending",
        }
        assert listener["provisioning_status"] == "pending_update"
        assert {a["name"]: a["connected"] for a in tree["agents"]}["mux-b"] is False
    finally:
        mux_b.start()
    wait_for(lambda: stack.listener_status(listener_id) == "active", "ACTIVE after mux-b resynced")
    assert _applied_addresses(mux_b, listener_id) == [("10.1.0.9", 8080, "active")]


def _reconnects(agent: AgentProcess) -> int:
    return agent.log().count("lbagent.portal reconnecting to the portal in ")


def test_portal_restart_does_not_interrupt_agents_and_they_resync(stack) -> None:
    from datacenter.loadbalancing import services
    from datacenter.loadbalancing.models import Listener

    listener_id = stack.world.listener_a.pk
    before = {name: agent.applied() for name, agent in stack.agents.items()}
    retries = {name: _reconnects(agent) for name, agent in stack.agents.items()}
    stack.portal.stop()
    try:
        # Fail static is checked once every agent has noticed the portal gone and tried again.
        wait_for(lambda: all(_reconnects(a) > retries[n] for n, a in stack.agents.items()),
                 "both agents to retry the stopped portal")
        for name, agent in stack.agents.items():
            assert agent.alive(), f"{name} exited when the portal went away:\n{agent.log()[-2000:]}"
            assert agent.applied() == before[name]  # fail static: still running the same state
        # A change while the portal is down (an operator working on the database directly).
        committed_in_own_connection(
            lambda: services.replace_backends(
                Listener.objects.get(pk=listener_id), [{"address": "10.1.0.10", "port": 8080}]
            )
        )
    finally:
        stack.portal.start()
    expected = [("10.1.0.10", 8080, "active")]
    wait_for(
        lambda: all(_applied_addresses(a, listener_id) == expected for a in stack.agents.values()),
        "both agents to resync after the portal restart",
    )
    wait_for(lambda: stack.listener_status(listener_id) == "active", "ACTIVE after the restart")
    assert "reconnecting to the portal" in stack.agents["mux-a"].log()


async def _ws_session(url: str, token: str, frames: list[str]) -> tuple[int | None, str]:
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        proxy=None,
        max_size=None,
        open_timeout=5,
    ) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason or ""


def test_bad_and_revoked_tokens_are_refused(stack) -> None:
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(_ws_session(stack.portal.ws_url, "dca_not-a-real-token", []))
    assert refused.value.response.status_code == 403
    assert "refused agent connection" in stack.portal.log()

    from datacenter.loadbalancing.models import AgentNode

    mux_b = stack.agents["mux-b"]
    node = AgentNode.objects.get(name="mux-b")
    code, body = stack.api("operator", "POST", f"/api/agent-nodes/{node.pk}/rotate-token/")
    assert code == 200, body
    wait_for(lambda: "check the agent token" in mux_b.log(), "mux-b to be disconnected and refused")
    assert "token revoked or agent disabled" in stack.portal.log()
    mux_b.stop()
    mux_b.token = body["token"]
    mux_b.start()
    wait_for(lambda: AgentNode.objects.get(name="mux-b").sync.connected, "mux-b back with its new token")


def test_malformed_and_oversized_messages_close_with_a_logged_reason(stack) -> None:
    hello = json.dumps({"type": "hello", "protocol": 1, "node": "host-1", "role": "host", "version": "t"})
    url, token = stack.portal.ws_url, stack.host_agent_token
    code, reason = asyncio.run(
        _ws_session(url, token, [hello, '{"type": "applied", "protocol": 1, "generation"'])
    )
    assert code == 1008
    assert "not valid JSON" in reason
    code, reason = asyncio.run(
        _ws_session(url, token, [hello, json.dumps({"type": "stats", "protocol": 1, "pad": "x" * 2_000_000})])
    )
    assert code == 1009
    code, reason = asyncio.run(_ws_session(url, token, ['{"type": "stats", "protocol": 1, "counters": {}}']))
    assert (code, reason) == (1008, "expected hello first, got stats")
    impostor = json.dumps({"type": "hello", "protocol": 1, "node": "mux-a", "role": "mux", "version": "t"})
    code, reason = asyncio.run(_ws_session(url, token, [impostor]))
    assert code == 4403  # host-1's token cannot speak for mux-a
    assert "token belongs to host 'host-1'" in reason
    log = stack.portal.log()
    assert "malformed message" in log
    assert "exceeds" in log
    # The portal is still serving the real agents.
    listener_id = stack.world.listener_a.pk
    _replace(stack, listener_id, [{"address": "10.1.0.11", "port": 8080}])
    wait_for(lambda: stack.listener_status(listener_id) == "active", "ACTIVE after the bad clients")


def test_unhealthy_backend_leaves_the_table_and_returns(stack) -> None:
    services = [TcpService(), TcpService(), TcpService()]
    try:
        code, listener = stack.api(
            "a_member",
            "POST",
            "/api/listeners/",
            {
                "vip": stack.world.vip_a.pk,
                "protocol": "tcp",
                "port": 9000,
                "drain_timeout_s": 5,
                "health_check": {"kind": "tcp", "interval_s": 1, "timeout_s": 1, "rise": 1, "fall": 1},
            },
        )
        assert code == 201, listener
        listener_id = listener["id"]
        # The API (rightly) refuses loopback backends, and tests may only send traffic to 127/8:
        # write the rows the way replace_backends does, without its address rules.
        committed_in_own_connection(lambda: _loopback_backends(listener_id, [s.port for s in services]))
        all_up = [("127.0.0.1", s.port, "active") for s in services]
        wait_for(
            lambda: all(_applied_addresses(a, listener_id) == all_up for a in stack.agents.values()),
            "agents to run the health-checked listener",
        )
        services[1].stop()
        one_down = [all_up[0], ("127.0.0.1", services[1].port, "disabled"), all_up[2]]
        wait_for(
            lambda: all(_applied_addresses(a, listener_id) == one_down for a in stack.agents.values()),
            "the stopped backend to leave every agent's table",
        )
        for agent in stack.agents.values():
            # The same transition path as a tenant's change: the old table stays for the drain, so
            # connections to the other backends keep their buckets (flows in moved buckets keep
            # their old backend until the deadline).
            previous = agent.listener(listener_id)["previous"]
            assert [(b["address"], b["port"], b["state"]) for b in previous["backends"]] == all_up
        tree = stack.status_tree(stack.world.vip_a.pk)
        node = next(li for li in tree["listeners"] if li["id"] == listener_id)
        assert node["operating_status"] == "degraded"
        assert [b["health"] for b in node["backends"]] == ["healthy", "unhealthy", "healthy"]
        assert node["backends"][1]["in_table"] is False
        services[1] = TcpService(services[1].port)
        wait_for(
            lambda: all(_applied_addresses(a, listener_id) == all_up for a in stack.agents.values()),
            "the backend to return when its service does",
        )
        wait_for(
            lambda: stack.status_tree(stack.world.vip_a.pk)["listeners"][-1]["operating_status"] == "online",
            "operating status online",
        )
    finally:
        for service in services:
            service.stop()


def test_concurrent_changes_from_many_clients_converge_on_every_agent(stack) -> None:
    """Listener changes travel as deltas carried by the channel message, anything else through
    the document cache; under concurrent requests (and a VIP created among them, which takes the
    cache path) every agent must end up running exactly the portal's document."""
    from concurrent.futures import ThreadPoolExecutor

    from datacenter.loadbalancing.desired_state import build_common_document
    from datacenter.loadbalancing.models import Listener
    from lbagent.state import parse_state

    listeners = [stack.world.listener_a.pk, stack.world.listener_b.pk]

    def change(index: int) -> None:
        if index == 6:
            vip = {"tenant": stack.world.tenant_a.pk, "pool": stack.world.pool.pk, "name": "burst"}
            code, body = stack.api("a_admin", "POST", "/api/vips/", vip)
            assert code == 201, body
            return
        listener_id, port, role = (
            (listeners[0], 8080, "a_member") if index % 2 else (listeners[1], 8443, "b_member")
        )
        _replace(
            stack, listener_id, [{"address": f"10.9.{index}.{n + 1}", "port": port} for n in range(2)], role
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(change, range(13)))

    def converged() -> bool:
        document = build_common_document()
        states = {name: agent.applied() for name, agent in stack.agents.items()}
        return all(
            state is not None
            and parse_state({**document, "node": name, "generation": state["generation"]})
            == parse_state(state)
            for name, state in states.items()
        )

    wait_for(converged, "every agent to run the portal's document")
    wait_for(
        lambda: (
            set(Listener.objects.filter(pk__in=listeners).values_list("provisioning_status", flat=True))
            == {"active"}
        ),
        "the changed listeners ACTIVE",
    )


def test_idle_connections_stay_up_and_the_portal_logged_no_crash(stack) -> None:
    from datacenter.loadbalancing.models import AgentNode

    connects_before = {name: agent.log().count("connected to ") for name, agent in stack.agents.items()}
    time.sleep(6.5)  # longer than channels_redis' 5 s blocking read (django/channels_redis#422)
    assert {
        name: agent.log().count("connected to ") for name, agent in stack.agents.items()
    } == connects_before
    assert all(AgentNode.objects.get(name=name).sync.connected for name in stack.agents)
    assert "Exception in ASGI application" not in stack.portal.log()
    assert "Traceback" not in "".join(agent.log() for agent in stack.agents.values())
