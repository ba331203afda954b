"""The dashboard websocket (/ws/dashboard/) authorises like the API and never leaks another
tenant's events; a reconnect with the last cursor replays exactly what came after it."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from datacenter.asgi import application
from datacenter.events.models import Event
from datacenter.loadbalancing import services
from datacenter.testing import build_world

pytestmark = pytest.mark.django_db(transaction=True)  # the consumer reads from its own threads


@pytest.fixture
def world(transactional_db, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return build_world()


async def connect(user, page: str, since: int = 0) -> tuple[WebsocketCommunicator, bool, int | None]:
    communicator = WebsocketCommunicator(application, f"/ws/dashboard/?page={page}&since={since}")
    communicator.scope["user"] = user
    connected, code = await communicator.connect()
    return communicator, connected, code


async def next_event(communicator: WebsocketCommunicator) -> dict:
    while True:
        message = await communicator.receive_json_from(timeout=30)
        if message["type"] == "event":
            return message


async def test_refusals_follow_the_api_rules(world):
    from django.contrib.auth.models import AnonymousUser

    _, connected, code = await connect(AnonymousUser(), "overview")
    assert (connected, code) == (False, 4401)
    member = world.users["a_member"]
    _, connected, code = await connect(member, "agents")
    assert (connected, code) == (False, 4403)
    _, connected, code = await connect(member, f"vip:{world.vip_b.pk}")
    assert (connected, code) == (False, 4404), "another tenant's VIP does not exist"
    _, connected, code = await connect(member, "nonsense")
    assert (connected, code) == (False, 4404)
    communicator, connected, _ = await connect(member, f"vip:{world.vip_a.pk}")
    assert connected
    await communicator.disconnect()


async def test_tenant_sees_only_its_events_live_and_on_catch_up(world):
    member = world.users["a_member"]
    operator = world.users["operator"]
    communicator, connected, _ = await connect(member, "overview", since=0)
    assert connected
    replayed = []
    while True:
        message = await communicator.receive_json_from(timeout=30)
        if message["type"] == "synced":
            cursor = message["cursor"]
            break
        replayed.append(message)
    visible = await sync_to_async(
        lambda: set(Event.objects.filter(tenant=world.tenant_a).values_list("id", flat=True))
    )()
    assert {m["id"] for m in replayed} == visible, "the replay is exactly the tenant's events"

    replace = sync_to_async(services.replace_backends)
    await replace(world.listener_b, [{"address": "10.2.0.9", "port": 8443}], user=operator)
    await replace(world.listener_a, [{"address": "10.1.0.9", "port": 8080}], user=operator)
    event = await next_event(communicator)
    assert event["object_id"] == str(world.listener_a.pk), "tenant B's change never reaches tenant A"
    await communicator.disconnect()

    # reconnect from the cursor seen before those changes: only tenant A's change is replayed
    again, connected, _ = await connect(member, "overview", since=cursor)
    assert connected
    first = await again.receive_json_from(timeout=30)
    assert first["type"] == "event"
    assert first["id"] == event["id"]
    assert (await again.receive_json_from(timeout=30))["type"] == "synced"
    await again.disconnect()
