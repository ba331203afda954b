"""IPv6 through the REST API: an IPv6 VIP (allocated from an IPv6 pool or requested) takes IPv6
backends; a backend of the other family is refused with a 400 naming the field."""

from __future__ import annotations

import pytest

from datacenter.loadbalancing.models import Backend, VipPool


@pytest.fixture
def v6_listener(world):
    pool = VipPool.objects.create(name="public-v6", prefix="2001:db8:113::/64")
    pool.tenants.add(world.tenant_a)
    client = world.client("a_member")
    vip = client.post("/api/vips/", {"tenant": world.tenant_a.pk, "name": "v6", "pool": pool.pk},
                      format="json")
    assert vip.status_code == 201, vip.content
    listener = client.post("/api/listeners/", {"vip": vip.json()["id"], "protocol": "tcp", "port": 80},
                           format="json")
    assert listener.status_code == 201, listener.content
    return vip.json(), listener.json()


def test_ipv6_vip_is_allocated_and_takes_ipv6_backends(world, v6_listener):
    vip, listener = v6_listener
    assert vip["address"].startswith("2001:db8:113::")
    client = world.client("a_member")
    requested = client.post("/api/vips/", {"tenant": world.tenant_a.pk, "name": "v6b",
                                           "address": "2001:db8:113::99"}, format="json")
    assert requested.status_code == 201, requested.content
    assert requested.json()["address"] == "2001:db8:113::99"
    put = client.put(f"/api/listeners/{listener['id']}/backends/",
                     {"backends": [{"address": "fd00:90::21", "port": 80},
                                   {"address": "fd00:90::22", "port": 80, "weight": 2}]}, format="json")
    assert put.status_code == 200, put.content
    assert [b["address"] for b in put.json()["backends"]] == ["fd00:90::21", "fd00:90::22"]
    assert put.json()["generation"] == 1


def test_backend_of_the_other_family_is_refused_naming_the_field(world, v6_listener):
    vip, listener = v6_listener
    client = world.client("a_member")
    mixed = client.put(f"/api/listeners/{listener['id']}/backends/",
                       {"backends": [{"address": "fd00:90::21", "port": 80},
                                     {"address": "10.90.0.22", "port": 80}]}, format="json")
    assert mixed.status_code == 400, mixed.content
    assert f"10.90.0.22 is IPv4 but VIP {vip['address']} is IPv6" in mixed.json()["backends[1].address"][0]
    single = client.post("/api/backends/", {"listener": listener["id"], "address": "10.90.0.22", "port": 80},
                         format="json")
    assert single.status_code == 400, single.content
    assert "is IPv4 but VIP" in single.json()["address"][0]
    assert not Backend.objects.filter(listener_id=listener["id"]).exists()
    # and the other way round: an IPv6 backend on the IPv4 VIP of the world
    v4 = client.post("/api/backends/",
                     {"listener": world.listener_a.pk, "address": "fd00:90::21", "port": 80}, format="json")
    assert v4.status_code == 400, v4.content
    assert "is IPv6 but VIP 203.0.113.10 is IPv4" in v4.json()["address"][0]
