"""The VIP list cache (datacenter/loadbalancing/vip_list_cache.py) never serves a body older than
the last committed change of the caller's VIPs, whatever made the change, and keeps tenants apart.

Every check compares the list with what the uncached code answers at that moment (the cache
turned off for one call), so "correct" means "byte for byte what the API would say without it"."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from datacenter.loadbalancing import services, vip_list_cache
from datacenter.loadbalancing.models import Vip
from datacenter.loadbalancing.models_sync import VipListVersion
from datacenter.tenancy.models import Membership
from datacenter.testing import World

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _empty_cache():
    vip_list_cache.cache.clear()
    yield
    vip_list_cache.cache.clear()


def _list(world: World, role: str = "a_member", query: str = "") -> bytes:
    response = world.client(role).get(f"/api/vips/{query}")
    assert response.status_code == 200, response.content
    return response.content


def _uncached(world: World, settings, role: str = "a_member", query: str = "") -> bytes:
    settings.DATACENTER_VIP_LIST_CACHE = False
    try:
        return _list(world, role, query)
    finally:
        settings.DATACENTER_VIP_LIST_CACHE = True


def test_a_repeated_list_is_served_from_the_cache_with_the_same_body(world, settings):
    first = _list(world)
    hits = vip_list_cache.cache.hits
    assert _list(world) == first
    assert vip_list_cache.cache.hits == hits + 1
    assert first == _uncached(world, settings)


@pytest.mark.parametrize(
    "change",
    [
        "create",
        "rename",
        "queryset_update_status",
        "bulk_update",
        "raw_sql_update",
        "delete",
    ],
)
def test_every_kind_of_write_to_a_vip_is_seen_by_the_next_list(world, settings, change):
    before = _list(world)
    assert _list(world) == before  # cached now
    vip = world.vip_a
    if change == "create":
        services.create_vip(tenant=world.tenant_a, name="new", address="203.0.113.30")
    elif change == "rename":
        services.update_vip(vip, name="renamed")
    elif change == "queryset_update_status":  # what agent_sync does: no save(), no signal
        Vip.objects.filter(pk=vip.pk).update(provisioning_status="pending_update", operating_status="error")
    elif change == "bulk_update":
        vip.description = "bulk"
        Vip.objects.bulk_update([vip], ["description"])
    elif change == "raw_sql_update":
        with connection.cursor() as cursor:
            cursor.execute("UPDATE loadbalancing_vip SET description = 'raw' WHERE id = %s", [vip.pk])
    elif change == "delete":
        vip.listeners.all().delete()
        services.delete_vip(Vip.objects.get(pk=vip.pk))
    after = _list(world)
    assert after != before
    assert after == _uncached(world, settings)


def test_a_tenant_rename_reorders_a_two_tenant_members_list(world, settings):
    Membership.objects.create(user=world.users["a_member"], tenant=world.tenant_b, role="member")
    services.update_vip(world.vip_b, name="zzz")  # same name "web" otherwise: order by tenant name
    before = _list(world)
    assert _list(world) == before
    world.tenant_a.name = "Zeta"  # Acme < Globex before, Globex < Zeta after
    world.tenant_a.save()
    after = _list(world)
    assert after != before
    assert after == _uncached(world, settings)


def test_tenants_are_kept_apart_and_a_removed_member_loses_the_list(world, settings):
    a_body, b_body = _list(world, "a_member"), _list(world, "b_member")
    assert a_body != b_body
    assert b"203.0.113.10" in a_body
    assert b"203.0.113.10" not in b_body
    assert _list(world, "b_member") == b_body
    Membership.objects.filter(user=world.users["a_member"]).delete()
    assert world.client("a_member").get("/api/vips/").json()["count"] == 0


def test_filters_and_operators_are_not_cached_and_pages_are_keyed_apart(world, settings):
    services.create_vip(tenant=world.tenant_a, name="second", address="203.0.113.31")
    first_page, second_page = _list(world, query="?limit=1"), _list(world, query="?limit=1&offset=1")
    assert first_page != second_page
    assert _list(world, query="?limit=1") == first_page
    misses = vip_list_cache.cache.misses
    hits = vip_list_cache.cache.hits
    _list(world, query="?name=web")
    _list(world, "operator")
    assert (vip_list_cache.cache.hits, vip_list_cache.cache.misses) == (hits, misses)


def test_a_write_committed_between_the_version_read_and_the_row_read_is_never_hidden(
    world, settings, monkeypatch
):
    """The race the ordering rule is for: versions are read, then another transaction commits a
    change, then the rows are read and cached. The next list must show the change (it may come
    from the cache only if the cached body already shows it)."""
    real_versions = vip_list_cache.versions
    raced = []

    def versions_then_a_concurrent_write(tenant_ids):
        read = real_versions(tenant_ids)
        if not raced:
            raced.append(True)

            def write() -> None:
                Vip.objects.filter(pk=world.vip_a.pk).update(operating_status="error")
                connection.close()

            writer = threading.Thread(target=write)  # its own connection: committed on return
            writer.start()
            writer.join()
        return read

    monkeypatch.setattr(vip_list_cache, "versions", versions_then_a_concurrent_write)
    _list(world)
    monkeypatch.setattr(vip_list_cache, "versions", real_versions)
    assert b'"operating_status":"error"' in _list(world)
    assert _list(world) == _uncached(world, settings)


def test_a_write_committed_after_the_rows_were_read_invalidates_the_body(world, settings):
    before = _list(world)
    with transaction.atomic():
        Vip.objects.filter(pk=world.vip_a.pk).update(provisioning_status="error")
        # Not committed: a list now (another connection) still gets the old body, from the cache.
        seen_meanwhile = []
        reader = threading.Thread(target=lambda: (seen_meanwhile.append(_list(world)), connection.close()))
        reader.start()
        reader.join()
    assert seen_meanwhile == [before]
    after = _list(world)
    assert b'"provisioning_status":"error"' in after
    assert after == _uncached(world, settings)


def test_versions_never_repeat_after_a_tenants_row_is_rewritten(world):
    seen = set()
    for n in range(5):
        Vip.objects.filter(pk=world.vip_a.pk).update(description=f"d{n}")
        seen.add(VipListVersion.objects.get(tenant_id=world.tenant_a.pk).version)
    assert len(seen) == 5
    VipListVersion.objects.filter(tenant_id=world.tenant_a.pk).delete()
    Vip.objects.filter(pk=world.vip_a.pk).update(description="again")
    assert VipListVersion.objects.get(tenant_id=world.tenant_a.pk).version not in seen
