"""Every websocket route through the real ASGI server: uvicorn in its own process on an ephemeral
port, Channels on Redis, the test database. The in-process communicator tests skip the server's
handshake, the Origin guard, session cookies and the Redis layer between processes; these don't.

Routes: /ws/agents/ (an agent's bearer token), /ws/p2v/jobs/<id>/ and /ws/dashboard/ (a session).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from datacenter.events.models import Event
from datacenter.inventory.models import Host
from datacenter.loadbalancing.agent_sync import OPERATORS_GROUP
from datacenter.loadbalancing.desired_state import desired_state_object
from datacenter.routing import websocket_urlpatterns
from datacenter.testing import new_agent
from lbagent.protocol import Hello, decode_portal_message, encode
from p2v.conversion import services as conversion_services
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.models import Assessment, Machine
from tests.services import database_url_for_test_db, wait_until

# pytest-django creates the test database only for sessions with a test that asks for it; each
# test's own transaction is rolled back, the server sees only what `committed` wrote.
pytestmark = pytest.mark.django_db

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60.0  # generous: the machine is shared and slow; every wait ends at the event


def _route_paths() -> set[str]:
    return {str(pattern.pattern) for pattern in websocket_urlpatterns}


@pytest.fixture(scope="module")
def committed(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[dict]:
    """Objects the server process must see: committed, and removed after the module."""
    if not settings.REDIS_URL:
        pytest.fail("these tests need REDIS_URL (the server and the test talk through Redis)")
    with django_db_blocker.unblock():
        host = Host.objects.create(name="ws-lb-1", management_address="10.9.0.2", roles=["lb-node"])
        agent, token = new_agent("ws-mux-1", host, "10.9.0.2")
        operator = get_user_model().objects.create_user("ws-operator", password="x", is_staff=True)
        machine = Machine.objects.create(name="ws-machine", address="192.0.2.1")
        assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
        hypervisor = Hypervisor.objects.create(name="ws-hv", storage_pool="default")
        job = ConversionJob.objects.create(machine=machine, assessment=assessment, hypervisor=hypervisor)
        browser = Client()
        browser.force_login(operator)  # a real session row; its cookie goes to the real server
        session_cookie = browser.cookies[settings.SESSION_COOKIE_NAME].value
        event = Event.objects.create(kind="vip.updated", object_type="vip", object_id="7")
    yield {"agent": agent, "token": token, "job": job, "session": session_cookie, "event": event}
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(scope="module")
def server(committed, tmp_path_factory) -> Iterator[str]:
    """uvicorn on a socket bound here (port 0, so no race for a free port), passed by descriptor."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    log = tmp_path_factory.mktemp("ws-server") / "uvicorn.log"
    env = {**os.environ, "DATABASE_URL": database_url_for_test_db(), "REDIS_URL": settings.REDIS_URL,
           "DATABASE_POOL": "0", "PYTHONPATH": str(REPO_ROOT)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.uvicorn_on_fd", str(listener.fileno())],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()],
            start_new_session=True)
    listener.close()  # the child holds its own copy

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"uvicorn exited: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                probe.sendall(b"GET /healthz/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                return probe.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    try:
        wait_until(answers, timeout_s=WAIT_S, what="uvicorn to serve /healthz/", interval_s=0.2)
        yield f"ws://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_these_are_all_the_routes():
    # A new route needs its test here: this fails until it has one.
    assert _route_paths() == {"ws/agents/", "ws/p2v/jobs/<int:job_id>/", "ws/dashboard/"}


def test_agent_with_its_token_says_hello_and_gets_its_desired_state(server, committed):
    agent = committed["agent"]
    headers = {"Authorization": f"Bearer {committed['token']}"}
    with connect(f"{server}/ws/agents/", additional_headers=headers, open_timeout=WAIT_S) as ws:
        ws.send(encode(Hello(node=agent.name, role="mux", version="test", applied_generation=None)))
        message = decode_portal_message(ws.recv(timeout=WAIT_S))
    assert message.type == "desired"
    # this agent's own document, as the portal holds it now (not merely some parsable state)
    assert message.state.node == agent.name
    assert message.state == desired_state_object(agent)


@pytest.mark.parametrize("token", ["dca_not-a-token", ""], ids=["unknown-token", "no-token"])
def test_agent_route_refuses_a_bad_token_at_the_handshake(server, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server}/ws/agents/", additional_headers=headers, open_timeout=WAIT_S)
    assert refused.value.response.status_code == 403


def test_operator_session_gets_the_job_snapshot_then_live_log_lines(server, committed, django_db_blocker):
    job = committed["job"]
    cookie = f"{settings.SESSION_COOKIE_NAME}={committed['session']}"
    with connect(f"{server}/ws/p2v/jobs/{job.pk}/", additional_headers={"Cookie": cookie},
                 open_timeout=WAIT_S) as ws:
        first = json.loads(ws.recv(timeout=WAIT_S))
        assert (first["type"], first["data"]["state"]) == ("job.update", "queued")
        with django_db_blocker.unblock():
            conversion_services.log(job, "copying sda through the real server")  # Redis -> server
        line = json.loads(ws.recv(timeout=WAIT_S))
    assert line["type"] == "job.log"
    assert line["data"]["message"] == "copying sda through the real server"


def test_job_route_refuses_anonymous_and_unknown_jobs(server, committed):
    with pytest.raises(InvalidStatus) as anonymous:
        connect(f"{server}/ws/p2v/jobs/{committed['job'].pk}/", open_timeout=WAIT_S)
    assert anonymous.value.response.status_code == 403
    cookie = f"{settings.SESSION_COOKIE_NAME}={committed['session']}"
    with pytest.raises(InvalidStatus) as unknown:
        connect(f"{server}/ws/p2v/jobs/999999/", additional_headers={"Cookie": cookie}, open_timeout=WAIT_S)
    assert unknown.value.response.status_code == 403  # closed before accept: the handshake fails


def test_a_foreign_browser_origin_is_refused(server, committed):
    cookie = f"{settings.SESSION_COOKIE_NAME}={committed['session']}"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server}/ws/p2v/jobs/{committed['job'].pk}/", open_timeout=WAIT_S,
                additional_headers={"Cookie": cookie}, origin="https://evil.example")
    assert refused.value.response.status_code == 403


def test_dashboard_socket_replays_after_its_cursor_then_streams_live_changes(server, committed):
    event = committed["event"]
    cookie = f"{settings.SESSION_COOKIE_NAME}={committed['session']}"
    url = f"{server}/ws/dashboard/?page=overview&since={event.id - 1}"
    with connect(url, additional_headers={"Cookie": cookie}, open_timeout=WAIT_S) as ws:
        replayed = json.loads(ws.recv(timeout=WAIT_S))
        assert (replayed["type"], replayed["id"], replayed["kind"]) == ("event", event.id, "vip.updated")
        synced = json.loads(ws.recv(timeout=WAIT_S))
        assert synced == {"type": "synced", "cursor": event.id, "replayed": 1}
        # another process publishes through Redis, as the portal's push path does
        async_to_sync(get_channel_layer().group_send)(
            OPERATORS_GROUP, {"type": "lb.event", "kind": "listener.status", "data": {"id": 3}})
        live = json.loads(ws.recv(timeout=WAIT_S))
    assert live == {"type": "change", "kind": "listener.status", "data": {"id": 3}}


def test_dashboard_socket_refuses_anonymous_users_at_the_handshake(server):
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server}/ws/dashboard/?page=overview&since=0", open_timeout=WAIT_S)
    assert refused.value.response.status_code == 403
