"""Live job updates: an operator's websocket gets the job's snapshot, then each log line and update;
anyone else is refused before joining the group."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connections

from datacenter.routing import websocket_urlpatterns  # the project routes, so the test proves the wiring
from p2v.conversion import services
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.models import Assessment, Machine

pytestmark = pytest.mark.django_db(transaction=True)


async def close_thread_connections() -> None:
    """database_sync_to_async runs in a worker thread whose DB connection would outlive the test
    (CONN_MAX_AGE) and keep the test database from being dropped; close it from inside the test."""
    await database_sync_to_async(connections.close_all)()


def make_job() -> ConversionJob:
    machine = Machine.objects.create(name="ws-machine", address="192.0.2.1")
    assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
    hypervisor = Hypervisor.objects.create(name="hv", storage_pool="default")
    return ConversionJob.objects.create(machine=machine, assessment=assessment, hypervisor=hypervisor)


def communicator(job_id: int, user) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/p2v/jobs/{job_id}/")
    comm.scope["user"] = user
    return comm


async def test_operator_sees_snapshot_then_live_log_lines():
    job = await database_sync_to_async(make_job)()
    admin = await database_sync_to_async(get_user_model().objects.create_user)(
        "ops", password="x", is_staff=True
    )
    comm = communicator(job.pk, admin)
    connected, _ = await comm.connect()
    assert connected
    first = await comm.receive_json_from(timeout=5)
    assert first["type"] == "job.update"
    assert first["data"]["state"] == "queued"
    await database_sync_to_async(services.log)(job, "copying sda")
    line = await comm.receive_json_from(timeout=5)
    assert line["type"] == "job.log"
    assert line["data"]["message"] == "copying sda"
    await comm.disconnect()
    await close_thread_connections()


async def test_non_operator_is_refused():
    job = await database_sync_to_async(make_job)()
    user = await database_sync_to_async(get_user_model().objects.create_user)("tenant", password="x")
    comm = communicator(job.pk, user)
    connected, code = await comm.connect()
    assert not connected
    assert code == 4403
    await comm.disconnect()  # end the application instance here, not in the event loop's teardown
    await close_thread_connections()


def token_communicator(job_id: int, authorization: bytes | None) -> WebsocketCommunicator:
    """Through the project's whole ASGI stack (origin guard, session auth, routes), as a script
    or CLI connects: no cookie, only the REST API's Authorization header."""
    from datacenter.asgi import application

    headers = [(b"authorization", authorization)] if authorization is not None else []
    return WebsocketCommunicator(application, f"/ws/p2v/jobs/{job_id}/", headers=headers)


def make_token(username: str, *, is_staff: bool, expires=None) -> str:
    from datacenter.tenancy.models import ApiToken

    user = get_user_model().objects.create_user(username, password="x", is_staff=is_staff)
    _token, key = ApiToken.objects.create_token(user, name="ws", expires=expires)
    return key


async def test_operator_token_is_accepted_like_the_rest_api():
    job = await database_sync_to_async(make_job)()
    key = await database_sync_to_async(make_token)("ops-token", is_staff=True)
    comm = token_communicator(job.pk, f"Token {key}".encode())
    connected, _ = await comm.connect()
    assert connected
    first = await comm.receive_json_from(timeout=5)
    assert first["type"] == "job.update"
    assert first["data"]["id"] == job.pk
    await database_sync_to_async(services.log)(job, "copying sdb")
    line = await comm.receive_json_from(timeout=5)
    assert line["data"]["message"] == "copying sdb"
    await comm.disconnect()
    await close_thread_connections()


@pytest.mark.parametrize(
    ("case", "expected_code"),
    [
        ("no header", 4403),  # anonymous: not an operator
        ("tenant token", 4403),  # a valid token, but the API's scoping refuses non-operators too
        ("wrong key", 4401),
        ("expired", 4401),
        ("malformed", 4401),
    ],
)
async def test_tokens_the_api_refuses_are_refused(case, expected_code):
    from datetime import timedelta

    from django.utils import timezone

    job = await database_sync_to_async(make_job)()
    if case == "no header":
        authorization = None
    elif case == "tenant token":
        key = await database_sync_to_async(make_token)("tenant-token", is_staff=False)
        authorization = f"Token {key}".encode()
    elif case == "wrong key":
        await database_sync_to_async(make_token)("ops-a", is_staff=True)
        authorization = b"Token dc_not-a-real-key-0000000000000000"
    elif case == "expired":
        key = await database_sync_to_async(make_token)(
            "ops-expired", is_staff=True, expires=timezone.now() - timedelta(minutes=1)
        )
        authorization = f"Token {key}".encode()
    else:
        authorization = b"Token two parts"
    comm = token_communicator(job.pk, authorization)
    connected, code = await comm.connect()
    assert not connected
    assert code == expected_code
    await comm.disconnect()
    await close_thread_connections()
