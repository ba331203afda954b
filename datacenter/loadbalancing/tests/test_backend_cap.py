"""A listener's backend cap: set through the API (range-checked with an error naming the range),
enforced on its backend list (the agents would refuse more), and sent in the desired-state
document, where the agents size the listener's table from it (the smallest prime above 100 x the
cap, at most the cluster's table size)."""

from __future__ import annotations

import pytest

from datacenter.loadbalancing import services
from datacenter.loadbalancing.desired_state import desired_state_for, desired_state_object
from datacenter.loadbalancing.models import Listener
from datacenter.services_errors import FieldErrors
from datacenter.testing import new_agent


def test_backend_cap_is_optional_range_checked_and_clearable(world):
    client = world.client("a_member")
    created = client.post("/api/listeners/", {"vip": world.vip_a.pk, "protocol": "tcp", "port": 8081},
                          format="json")
    assert created.status_code == 201, created.content
    assert created.json()["backend_cap"] is None  # the cluster's table size
    url = f"/api/listeners/{created.json()['id']}/"
    for bad in (0, 4097, "many"):
        refused = client.patch(url, {"backend_cap": bad}, format="json")
        assert refused.status_code == 400, (bad, refused.content)
        (message,) = refused.json()["backend_cap"]
        assert "from 1 to 4096" in message, message
    assert Listener.objects.get(pk=created.json()["id"]).backend_cap is None
    patched = client.patch(url, {"backend_cap": 64}, format="json")
    assert patched.status_code == 200, patched.content
    assert patched.json()["backend_cap"] == 64
    assert Listener.objects.get(pk=created.json()["id"]).backend_cap == 64
    cleared = client.patch(url, {"backend_cap": None}, format="json")
    assert cleared.json()["backend_cap"] is None


def test_more_backends_than_the_cap_are_refused_naming_the_cap(world):
    listener = world.listener_a
    count = len(services.current_backends(listener))
    assert count >= 2, "the world's listener has backends"
    with pytest.raises(FieldErrors) as excinfo:
        services.update_listener(listener, backend_cap=count - 1)
    assert f"below the listener's {count} backends" in excinfo.value.errors["backend_cap"][0]
    services.update_listener(listener, backend_cap=count)
    more = [*services.current_backends(listener), {"address": "10.1.0.250", "port": 80}]
    with pytest.raises(FieldErrors) as excinfo:
        services.replace_backends(listener, more)
    assert f"exceed the listener's backend_cap {count}" in excinfo.value.errors["backends"][0]
    assert len(services.current_backends(listener)) == count, "nothing was written"
    for bad in (0, True, "8"):
        with pytest.raises(FieldErrors):
            services.update_listener(listener, backend_cap=bad)


def test_the_cap_reaches_the_document_and_sizes_the_agents_table(world):
    from datacenter.loadbalancing import agent_sync

    mux = new_agent("mux-cap", world.host_shared, "10.0.0.9")[0]
    listener = world.listener_a

    def listener_doc() -> dict:
        for vip in desired_state_for(mux)["vips"]:
            for doc in vip["listeners"]:
                if doc["id"] == listener.pk:
                    return doc
        raise AssertionError(f"listener {listener.pk} is not in the document")

    agent_sync.apply_change(None)
    assert "backend_cap" not in listener_doc(), "unset: the document is what it was"
    state = desired_state_object(mux)
    served = next(li for _, li in state.listeners() if li.id == listener.pk)
    assert served.table_size_in(state.cluster) == state.cluster.table_size
    services.update_listener(listener, backend_cap=64)
    agent_sync.apply_change([listener.pk])
    assert listener_doc()["backend_cap"] == 64
    state = desired_state_object(mux)  # parsed and validated by the agents' own parser
    served = next(li for _, li in state.listeners() if li.id == listener.pk)
    assert served.table_size_in(state.cluster) == min(6421, state.cluster.table_size)


def test_values_the_stored_state_refuses_are_conflicts_409_naming_the_field(world):
    """A cap below the listener's backends, a list longer than the cap, a port another listener of
    the VIP holds: each request is schema-valid (the contract run sends such requests), so the
    refusal is a conflict with the current state (409, documented), not a malformed request
    (400). The body still names the field."""
    client = world.client("a_member")
    listener = world.listener_a
    count = len(services.current_backends(listener))
    url = f"/api/listeners/{listener.pk}/"

    below = client.patch(url, {"backend_cap": count - 1}, format="json")
    assert below.status_code == 409, below.content
    assert f"below the listener's {count} backends" in below.json()["backend_cap"][0]
    assert Listener.objects.get(pk=listener.pk).backend_cap is None, "nothing was written"

    assert client.patch(url, {"backend_cap": count}, format="json").status_code == 200
    backends = [{"address": b["address"], "port": b["port"]} for b in services.current_backends(listener)]
    longer = client.put(f"{url}backends/", {"backends": [*backends, {"address": "10.1.0.250", "port": 80}]},
                        format="json")
    assert longer.status_code == 409, longer.content
    assert f"exceed the listener's backend_cap {count}" in longer.json()["backends"][0]
    one_more = client.post("/api/backends/", {"listener": listener.pk, "address": "10.1.0.251", "port": 80},
                           format="json")
    assert one_more.status_code == 409, one_more.content
    assert f"exceed the listener's backend_cap {count}" in one_more.json()["backends"][0]
    assert len(services.current_backends(listener)) == count, "nothing was written"

    clash = client.post("/api/listeners/", {"vip": world.vip_a.pk, "protocol": "tcp", "port": listener.port},
                        format="json")
    assert clash.status_code == 409, clash.content
    assert f"listener on port {listener.port}" in clash.json()["port"][0]
    malformed = client.patch(url, {"backend_cap": 0}, format="json")
    assert malformed.status_code == 400, "a value no state accepts stays a 400"
