"""agent_sync._send_all over the real Redis channel layer: every member of every addressed group
gets each of its messages once, in order, while groups nobody joined are skipped (they are most
of an event's groups; see _groups_with_members)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from datacenter.loadbalancing import agent_sync


@pytest.fixture
def layer():
    if not settings.REDIS_URL:
        pytest.fail("needs Redis: set REDIS_URL (the embedded layout's in-memory layer is not under test)")
    return get_channel_layer()


async def test_members_get_their_messages_and_empty_groups_are_skipped(layer, monkeypatch):
    channel_a = await layer.new_channel("test-gs-a.")
    channel_b = await layer.new_channel("test-gs-b.")
    joined = [("test-gs-one", channel_a), ("test-gs-both", channel_a), ("test-gs-both", channel_b)]
    for group, channel in joined:
        await layer.group_add(group, channel)
    sent_to: list[str] = []
    real_group_send = layer.group_send

    async def counting_group_send(group, message):
        sent_to.append(group)
        await real_group_send(group, message)

    monkeypatch.setattr(layer, "group_send", counting_group_send)
    try:
        # As the web code calls it: from a sync thread, onto this event loop.
        await sync_to_async(agent_sync._send_all)(
            [
                ("test-gs-one", {"type": "x", "n": 1}),
                ("test-gs-empty", {"type": "x", "n": 2}),
                ("test-gs-both", {"type": "x", "n": 3}),
                ("test-gs-one", {"type": "x", "n": 4}),
            ]
        )
        got_a = [(await asyncio.wait_for(layer.receive(channel_a), 30))["n"] for _ in range(3)]
        got_b = [(await asyncio.wait_for(layer.receive(channel_b), 30))["n"]]
    finally:
        for group, channel in joined:
            await layer.group_discard(group, channel)
    assert got_a == [1, 3, 4]
    assert got_b == [3]
    assert sent_to == ["test-gs-one", "test-gs-both", "test-gs-one"]
