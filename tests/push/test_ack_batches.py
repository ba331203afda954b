"""The portal records agents' acknowledgements in batches (consumers.AckRecorder): a batch waits
for every agent this process sent the push to, then settles the listener once; an agent that
stays silent delays the batch only up to the cap. Real database, real status evaluation."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async

from datacenter.loadbalancing import agent_sync, consumers
from datacenter.loadbalancing.desired_state import desired_state_object
from datacenter.loadbalancing.models import AgentNode, Listener
from datacenter.testing import new_agent
from lbagent.protocol import Applied


@pytest.fixture
def muxes(transactional_db, world):
    # transactional_db: the batch is written from a worker thread on its own connection.
    muxes = (("mux-a", "10.0.0.2"), ("mux-b", "10.0.0.3"), ("mux-c", "10.0.0.4"))
    agents = [new_agent(name, world.host_shared, address)[0] for name, address in muxes]
    agent_sync.apply_change(None)
    return agents


def _ack(agent: AgentNode) -> Applied:
    state = desired_state_object(agent)
    return Applied(generation=state.generation, ok=True, listeners=state.listener_generations())


async def test_batch_waits_for_every_agent_sent_the_push_then_for_nobody_silent(world, muxes, monkeypatch):
    listener_id = world.listener_a.pk
    status = database_sync_to_async(lambda: Listener.objects.get(pk=listener_id).provisioning_status)
    acks = {agent.name: await database_sync_to_async(_ack)(agent) for agent in muxes}
    recorder = consumers.AckRecorder()

    # Two agents were sent the push: the first ack waits for the second (a long cap proves it
    # is the second ack, not the cap, that releases the batch).
    monkeypatch.setattr(consumers, "ACK_GATHER_MAX_S", 30.0)
    a, b, c = muxes
    for agent in (a, b):
        recorder.expect(agent.pk, acks[agent.name].generation)
    batches: list[list[str]] = []
    record_batch = consumers._record_applied_batch

    async def recording(entries):  # the real recording; the test only notes what each batch held
        batches.append([agent.name for agent, *_ in entries])
        return await record_batch(entries)

    monkeypatch.setattr(consumers, "_record_applied_batch", recording)
    first = asyncio.ensure_future(recorder.record(a, acks["mux-a"], None))
    # No guess of how long "waiting" takes: run the loop until the batch was recorded (a bug) or
    # the recorder is gathering (it cleared its arrival flag and waits for mux-b's ack).
    for _ in range(1000):
        await asyncio.sleep(0)
        if first.done() or batches or (recorder._task is not None and not recorder._arrived.is_set()):
            break
    assert batches == [], "the batch must wait for mux-b, which was sent the same push"
    assert not first.done()
    second = asyncio.ensure_future(recorder.record(b, acks["mux-b"], None))
    results = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert results == [dict(acks["mux-a"].listeners), dict(acks["mux-b"].listeners)]
    assert batches == [["mux-a", "mux-b"]], "both acknowledgements are recorded in one batch"
    assert await status() != "active"  # mux-c has not applied it yet

    # mux-c was sent the push too but never answers; mux-b's later ack is not held past the cap.
    monkeypatch.setattr(consumers, "ACK_GATHER_MAX_S", 0.3)
    recorder.expect(c.pk, acks["mux-c"].generation)
    recorder.expect(b.pk, acks["mux-b"].generation)
    assert await asyncio.wait_for(recorder.record(b, acks["mux-b"], results[1]), 60) == results[1]
    # mux-c disconnects: nobody waits for it any more, and its ack (on reconnect) settles the listener.
    recorder.forget(c.pk)
    await asyncio.wait_for(recorder.record(c, acks["mux-c"], None), 60)
    assert await status() == "active"
