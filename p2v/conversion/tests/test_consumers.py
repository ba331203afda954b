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
