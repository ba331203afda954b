"""Hosts: operators manage them; roles are validated; tenants see only hosts assigned to them."""

from __future__ import annotations


def test_operator_creates_host_with_roles_and_bad_roles_are_named(world):
    client = world.client("operator")
    created = client.post(
        "/api/hosts/",
        {"name": "hv-9", "management_address": "10.0.0.9", "roles": ["hypervisor", "lb-node"]},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["roles"] == ["hypervisor", "lb-node"]
    bad = client.post(
        "/api/hosts/", {"name": "x", "management_address": "10.0.0.10", "roles": ["toaster"]}, format="json"
    )
    assert bad.status_code == 400
    assert "roles" in bad.json()
    duplicate = client.post(
        "/api/hosts/",
        {"name": "y", "management_address": "10.0.0.11", "roles": ["lb-node", "lb-node"]},
        format="json",
    )
    assert duplicate.status_code == 400
    assert "duplicates" in str(duplicate.json()["roles"])
    bad_address = client.get("/api/hosts/", {"management_address": "not-an-ip"})
    assert bad_address.status_code == 400
    assert "management_address" in bad_address.json()


def test_tenants_see_their_hosts_only(world):
    names = {h["name"] for h in world.client("a_member").get("/api/hosts/").json()["results"]}
    assert names == {"web-a1"}
    assert world.client("b_member").get("/api/hosts/").json()["results"] == []
    assert world.client("operator").get("/api/hosts/", {"role": "backend-host"}).json()["count"] == 1
