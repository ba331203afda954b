"""Desired state from the database, acknowledgements -> provisioning_status, health reports ->
tables and operating_status, and the VIP status tree (database only; no server)."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from datacenter.loadbalancing import agent_sync
from datacenter.loadbalancing.choices import OperatingStatus, ProvisioningStatus
from datacenter.loadbalancing.desired_state import desired_state_for, desired_state_object
from datacenter.loadbalancing.models import AgentNode, Listener, Vip
from datacenter.loadbalancing.models_sync import AgentListenerAck, AgentSync, ListenerTable
from datacenter.loadbalancing.services import replace_backends, update_listener
from datacenter.testing import new_agent
from lbagent.protocol import Applied, BackendHealth, Health, Hello


@pytest.fixture
def muxes(world):
    muxes = (("mux-a", "10.0.0.2"), ("mux-b", "10.0.0.3"))
    agents = [new_agent(name, world.host_shared, address)[0] for name, address in muxes]
    agent_sync.apply_change(None)
    for agent in agents:
        agent_sync.agent_connected(agent, "0.1.0")
    return agents


def ack(agent: AgentNode) -> None:
    state = desired_state_object(agent)
    agent_sync.record_applied(
        agent, Applied(generation=state.generation, ok=True, listeners=state.listener_generations())
    )


def status(listener) -> str:
    return Listener.objects.get(pk=listener.pk).provisioning_status


def test_document_describes_every_vip_and_validates(world, muxes) -> None:
    state = desired_state_object(muxes[0])
    assert state.node == "mux-a"
    assert [m.name for m in state.cluster.muxes] == ["mux-a", "mux-b"]
    vips = {v.address: v for v in state.vips}
    web_a = vips["203.0.113.10"].listeners[0]
    assert [(b.address, b.port, b.weight, b.host) for b in web_a.backends] == [
        ("10.1.0.5", 8080, 1, "web-a1"),
        ("10.1.0.6", 8080, 2, None),
    ]
    assert vips["203.0.113.10"].bypass is False
    # One backend on one host: the router may send this VIP straight to it.
    assert (vips["203.0.113.20"].bypass, vips["203.0.113.20"].bypass_next_hop) == (True, "10.2.0.5")
    assert desired_state_for(muxes[1])["node"] == "mux-b"
    assert len(state.cluster.peer_key) == 32


def test_listener_active_only_when_every_mux_acknowledged(world, muxes) -> None:
    listener = world.listener_a
    assert status(listener) == ProvisioningStatus.PENDING_CREATE
    ack(muxes[0])
    ack(muxes[1])
    assert status(listener) == ProvisioningStatus.ACTIVE
    replace_backends(listener, [{"address": "10.1.0.7", "port": 8080}])
    agent_sync.apply_change([listener.pk])
    assert status(listener) == ProvisioningStatus.PENDING_UPDATE
    ack(muxes[0])
    assert status(listener) == ProvisioningStatus.PENDING_UPDATE  # mux-b has not applied it yet
    ack(muxes[1])
    assert status(listener) == ProvisioningStatus.ACTIVE
    assert Vip.objects.get(pk=listener.vip_id).provisioning_status == ProvisioningStatus.ACTIVE


def test_acks_of_several_agents_in_one_batch_settle_the_listener_despite_a_deleted_one(
    transactional_db, world, muxes
) -> None:
    # transactional_db: as in production, the foreign key (deferred) is checked at the batch's COMMIT.
    listener = world.listener_a
    state = desired_state_object(muxes[0])
    running = {**state.listener_generations(), 10**9: 1}  # a listener deleted since the agent applied it
    results = agent_sync.record_applied_batch(
        [
            (agent, Applied(generation=state.generation, ok=True, listeners=running), None, None)
            for agent in muxes
        ]
    )
    assert results == [running, running]
    assert status(listener) == ProvisioningStatus.ACTIVE
    assert {a.applied_generation for a in AgentNode.objects.filter(pk__in=[m.pk for m in muxes])} == {
        state.generation
    }


def test_failed_apply_is_error_with_the_agents_reason(world, muxes) -> None:
    listener = world.listener_a
    ack(muxes[0])
    ack(muxes[1])
    replace_backends(listener, [{"address": "10.1.0.8", "port": 8080}])
    agent_sync.apply_change([listener.pk])
    ack(muxes[0])
    agent_sync.record_applied(muxes[1], Applied(generation=99, ok=False, error="nft: map full"))
    assert status(listener) == ProvisioningStatus.ERROR
    ack(muxes[1])
    assert status(listener) == ProvisioningStatus.ACTIVE


def test_a_vip_one_agent_refused_is_error_and_other_tenants_listeners_settle(world, muxes) -> None:
    # The mux applied the document except one VIP (say a new backend's MAC does not resolve): that
    # VIP keeps running its previous tables. Its listener shows the reason; another tenant's
    # listener is neither held in ERROR by it nor shown its reason.
    refused, other = world.listener_a, world.listener_b
    ack(muxes[0])
    ack(muxes[1])
    before = desired_state_object(muxes[1]).listener_generations()[refused.pk]
    replace_backends(refused, [{"address": "10.1.0.9", "port": 8080}])
    agent_sync.apply_change([refused.pk])
    ack(muxes[0])
    state = desired_state_object(muxes[1])
    assert state.listener_generations()[refused.pk] != before
    reason = "VIP 203.0.113.10: no MAC for backend 10.1.0.9 on eth0 within 1.0 s"

    def partial_ack(state) -> Applied:
        return Applied(
            generation=state.generation,
            ok=True,
            listeners={**state.listener_generations(), refused.pk: before},
            listener_errors={refused.pk: reason},
        )

    agent_sync.record_applied(muxes[1], partial_ack(state))
    assert status(refused) == ProvisioningStatus.ERROR
    tree = world.client("a_member").get(f"/api/vips/{refused.vip_id}/status/").json()
    agents = {a["agent"]: a for a in tree["listeners"][0]["agents"]}
    assert (agents["mux-b"]["status"], agents["mux-b"]["error"]) == ("error", reason)
    assert agents["mux-a"]["status"] == "active"
    # Another tenant changes its listener while mux-b still refuses tenant A's VIP: pending until
    # both muxes acknowledged (not ERROR), then ACTIVE; tenant B never sees tenant A's reason.
    replace_backends(other, [{"address": "10.2.0.5", "port": 9443}])
    agent_sync.apply_change([other.pk])
    ack(muxes[0])
    assert status(other) == ProvisioningStatus.PENDING_UPDATE
    agent_sync.record_applied(muxes[1], partial_ack(desired_state_object(muxes[1])))
    assert status(other) == ProvisioningStatus.ACTIVE
    assert status(refused) == ProvisioningStatus.ERROR
    tree_b = world.client("b_member").get(f"/api/vips/{other.vip_id}/status/").json()
    assert "10.1.0.9" not in json.dumps(tree_b)
    # The mux heals (its retry resolved the MAC) and acknowledges everything: the error is gone.
    ack(muxes[1])
    assert status(refused) == ProvisioningStatus.ACTIVE
    tree = world.client("a_member").get(f"/api/vips/{refused.vip_id}/status/").json()
    assert reason not in json.dumps(tree)


def test_a_failure_after_a_success_in_one_batch_keeps_the_agents_error(world, muxes) -> None:
    listener = world.listener_a
    ack(muxes[0])
    replace_backends(listener, [{"address": "10.1.0.8", "port": 8080}])
    agent_sync.apply_change([listener.pk])
    ack(muxes[0])
    state = desired_state_object(muxes[1])
    agent_sync.record_applied_batch(
        [
            (muxes[1], Applied(generation=state.generation - 1, ok=True, listeners={}), None, None),
            (muxes[1], Applied(generation=state.generation, ok=False, error="nft: map full"), None, None),
        ]
    )
    assert status(listener) == ProvisioningStatus.ERROR  # the newer report is the failure


def test_backend_marked_down_by_majority_leaves_table_and_returns(world, muxes) -> None:
    listener = world.listener_a
    update_listener(listener, health_check={"kind": "tcp", "interval_s": 1, "timeout_s": 1})
    agent_sync.apply_change([listener.pk])
    before = ListenerTable.objects.get(listener=listener)
    down = Health(checks=(BackendHealth(listener.pk, "10.1.0.6", 8080, False, "connection refused"),))
    agent_sync.record_health(muxes[0], down)
    assert ListenerTable.objects.get(listener=listener).number == before.number  # one of two is no majority
    agent_sync.record_health(muxes[1], down)
    table = ListenerTable.objects.get(listener=listener)
    assert table.number == before.number + 1
    assert [b["state"] for b in table.backends] == ["active", "disabled"]
    assert table.previous["backends"] == before.backends  # old table kept for the drain
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.DEGRADED
    served = desired_state_object(muxes[0]).vips[0].listeners[0]
    assert served.generation == table.number
    up = Health(checks=(BackendHealth(listener.pk, "10.1.0.6", 8080, True),))
    agent_sync.record_health(muxes[0], up)
    table = ListenerTable.objects.get(listener=listener)
    assert [b["state"] for b in table.backends] == ["active", "active"]
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.ONLINE


def test_all_backends_down_fails_open(world, muxes) -> None:
    listener = world.listener_b  # one backend
    update_listener(listener, health_check={"kind": "tcp"})
    agent_sync.apply_change([listener.pk])
    for mux in muxes:
        agent_sync.record_health(
            mux, Health(checks=(BackendHealth(listener.pk, "10.2.0.5", 8443, False, "x"),))
        )
    assert [b["state"] for b in ListenerTable.objects.get(listener=listener).backends] == ["active"]
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.ERROR


def test_status_tree_for_tenant_and_404_for_others(world, muxes) -> None:
    ack(muxes[0])
    url = f"/api/vips/{world.vip_a.pk}/status/"
    response = world.client("a_viewer").get(url)
    assert response.status_code == 200, response.content
    tree = response.json()
    listener = tree["listeners"][0]
    assert {a["agent"]: a["status"] for a in listener["agents"]} == {"mux-a": "active", "mux-b": "pending"}
    assert [b["address"] for b in listener["backends"]] == ["10.1.0.5", "10.1.0.6"]
    assert all(b["in_table"] for b in listener["backends"])
    assert {a["name"] for a in tree["agents"]} == {"mux-a", "mux-b"}
    assert world.client("b_member").get(url).status_code == 404
    assert world.client("operator").get(url).status_code == 200
    assert world.client("operator").get(f"/api/vips/{10**30}/status/").status_code == 404
    assert APIClient().get(url).status_code == 401  # anonymous: no credentials (documented 401)


def test_incremental_document_equals_a_full_rebuild_after_changes(world, muxes) -> None:
    from datacenter.loadbalancing import services
    from datacenter.loadbalancing.desired_state import build_common_document, document_cache

    def matches_full_build() -> bool:
        return document_cache.current() == build_common_document()

    assert matches_full_build()
    replace_backends(world.listener_a, [{"address": "10.1.0.9", "port": 8080}])
    agent_sync.apply_change([world.listener_a.pk])
    assert matches_full_build()
    extra = services.create_listener(vip=world.vip_b, protocol="udp", port=53)
    agent_sync.apply_change([extra.pk])
    assert matches_full_build()
    services.delete_listener(Listener.objects.get(pk=extra.pk))
    agent_sync.apply_change(None)
    document = document_cache.current()
    assert document == build_common_document()
    assert [li["port"] for v in document["vips"] for li in v["listeners"]] == [80, 443]
    services.create_vip(tenant=world.tenant_a, name="new", address="203.0.113.30")
    agent_sync.apply_change(None)
    assert matches_full_build()
    # An agent that received an older generation gets only the changed VIPs; merged into what it
    # holds, that is exactly the full state.
    from lbagent.protocol import decode_portal_message

    old_generation, old_frame = document_cache.frame_for("mux-b")
    old_state = json.loads(old_frame)["state"]
    replace_backends(world.listener_b, [{"address": "10.2.0.9", "port": 8443}])
    agent_sync.apply_change([world.listener_b.pk])
    services.delete_vip(Vip.objects.get(name="new"))
    agent_sync.apply_change(None)
    _, delta = document_cache.frame_for("mux-b", since=old_generation)
    assert json.loads(delta)["type"] == "delta"
    assert len(json.loads(delta)["state"]["vips"]) == 1
    merged = decode_portal_message(delta, base=(old_generation, old_state))
    assert merged.raw == {**document_cache.current(), "node": "mux-b"}
    generation, frame = document_cache.frame_for("mux-b")
    assert json.loads(frame) == {
        "type": "desired",
        "protocol": 1,
        "state": {**document_cache.current(), "node": "mux-b"},
    }
    assert generation == document_cache.current()["generation"]


def test_listener_deltas_forwarded_without_the_cache_add_up_to_the_full_state(world, muxes) -> None:
    """The fast path: a listener change carries its own delta in the channel message; an agent
    that got such deltas and then a cache frame (covering the VIPs they carried) holds exactly
    the full state."""
    from datacenter.loadbalancing.desired_state import document_cache, listener_delta, splice_node
    from datacenter.loadbalancing.models_sync import PushSettings
    from lbagent.protocol import decode_portal_message

    cache_generation, frame = document_cache.frame_for("mux-a")
    held = (cache_generation, json.loads(frame)["state"])
    sent = cache_generation
    forwarded: set[int] = set()
    for listener, backends in (
        (world.listener_a, [{"address": "10.1.0.7", "port": 8080}, {"address": "10.1.0.8", "port": 8080}]),
        (world.listener_b, [{"address": "10.2.0.7", "port": 8443}]),
    ):
        replace_backends(listener, backends)  # stages the push in its own transaction
        row = PushSettings.objects.get(pk=1)
        delta = listener_delta(row, row.generation, [listener.pk])
        assert delta["base"] == sent, "each staged push follows the previous one"
        message = decode_portal_message(splice_node(delta, "mux-a"), base=held)
        assert json.loads(splice_node(delta, "mux-a"))["type"] == "delta"
        sent, held = row.generation, (row.generation, message.raw)
        forwarded |= set(delta["vips"])
    assert held[1] == {**document_cache.current(), "node": "mux-a"}
    # A change the fast path does not carry (a new VIP): the cache frame from the last cache
    # generation, based on what the agent holds, re-sends the forwarded VIPs.
    from datacenter.loadbalancing import services

    services.create_vip(tenant=world.tenant_a, name="later", address="203.0.113.40")
    agent_sync.apply_change(None)
    generation, frame = document_cache.frame_for("mux-a", cache_generation, base=sent, extra_vips=forwarded)
    body = json.loads(frame)
    assert (body["type"], body["base"]) == ("delta", sent)
    merged = decode_portal_message(frame, base=held)
    assert merged.raw == {**document_cache.current(), "node": "mux-a"}
    assert generation == document_cache.current()["generation"]
    # A delta whose listener is gone is not built: consumers fall back to the cache.
    row = PushSettings.objects.get(pk=1)
    assert listener_delta(row, row.generation, [10**12]) is None


def test_status_changes_are_published_to_tenant_and_object_groups(world, muxes) -> None:
    import asyncio

    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    listener = world.listener_a
    groups = {
        "tenant": agent_sync.tenant_group(world.tenant_a.pk),
        "vip": agent_sync.vip_group(world.vip_a.pk),
        "listener": agent_sync.listener_group(listener.pk),
        "other tenant": agent_sync.tenant_group(world.tenant_b.pk),
    }
    channels = {name: async_to_sync(layer.new_channel)() for name in groups}
    for name, group in groups.items():
        async_to_sync(layer.group_add)(group, channels[name])

    async def drain(channel: str) -> list[dict]:
        messages = []
        while True:
            try:
                async with asyncio.timeout(0.3):
                    messages.append(await layer.receive(channel))
            except TimeoutError:
                return messages

    try:
        ack(muxes[0])
        ack(muxes[1])
        received = {name: async_to_sync(drain)(channel) for name, channel in channels.items()}
    finally:
        for name, group in groups.items():
            async_to_sync(layer.group_discard)(group, channels[name])
    wanted = {"kind": "listener.provisioning_status", "status": "active", "listener": listener.pk}
    for name in ("tenant", "vip", "listener"):
        assert any(
            m["kind"] == wanted["kind"]
            and m["data"]["status"] == "active"
            and m["data"]["listener"] == listener.pk
            for m in received[name]
        ), (name, received[name])
    # Tenant B's group hears about its own listener only, never about tenant A's.
    assert all(m["data"].get("listener") != listener.pk for m in received["other tenant"])


def hello_running(agent: AgentNode, listeners: dict[int, int]) -> Hello:
    return Hello(node=agent.name, role="mux", version="0.1.0", applied_generation=1, listeners=listeners)


def test_late_ack_of_a_replaced_connection_is_ignored_after_the_hello_rebuilt_the_rows(world, muxes) -> None:
    """The stuck-PENDING bug: a dead connection's late acks (superseded generations) landed after
    the new connection's and were never corrected. Now the hello's epoch refuses them."""
    listener = world.listener_a
    old_epoch = agent_sync.agent_connected(muxes[0], "0.1.0")
    old_state = desired_state_object(muxes[0])
    replace_backends(listener, [{"address": "10.1.0.8", "port": 8080}])
    ack(muxes[1])
    new_state = desired_state_object(muxes[0])
    assert new_state.listener_generations()[listener.pk] > old_state.listener_generations()[listener.pk]
    # mux-a reconnects already running the new state; its hello says so.
    new_epoch = agent_sync.agent_connected(
        muxes[0], "0.1.0", hello_running(muxes[0], new_state.listener_generations())
    )
    assert new_epoch == old_epoch + 1
    assert status(listener) == ProvisioningStatus.ACTIVE
    # The old connection's ack of the superseded document arrives late: ignored.
    late = Applied(generation=old_state.generation, ok=True, listeners=old_state.listener_generations())
    known = {listener.pk: 999}
    assert agent_sync.record_applied(muxes[0], late, None, old_epoch) is None
    assert agent_sync.record_applied_batch([(muxes[0], late, known, old_epoch)]) == [known]
    assert status(listener) == ProvisioningStatus.ACTIVE
    sync = AgentSync.objects.get(agent=muxes[0])
    assert (sync.epoch, sync.stale_acks_ignored, sync.connected) == (new_epoch, 2, True)
    # The same ack on the current connection is recorded (the agent really went back).
    agent_sync.record_applied(muxes[0], late, None, new_epoch)
    assert status(listener) == ProvisioningStatus.PENDING_UPDATE


def test_hello_replaces_every_ack_row_with_what_the_agent_says_it_runs(world, muxes) -> None:
    listener = world.listener_a
    for agent in muxes:
        ack(agent)
    assert status(listener) == ProvisioningStatus.ACTIVE
    # mux-b restarted from an older cache: it runs nothing of listener_a's current table.
    agent_sync.agent_connected(muxes[1], "0.1.0", hello_running(muxes[1], {listener.pk: 0}))
    assert status(listener) == ProvisioningStatus.PENDING_UPDATE
    assert dict(AgentListenerAck.objects.filter(agent=muxes[1]).values_list("listener_id", "generation")) == {
        listener.pk: 0
    }
    ack(muxes[1])
    assert status(listener) == ProvisioningStatus.ACTIVE


def test_only_the_current_connection_marks_the_agent_disconnected(world, muxes) -> None:
    first = agent_sync.agent_connected(muxes[0], "0.1.0")
    second = agent_sync.agent_connected(muxes[0], "0.1.0", hello_running(muxes[0], {}))
    assert not agent_sync.agent_disconnected(muxes[0], first, "keepalive ping timeout")
    assert AgentSync.objects.get(agent=muxes[0]).connected
    assert agent_sync.agent_disconnected(muxes[0], second, "connection lost without a close frame")
    sync = AgentSync.objects.get(agent=muxes[0])
    assert not sync.connected
    assert sync.disconnect_reason == "connection lost without a close frame"
    # Shown to operators on the agent API.
    shown = world.client("operator").get(f"/api/agent-nodes/{muxes[0].pk}/").json()["connection"]
    assert shown["connected"] is False
    assert shown["epoch"] == second
    assert shown["disconnect_reason"] == "connection lost without a close frame"


def test_a_rest_backend_replace_recomputes_operating_status_of_an_unmonitored_listener(
    world, muxes, django_capture_on_commit_callbacks
) -> None:
    """No health check means no health report ever recomputes this listener's status: the
    backend change itself must (it used to stay OFFLINE after its first backends arrived)."""
    from datacenter.loadbalancing import services

    vip = services.create_vip(tenant=world.tenant_b, name="api", address="203.0.113.21")
    listener = services.create_listener(vip=vip, protocol="tcp", port=8000)
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.OFFLINE
    url = f"/api/listeners/{listener.pk}/backends/"
    client = world.client("b_member")
    with django_capture_on_commit_callbacks(execute=True):
        response = client.put(url, {"backends": [{"address": "10.2.0.7", "port": 8000}]}, format="json")
    assert response.status_code == 200, response.content
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.NO_MONITOR
    with django_capture_on_commit_callbacks(execute=True):
        disabled = {"address": "10.2.0.7", "port": 8000, "admin_state": "disabled"}
        response = client.put(url, {"backends": [disabled]}, format="json")
    assert response.status_code == 200, response.content
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.OFFLINE
    assert Vip.objects.get(pk=vip.pk).operating_status == OperatingStatus.OFFLINE
    with django_capture_on_commit_callbacks(execute=True):
        response = client.put(url, {"backends": [{"address": "10.2.0.7", "port": 8000}]}, format="json")
    assert response.status_code == 200, response.content
    assert Listener.objects.get(pk=listener.pk).operating_status == OperatingStatus.NO_MONITOR
    assert Vip.objects.get(pk=vip.pk).operating_status == OperatingStatus.ONLINE


def test_flow_idle_timeout_reaches_the_document_only_when_set(world, muxes) -> None:
    from lbagent.state import DEFAULT_FLOW_IDLE_TIMEOUT_S

    listener = world.listener_a

    def listener_doc() -> dict:
        for vip in desired_state_for(muxes[0])["vips"]:
            for doc in vip["listeners"]:
                if doc["id"] == listener.pk:
                    return doc
        raise AssertionError(f"listener {listener.pk} is not in the document")

    # Unset: the key is absent (the document of a listener on the default is unchanged) and the
    # agent runs the protocol's default.
    assert "flow_idle_timeout_s" not in listener_doc()
    served = desired_state_object(muxes[0]).vips[0].listeners[0]
    assert served.idle_timeout_s == DEFAULT_FLOW_IDLE_TIMEOUT_S["tcp"]
    update_listener(listener, flow_idle_timeout_s=900)
    agent_sync.apply_change([listener.pk])
    assert listener_doc()["flow_idle_timeout_s"] == 900
    served = desired_state_object(muxes[0]).vips[0].listeners[0]
    assert (served.id, served.idle_timeout_s) == (listener.pk, 900)
    update_listener(listener, flow_idle_timeout_s=None)
    agent_sync.apply_change([listener.pk])
    assert "flow_idle_timeout_s" not in listener_doc()
