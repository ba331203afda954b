"""List pagination: the count query is skipped when the page tells the count, and every body is
still exactly what DRF's own LimitOffsetPagination answers (count, next, previous, results)."""

from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import pagination as drf_pagination

from datacenter.api.pagination import LimitOffsetPagination
from datacenter.loadbalancing.models import Vip, VipPool


def _add_vips(world, n: int) -> None:
    pool = VipPool.objects.create(name="pg-pool", prefix="10.231.0.0/16")
    pool.tenants.add(world.tenant_a)
    Vip.objects.bulk_create(
        Vip(tenant=world.tenant_a, pool=pool, name=f"pg-{i}", address=f"10.231.0.{i + 1}") for i in range(n)
    )


PAGES = [{}, {"limit": 3}, {"limit": 3, "offset": 3}, {"limit": 3, "offset": 6}, {"limit": 4, "offset": 4},
         {"limit": 8}, {"limit": 9}, {"offset": 8}, {"offset": 20}, {"limit": 1, "offset": 7}]  # fmt: skip


def test_bodies_are_drfs_with_and_without_the_count_query(world, monkeypatch):
    _add_vips(world, 7)  # 8 VIPs in tenant A with the world's own
    client = world.client("a_member")
    client.get("/api/status/")  # the token's first use writes last_used: keep it out of the counts
    ours, counted = [], []
    for params in PAGES:
        with CaptureQueriesContext(connection) as ctx:
            ours.append(client.get("/api/vips/", params))
        counted.append(any("COUNT(" in q["sql"] for q in ctx.captured_queries))
    stock = drf_pagination.LimitOffsetPagination.paginate_queryset
    monkeypatch.setattr(LimitOffsetPagination, "paginate_queryset", stock)
    for params, mine in zip(PAGES, ours, strict=True):
        reference = client.get("/api/vips/", params)
        assert mine.status_code == reference.status_code == 200, params
        assert mine.content == reference.content, params
    # one row past the page is fetched: when it is not there, the page ends the list and tells
    # the count; only a page with rows after it, or an empty page past offset 0, counts
    assert dict(zip(map(str, PAGES), counted, strict=True)) == {
        "{}": False,  # 8 rows, limit 50
        "{'limit': 3}": True,  # rows follow
        "{'limit': 3, 'offset': 3}": True,
        "{'limit': 3, 'offset': 6}": False,  # 2 rows: the end
        "{'limit': 4, 'offset': 4}": False,  # full, but nothing after it
        "{'limit': 8}": False,
        "{'limit': 9}": False,
        "{'offset': 8}": True,  # empty past offset 0: how long the list is, is unknown
        "{'offset': 20}": True,
        "{'limit': 1, 'offset': 7}": False,
    }
