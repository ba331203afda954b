"""The load-balancing REST API as a tenant uses it: backends PUT with dry run and preconditions."""

from __future__ import annotations

from datacenter.events.models import AuditEntry
from datacenter.loadbalancing.models import AgentNode, Backend, Generation, Listener


def _backends_url(world) -> str:
    return f"/api/listeners/{world.listener_a.pk}/backends/"


def test_get_backends_has_generation_and_etag(world):
    response = world.client("a_viewer").get(_backends_url(world))
    assert response.status_code == 200
    body = response.json()
    assert body["generation"] == world.listener_a.generation
    assert response["ETag"] == f'"{world.listener_a.generation}"'
    assert [b["address"] for b in body["backends"]] == ["10.1.0.5", "10.1.0.6"]
    assert body["backends"][0]["host"] == "web-a1"


def test_put_backends_dry_run_then_apply_with_if_match(world):
    client = world.client("a_member")
    url = _backends_url(world)
    etag = client.get(url)["ETag"]
    wanted = {
        "backends": [
            {"address": "10.1.0.6", "port": 8080, "weight": 2},
            {"address": "10.1.0.7", "port": 8080, "admin_state": "active"},
        ]
    }
    dry = client.put(f"{url}?dry_run=true", wanted, format="json", HTTP_IF_MATCH=etag)
    assert dry.status_code == 200, dry.content
    assert dry.json()["dry_run"] is True
    assert [b["address"] for b in dry.json()["diff"]["added"]] == ["10.1.0.7"]
    assert [b["address"] for b in dry.json()["diff"]["removed"]] == ["10.1.0.5"]
    assert Listener.objects.get(pk=world.listener_a.pk).generation == world.listener_a.generation

    applied = client.put(url, wanted, format="json", HTTP_IF_MATCH=etag, HTTP_X_REQUEST_ID="rq-apply-1")
    assert applied.status_code == 200, applied.content
    assert applied.json()["generation"] == world.listener_a.generation + 1
    assert applied["ETag"] == f'"{world.listener_a.generation + 1}"'
    assert applied["X-Request-ID"] == "rq-apply-1"
    audit = AuditEntry.objects.get(request_id="rq-apply-1")
    assert audit.action == "replace_backends"
    assert audit.actor == "a_member"

    stale = client.put(url, {"backends": []}, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert stale.json()["code"] == "stale_generation"
    assert stale.json()["current_generation"] == world.listener_a.generation + 1
    assert Backend.objects.filter(listener=world.listener_a).count() == 2


def test_put_backends_stale_expected_generation_in_body_is_409(world):
    client = world.client("a_member")
    seen = world.listener_a.generation
    first = client.put(
        _backends_url(world),
        {"backends": [{"address": "10.1.0.9", "port": 80}], "expected_generation": seen},
        format="json",
    )
    assert first.status_code == 200
    second = client.put(
        _backends_url(world),
        {"backends": [{"address": "10.1.0.10", "port": 80}], "expected_generation": seen},
        format="json",
    )
    assert second.status_code == 409
    assert "generation" in second.json()["detail"]


def test_put_backends_validation_and_quota_errors(world):
    client = world.client("a_member")
    bad = client.put(
        _backends_url(world), {"backends": [{"address": "10.1.0.5", "port": 99999}]}, format="json"
    )
    assert bad.status_code == 400
    assert "99999 is not a port number" in bad.json()["backends[0].port"][0]
    not_a_list = client.put(_backends_url(world), {"backends": "10.1.0.5"}, format="json")
    assert not_a_list.status_code == 400
    assert "backends" in not_a_list.json()
    bad_flag = client.put(f"{_backends_url(world)}?dry_run=maybe", {"backends": []}, format="json")
    assert bad_flag.status_code == 400
    assert "dry_run" in bad_flag.json()
    world.tenant_a.max_backends_per_listener = 1
    world.tenant_a.save()
    quota = client.put(
        _backends_url(world),
        {"backends": [{"address": "10.1.0.5", "port": 80}, {"address": "10.1.0.6", "port": 80}]},
        format="json",
    )
    assert quota.status_code == 403
    assert quota.json()["code"] == "quota_exceeded"
    assert quota.json()["limit"] == 1


def test_patch_backend_drains_it_in_a_new_generation(world):
    backend = Backend.objects.get(listener=world.listener_a, address="10.1.0.6")
    response = world.client("a_member").patch(
        f"/api/backends/{backend.pk}/", {"admin_state": "draining"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["id"] == backend.pk
    assert response.json()["admin_state"] == "draining"
    latest = Generation.objects.filter(listener=world.listener_a).latest("number")
    assert latest.number == world.listener_a.generation + 1
    assert latest.changes["changed"][0]["after"]["admin_state"] == "draining"
    bad = world.client("a_member").patch(f"/api/backends/{backend.pk}/", {"weight": 0}, format="json")
    assert bad.status_code == 400
    assert "weight" in bad.json()


def test_create_and_delete_backend_through_api(world):
    client = world.client("a_member")
    created = client.post(
        "/api/backends/",
        {"listener": world.listener_a.pk, "address": "10.1.0.20", "port": 80, "host": "web-a1"},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["host"] == "web-a1"
    assert created.json()["position"] == 2
    stale = client.delete(f"/api/backends/{created.json()['id']}/?expected_generation=0")
    assert stale.status_code == 409
    deleted = client.delete(f"/api/backends/{created.json()['id']}/")
    assert deleted.status_code == 204
    assert not Backend.objects.filter(address="10.1.0.20").exists()


def test_vip_create_allocates_and_rejects_changes_of_fixed_fields(world):
    client = world.client("a_member")
    created = client.post(
        "/api/vips/",
        {"tenant": world.tenant_a.pk, "name": "api", "pool": world.pool_a_only.pk},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["address"] == "198.51.100.1"
    outside = client.post(
        "/api/vips/", {"tenant": world.tenant_a.pk, "name": "x", "address": "192.0.2.7"}, format="json"
    )
    assert outside.status_code == 400
    assert "not inside an allowed VIP pool" in outside.json()["address"][0]
    moved = client.patch(f"/api/vips/{created.json()['id']}/", {"address": "198.51.100.9"}, format="json")
    assert moved.status_code == 400
    assert "cannot be changed" in moved.json()["address"][0]


def test_listener_crud(world):
    client = world.client("a_member")
    created = client.post(
        "/api/listeners/",
        {"vip": world.vip_a.pk, "protocol": "udp", "port": 53, "health_check": {"kind": "tcp"}},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["generation"] == 0
    clash = client.post(
        "/api/listeners/", {"vip": world.vip_a.pk, "protocol": "tcp", "port": 80}, format="json"
    )
    assert clash.status_code == 409  # a port another listener holds: a conflict (docs/operations.md)
    assert "port" in clash.json()
    patched = client.patch(f"/api/listeners/{created.json()['id']}/", {"drain_timeout_s": 5}, format="json")
    assert patched.json()["drain_timeout_s"] == 5
    assert client.delete(f"/api/listeners/{created.json()['id']}/").status_code == 204


def test_filters_and_pagination(world):
    client = world.client("operator")
    assert client.get("/api/vips/", {"address": "203.0.113.20"}).json()["count"] == 1
    page = client.get("/api/backends/", {"limit": 1, "offset": 1}).json()
    assert page["count"] == 3
    assert len(page["results"]) == 1
    assert page["next"] is not None
    assert client.get("/api/backends/", {"vip": world.vip_b.pk}).json()["count"] == 1
    assert client.get("/api/hosts/", {"role": "lb-node"}).json()["count"] == 1
    assert client.get("/api/generations/", {"listener": world.listener_a.pk}).json()["count"] == 1
    invalid = client.get("/api/vips/", {"provisioning_status": "sleeping"})
    assert invalid.status_code == 400


def test_agent_node_token_is_shown_once_and_hashed(world):
    client = world.client("operator")
    created = client.post(
        "/api/agent-nodes/",
        {"name": "mux-a", "host": world.host_shared.pk, "role": "mux", "address": "10.0.0.2"},
        format="json",
    )
    assert created.status_code == 201, created.content
    key = created.json()["token"]
    node = AgentNode.objects.get(name="mux-a")
    assert key not in node.token_hash
    assert AgentNode.authenticate(key) == node
    assert "token" not in client.get(f"/api/agent-nodes/{node.pk}/").json()
    rotated = client.post(f"/api/agent-nodes/{node.pk}/rotate-token/").json()["token"]
    assert AgentNode.authenticate(key) is None
    assert AgentNode.authenticate(rotated) == node
    assert world.client("a_admin").get("/api/agent-nodes/").status_code == 403


def test_listener_flow_idle_timeout_is_optional_range_checked_and_clearable(world):
    client = world.client("a_member")
    body = {"vip": world.vip_a.pk, "protocol": "udp", "port": 53}
    created = client.post("/api/listeners/", body, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["flow_idle_timeout_s"] is None  # the agents' default for the protocol
    url = f"/api/listeners/{created.json()['id']}/"
    for bad in (1, 604_801, "soon"):
        refused = client.patch(url, {"flow_idle_timeout_s": bad}, format="json")
        assert refused.status_code == 400, (bad, refused.content)
        (message,) = refused.json()["flow_idle_timeout_s"]
        assert "from 2 to 604800" in message, message
    assert Listener.objects.get(pk=created.json()["id"]).flow_idle_timeout_s is None
    patched = client.patch(url, {"flow_idle_timeout_s": 600}, format="json")
    assert patched.status_code == 200, patched.content
    assert patched.json()["flow_idle_timeout_s"] == 600
    assert Listener.objects.get(pk=created.json()["id"]).flow_idle_timeout_s == 600
    cleared = client.patch(url, {"flow_idle_timeout_s": None}, format="json")
    assert cleared.json()["flow_idle_timeout_s"] is None
    with_timeout = client.post(
        "/api/listeners/",
        {"vip": world.vip_a.pk, "protocol": "tcp", "port": 8443, "flow_idle_timeout_s": 86_400},
        format="json",
    )
    assert with_timeout.status_code == 201, with_timeout.content
    assert with_timeout.json()["flow_idle_timeout_s"] == 86_400


def test_list_and_detail_bodies_are_byte_for_byte_what_stock_drf_fields_give(world, monkeypatch):
    """The VIP list's cheap URLs (reversed once per request), time-zone lookups and rendering from
    `.values()` rows change no byte of any response: the same requests with DRF's own fields and
    the serializer answer exactly the same bodies."""
    from rest_framework import serializers as drf

    from datacenter.loadbalancing.api import serializers, views

    def stock(serializer_class, view_name):
        return type(
            f"Stock{serializer_class.__name__}",
            (serializer_class,),
            {
                "url": drf.HyperlinkedIdentityField(view_name=view_name),
                "serializer_field_mapping": drf.ModelSerializer.serializer_field_mapping,
                "_readable_fields": drf.Serializer._readable_fields,
            },
        )

    cases = [
        (views.VipViewSet, serializers.VipSerializer, "loadbalancing-api:vip-detail", "/api/vips/"),
        (
            views.ListenerViewSet,
            serializers.ListenerSerializer,
            "loadbalancing-api:listener-detail",
            "/api/listeners/",
        ),
    ]
    client = world.client("a_member")
    requests = []
    for _, _, _, path in cases:
        first = client.get(path).json()["results"][0]["id"]
        requests += [(path, {}), (path, {"limit": 1000}), (path, {"format": "json"}), (f"{path}{first}/", {})]
    # the VIP list's own path (rendered from rows): an ordering, an offset past the end, no match
    vips = "/api/vips/"
    requests += [(vips, {"ordering": "-created"}), (vips, {"offset": 5}), (vips, {"q": "no-such"})]
    ours = [client.get(path, params) for path, params in requests]
    for viewset, serializer_class, view_name, _ in cases:
        monkeypatch.setattr(viewset, "serializer_class", stock(serializer_class, view_name))
    monkeypatch.setattr(views.VipViewSet, "values_list_rendering", False)
    theirs = [client.get(path, params) for path, params in requests]
    for (path, params), mine, reference in zip(requests, ours, theirs, strict=True):
        assert mine.status_code == reference.status_code == 200, (path, params)
        if b'"results":[]' not in mine.content:
            assert b'"url":"http://testserver/api/' in mine.content, mine.content[:200]
        assert mine.content == reference.content, (path, params)
