"""GET /api/events/?since=<id>: a cursor feed of the changes the caller may see."""

from __future__ import annotations

import pytest

from datacenter.events.models import AuditEntry, Event, ImmutableRecordError
from datacenter.loadbalancing import services


def test_feed_is_a_cursor_scoped_to_the_callers_tenants(world):
    client = world.client("a_member")
    first = client.get("/api/events/").json()
    assert first["results"]
    assert all(e["tenant"] == world.tenant_a.pk for e in first["results"])
    cursor = first["next_since"]
    assert client.get("/api/events/", {"since": cursor}).json()["results"] == []

    services.replace_backends(world.listener_b, [{"address": "10.2.0.9", "port": 80}])
    services.replace_backends(world.listener_a, [{"address": "10.1.0.9", "port": 80}])
    new = client.get("/api/events/", {"since": cursor}).json()
    assert [e["kind"] for e in new["results"]] == ["listener.backends_replaced"]
    assert new["results"][0]["data"]["listener"] == world.listener_a.pk
    assert new["next_since"] > cursor

    b_events = world.client("b_member").get("/api/events/").json()["results"]
    assert b_events
    assert all(e["tenant"] == world.tenant_b.pk for e in b_events)
    operator_events = world.client("operator").get("/api/events/", {"limit": 1000}).json()["results"]
    assert len(operator_events) == Event.objects.count()


def test_feed_limit_and_bad_cursor(world):
    client = world.client("operator")
    page = client.get("/api/events/", {"limit": 2}).json()
    assert len(page["results"]) == 2
    assert page["has_more"] is True
    following = client.get("/api/events/", {"since": page["next_since"], "limit": 2}).json()
    assert following["results"][0]["id"] > page["results"][-1]["id"]
    bad = client.get("/api/events/", {"since": "-1"})
    assert bad.status_code == 400
    assert "since" in bad.json()
    assert client.get("/api/events/", {"limit": 5000}).status_code == 400


def test_audit_entries_and_events_are_append_only(world):
    entry = AuditEntry.objects.first()
    entry.action = "forged"
    with pytest.raises(ImmutableRecordError):
        entry.save()
    with pytest.raises(ImmutableRecordError):
        Event.objects.first().delete()
    assert AuditEntry.objects.get(pk=entry.pk).action != "forged"


def test_request_id_is_generated_when_missing_or_unsafe(world):
    client = world.client("a_member")
    generated = client.get("/api/status/")
    assert len(generated["X-Request-ID"]) == 32
    unsafe = client.get("/api/status/", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert unsafe["X-Request-ID"] != "bad id\nwith newline"
    assert client.get("/api/status/", HTTP_X_REQUEST_ID="abc-123")["X-Request-ID"] == "abc-123"
