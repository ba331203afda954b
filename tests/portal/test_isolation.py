"""Tenant isolation for every tenant-scoped endpoint and method.

A member of another tenant gets 404 (never 403) for GET, PUT, PATCH and DELETE on tenant A's
objects, and nothing changes; a viewer of tenant A gets 403 on every write, and nothing changes;
lists never show another tenant's objects. Each case also has a positive control (A's member can
read the object) so a broken URL cannot make the 404 pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from datacenter.events.models import AuditEntry
from datacenter.loadbalancing.models import Backend, Generation, Listener, Vip
from datacenter.tenancy.models import ApiToken, Membership
from datacenter.testing import World


@pytest.fixture
def world(module_world, db) -> World:
    return module_world


@dataclass(frozen=True)
class Endpoint:
    name: str
    list_url: str | None
    url: Callable[[World], str]  # detail URL of an object of tenant A
    put: Callable[[World], dict] | None  # a valid PUT body (None: PUT not offered)
    patch: dict | None  # a valid PATCH body (None: PATCH not offered)
    delete: bool
    viewer_writes: bool = True  # False: the endpoint has no per-tenant role (e.g. own tokens)


def _backend_a(w: World) -> Backend:
    return Backend.objects.filter(listener=w.listener_a).order_by("position").first()


def _membership_a(w: World) -> Membership:
    return Membership.objects.get(user=w.users["a_member"], tenant=w.tenant_a)


ENDPOINTS = [
    Endpoint(
        "vip",
        "/api/vips/",
        lambda w: f"/api/vips/{w.vip_a.pk}/",
        lambda w: {"tenant": w.tenant_a.pk, "name": "renamed"},
        {"description": "changed"},
        True,
    ),
    Endpoint(
        "listener",
        "/api/listeners/",
        lambda w: f"/api/listeners/{w.listener_a.pk}/",
        lambda w: {"vip": w.vip_a.pk, "protocol": "tcp", "port": 81},
        {"port": 82},
        True,
    ),
    Endpoint("vip-status", None, lambda w: f"/api/vips/{w.vip_a.pk}/status/", None, None, False),
    Endpoint(
        "listener-backends",
        None,
        lambda w: f"/api/listeners/{w.listener_a.pk}/backends/",
        lambda w: {"backends": [{"address": "10.1.0.9", "port": 80}]},
        None,
        False,
    ),
    Endpoint(
        "backend",
        "/api/backends/",
        lambda w: f"/api/backends/{_backend_a(w).pk}/",
        lambda w: {"listener": w.listener_a.pk, "address": "10.1.0.5", "port": 8080, "weight": 5},
        {"admin_state": "draining"},
        True,
    ),
    Endpoint(
        "generation",
        "/api/generations/",
        lambda w: f"/api/generations/{Generation.objects.filter(listener=w.listener_a).first().pk}/",
        None,
        None,
        False,
    ),
    Endpoint(
        "audit",
        "/api/audit/",
        lambda w: f"/api/audit/{AuditEntry.objects.filter(tenant=w.tenant_a).first().pk}/",
        None,
        None,
        False,
    ),
    Endpoint(
        "host",
        "/api/hosts/",
        lambda w: f"/api/hosts/{w.host_a.pk}/",
        lambda w: {"name": "web-a1", "management_address": "10.1.0.50"},
        {"description": "x"},
        True,
    ),
    Endpoint(
        "tenant",
        "/api/tenants/",
        lambda w: f"/api/tenants/{w.tenant_a.pk}/",
        lambda w: {"name": "Acme", "slug": "acme", "max_vips": 99},
        {"max_vips": 99},
        True,
    ),
    Endpoint(
        "membership",
        "/api/memberships/",
        lambda w: f"/api/memberships/{_membership_a(w).pk}/",
        lambda w: {"user": "a_member", "tenant": w.tenant_a.pk, "role": "admin"},
        {"role": "admin"},
        True,
    ),
    Endpoint(
        "vip-pool",
        "/api/vip-pools/",
        lambda w: f"/api/vip-pools/{w.pool_a_only.pk}/",
        lambda w: {"name": "private-a", "prefix": "198.51.100.0/24"},
        {"description": "x"},
        True,
    ),
    Endpoint(
        "token",
        "/api/tokens/",
        lambda w: f"/api/tokens/{ApiToken.objects.filter(user=w.users['a_member']).first().pk}/",
        lambda w: {"name": "renamed"},
        {"write_enabled": False},
        True,
        viewer_writes=False,
    ),
]
BY_NAME = {e.name: e for e in ENDPOINTS}


def _write_cases():
    for e in ENDPOINTS:
        if e.put:
            yield e.name, "put"
        if e.patch is not None:
            yield e.name, "patch"
        if e.delete:
            yield e.name, "delete"


def _request(client, method: str, url: str, endpoint: Endpoint, world: World):
    if method == "put":
        return client.put(url, endpoint.put(world), format="json")
    if method == "patch":
        return client.patch(url, endpoint.patch, format="json")
    return client.delete(url)


def _state() -> tuple:
    """Everything a denied write could have touched."""
    return (
        list(Vip.objects.order_by("pk").values()),
        list(Listener.objects.order_by("pk").values()),
        list(Backend.objects.order_by("pk").values()),
        Generation.objects.count(),
        list(Membership.objects.order_by("pk").values()),
        list(ApiToken.objects.order_by("pk").values("pk", "name", "write_enabled")),
    )


@pytest.mark.parametrize("name", [e.name for e in ENDPOINTS])
def test_other_tenant_gets_404_on_get(world, name):
    endpoint = BY_NAME[name]
    url = endpoint.url(world)
    assert world.client("a_member").get(url).status_code == 200, "positive control: A's member reads it"
    # an operator reads every tenant's objects, but tokens are per user: a_member's is not theirs
    expected = 404 if name == "token" else 200
    assert world.client("operator").get(url).status_code == expected
    response = world.client("b_member").get(url)
    assert response.status_code == 404, response.content


@pytest.mark.parametrize(("name", "method"), list(_write_cases()))
def test_other_tenant_gets_404_on_write(world, name, method):
    endpoint = BY_NAME[name]
    url = endpoint.url(world)
    before = _state()
    response = _request(world.client("b_member"), method, url, endpoint, world)
    assert response.status_code == 404, response.content
    assert _state() == before


@pytest.mark.parametrize(
    ("name", "method"), [case for case in _write_cases() if BY_NAME[case[0]].viewer_writes]
)
def test_viewer_gets_403_on_write(world, name, method):
    endpoint = BY_NAME[name]
    url = endpoint.url(world)
    before = _state()
    response = _request(world.client("a_viewer"), method, url, endpoint, world)
    assert response.status_code == 403, response.content
    assert _state() == before


@pytest.mark.parametrize("name", [e.name for e in ENDPOINTS if e.list_url])
def test_lists_hide_other_tenants_objects(world, name):
    endpoint = BY_NAME[name]
    a_url = endpoint.url(world)
    a_listed = {
        item["url"].split("testserver", 1)[1]
        for item in world.client("a_member").get(endpoint.list_url, {"limit": 1000}).json()["results"]
    }
    assert a_url in a_listed, "positive control: A's member lists A's object"
    b_listed = {
        item["url"].split("testserver", 1)[1]
        for item in world.client("b_member").get(endpoint.list_url, {"limit": 1000}).json()["results"]
    }
    assert a_url not in b_listed


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/vips/", lambda w: {"tenant": w.tenant_a.pk, "name": "intruder"}, "tenant"),
        ("/api/listeners/", lambda w: {"vip": w.vip_a.pk, "protocol": "tcp", "port": 8000}, "vip"),
        (
            "/api/backends/",
            lambda w: {"listener": w.listener_a.pk, "address": "10.1.0.99", "port": 80},
            "listener",
        ),
    ],
)
def test_other_tenant_cannot_create_under_tenant_a(world, url, body, field):
    before = _state()
    response = world.client("b_member").post(url, body(world), format="json")
    # 404 naming the field: a reference the caller cannot see is answered as one that does not
    # exist (datacenter/api/exceptions.py), so nothing tells another tenant's objects apart.
    assert response.status_code == 404
    assert field in response.json()
    assert "does not exist" in str(response.json()[field])
    assert _state() == before


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/api/vips/", lambda w: {"tenant": w.tenant_a.pk, "name": "viewer-vip"}),
        ("/api/listeners/", lambda w: {"vip": w.vip_a.pk, "protocol": "tcp", "port": 8000}),
        ("/api/backends/", lambda w: {"listener": w.listener_a.pk, "address": "10.1.0.99", "port": 80}),
        ("/api/hosts/", lambda w: {"name": "h", "management_address": "10.9.9.9"}),
        ("/api/tenants/", lambda w: {"name": "New", "slug": "new"}),
        ("/api/memberships/", lambda w: {"user": "a_viewer", "tenant": w.tenant_a.pk, "role": "admin"}),
        ("/api/vip-pools/", lambda w: {"name": "p", "prefix": "192.0.2.0/24"}),
    ],
)
def test_viewer_cannot_create(world, url, body):
    before = _state()
    response = world.client("a_viewer").post(url, body(world), format="json")
    assert response.status_code == 403, response.content
    assert _state() == before


def test_member_write_succeeds_where_viewer_is_refused(world):
    """Positive control for the 403s: the same PATCH by a member of A works."""
    response = world.client("a_member").patch(
        f"/api/vips/{world.vip_a.pk}/", {"description": "ok"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert Vip.objects.get(pk=world.vip_a.pk).description == "ok"


def test_read_only_token_cannot_write(world):
    from datacenter.testing import make_token

    key = make_token(world.users["a_member"], write_enabled=False)
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/vips/").status_code == 200
    response = client.patch(f"/api/vips/{world.vip_a.pk}/", {"description": "x"}, format="json")
    assert response.status_code == 403
    assert "read-only" in response.json()["detail"]


def test_operator_sees_every_tenant(world):
    listed = world.client("operator").get("/api/vips/").json()
    assert {item["id"] for item in listed["results"]} == {world.vip_a.pk, world.vip_b.pk}


def test_unauthenticated_is_refused(world):
    from rest_framework.test import APIClient

    assert APIClient().get("/api/vips/").status_code == 401
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token dct_not-a-real-key")
    assert bad.get("/api/vips/").status_code == 401
