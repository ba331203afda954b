"""List endpoints make a constant number of queries: the same count with 10 and with 100 objects."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from datacenter.events.models import AuditEntry, Event
from datacenter.inventory.models import Host
from datacenter.loadbalancing.models import AgentNode, Backend, Generation, Listener, Vip, VipPool
from datacenter.tenancy.models import ApiToken, Membership, Tenant
from datacenter.testing import World, make_user


def _vips(w: World, start: int, n: int) -> None:
    second_octet = 200 + start // 10
    pool = VipPool.objects.create(name=f"qc-{start}", prefix=f"10.{second_octet}.0.0/16")
    pool.tenants.add(w.tenant_a)
    Vip.objects.bulk_create(
        Vip(
            tenant=w.tenant_a,
            pool=pool,
            name=f"qc-{start + i}",
            address=f"10.{second_octet}.{i // 250}.{i % 250 + 1}",
        )
        for i in range(n)
    )


def _listeners(w: World, start: int, n: int) -> None:
    Listener.objects.bulk_create(Listener(vip=w.vip_a, port=10000 + start + i) for i in range(n))


def _backends(w: World, start: int, n: int) -> None:
    Backend.objects.bulk_create(
        Backend(
            listener=w.listener_a,
            position=10 + start + i,
            address="10.9.0.1",
            port=1000 + start + i,
            host=w.host_a,
        )
        for i in range(n)
    )


def _generations(w: World, start: int, n: int) -> None:
    Generation.objects.bulk_create(
        Generation(listener=w.listener_a, number=100 + start + i, backends=[], author=w.users["a_member"])
        for i in range(n)
    )


def _audit(w: World, start: int, n: int) -> None:
    AuditEntry.objects.bulk_create(
        AuditEntry(actor="x", tenant=w.tenant_a, action="update", object_type="t", user=w.users["a_member"])
        for _ in range(n)
    )


def _events(w: World, start: int, n: int) -> None:
    Event.objects.bulk_create(Event(tenant=w.tenant_a, kind="qc", object_type="t") for _ in range(n))


def _hosts(w: World, start: int, n: int) -> None:
    Host.objects.bulk_create(
        Host(name=f"qc-{start + i}", management_address="10.8.0.1", tenant=w.tenant_a) for i in range(n)
    )


def _pools(w: World, start: int, n: int) -> None:
    for i in range(n):
        pool = VipPool.objects.create(name=f"qcp-{start + i}", prefix=f"10.{start + i}.0.0/24")
        pool.tenants.add(w.tenant_a, w.tenant_b)


def _tenants(w: World, start: int, n: int) -> None:
    Tenant.objects.bulk_create(Tenant(name=f"qc-{start + i}", slug=f"qc-{start + i}") for i in range(n))
    Membership.objects.bulk_create(
        Membership(user=w.users["a_member"], tenant=t)
        for t in Tenant.objects.filter(slug__startswith="qc-", memberships=None)
    )


def _memberships(w: World, start: int, n: int) -> None:
    users = [make_user(f"qc-{start + i}") for i in range(n)]
    Membership.objects.bulk_create(Membership(user=u, tenant=w.tenant_a) for u in users)


def _tokens(w: World, start: int, n: int) -> None:
    for _ in range(n):
        ApiToken.objects.create_token(w.users["a_member"], name="qc")


def _agents(w: World, start: int, n: int) -> None:
    AgentNode.objects.bulk_create(AgentNode(name=f"qc-{start + i}", host=w.host_shared) for i in range(n))


CASES: dict[str, tuple[str, Callable, str]] = {
    "vips": ("/api/vips/", _vips, "a_member"),
    "listeners": ("/api/listeners/", _listeners, "a_member"),
    "backends": ("/api/backends/", _backends, "a_member"),
    "generations": ("/api/generations/", _generations, "a_member"),
    "audit": ("/api/audit/", _audit, "a_member"),
    "events": ("/api/events/", _events, "a_member"),
    "hosts": ("/api/hosts/", _hosts, "a_member"),
    "vip-pools": ("/api/vip-pools/", _pools, "a_member"),
    "tenants": ("/api/tenants/", _tenants, "a_member"),
    "memberships": ("/api/memberships/", _memberships, "a_member"),
    "tokens": ("/api/tokens/", _tokens, "a_member"),
    "agent-nodes": ("/api/agent-nodes/", _agents, "operator"),
}


def _count(client, url: str) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, {"limit": 1000})
    assert response.status_code == 200, response.content
    return len(ctx.captured_queries), len(response.json()["results"])


@pytest.mark.parametrize("name", list(CASES))
def test_list_query_count_does_not_grow_with_rows(world, name):
    url, grow, role = CASES[name]
    client = world.client(role)
    operator = world.client("operator")
    for warm in (client, operator):
        warm.get("/api/status/")  # the first use of a token records last_used: keep that write out
    grow(world, 0, 10)
    queries_10, rows_10 = _count(client, url)
    grow(world, 10, 90)
    queries_100, rows_100 = _count(client, url)
    assert rows_100 >= rows_10 + 90, "the growth must be visible in the list"
    assert queries_100 == queries_10, f"{url}: {queries_10} queries with ~10 rows, {queries_100} with ~100"
    operator_100, _ = _count(operator, url)
    grow(world, 100, 10)
    operator_110, _ = _count(operator, url)
    assert operator_110 == operator_100
