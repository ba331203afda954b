"""Domain rules of services.py: generations, dry runs, concurrency, quotas, validation messages."""

from __future__ import annotations

import pytest

from datacenter.events.middleware import bound_request_id
from datacenter.events.models import AuditEntry, Event
from datacenter.inventory.models import Host
from datacenter.loadbalancing import services
from datacenter.loadbalancing.models import Backend, Generation, ImmutableError, Listener, Vip
from datacenter.loadbalancing.signals import generation_created
from datacenter.services_errors import FieldErrors, QuotaExceeded, StaleGeneration


def _fresh(listener: Listener) -> Listener:
    return Listener.objects.get(pk=listener.pk)


def _errors(excinfo) -> dict:
    return excinfo.value.errors


def test_replace_makes_numbered_immutable_generation_with_audit_and_event(world):
    listener = world.listener_a
    start = listener.generation
    with bound_request_id("req-42"):
        result = services.replace_backends(
            listener,
            [
                {"address": "10.1.0.7", "port": 80, "weight": 3, "host": "web-a1"},
                {"address": "10.1.0.5", "port": 8080},
            ],
            user=world.users["a_member"],
        )
    assert result.changed
    assert result.generation.number == start + 1
    assert _fresh(listener).generation == start + 1
    generation = Generation.objects.get(listener=listener, number=start + 1)
    assert generation.backends == [
        {"address": "10.1.0.7", "port": 80, "weight": 3, "admin_state": "active", "host": "web-a1"},
        {"address": "10.1.0.5", "port": 8080, "weight": 1, "admin_state": "active", "host": None},
    ]
    assert generation.author == world.users["a_member"]
    assert generation.request_id == "req-42"
    audit = AuditEntry.objects.filter(action="replace_backends", object_id=str(listener.pk)).latest("id")
    assert audit.actor == "a_member"
    assert audit.request_id == "req-42"
    assert audit.tenant_id == world.tenant_a.pk
    assert audit.before["generation"] == start
    assert audit.after["generation"] == start + 1
    assert [b["address"] for b in audit.before["backends"]] == ["10.1.0.5", "10.1.0.6"]
    event = Event.objects.filter(kind="listener.backends_replaced").latest("id")
    assert event.data["generation"] == start + 1
    assert event.tenant_id == world.tenant_a.pk
    assert [b["address"] for b in event.data["changes"]["added"]] == ["10.1.0.7"]
    assert [b["address"] for b in event.data["changes"]["removed"]] == ["10.1.0.6"]
    generation.backends = []
    with pytest.raises(ImmutableError):
        generation.save()
    with pytest.raises(ImmutableError):
        generation.delete()


def test_identical_list_changes_nothing(world):
    listener = world.listener_a
    before = Generation.objects.count()
    result = services.replace_backends(
        listener, services.current_backends(listener), user=world.users["a_member"]
    )
    assert not result.changed
    assert result.generation is None
    assert Generation.objects.count() == before
    assert result.generation_number == listener.generation


def test_dry_run_returns_diff_and_writes_nothing(world):
    listener = world.listener_a
    rows = list(Backend.objects.filter(listener=listener).values())
    counts = (Generation.objects.count(), AuditEntry.objects.count(), Event.objects.count())
    result = services.replace_backends(
        listener,
        [
            {"address": "10.1.0.6", "port": 8080, "weight": 2, "admin_state": "draining"},
            {"address": "10.1.0.8", "port": 8080},
        ],
        user=world.users["a_member"],
        dry_run=True,
    )
    assert result.dry_run
    assert result.changed
    assert result.generation is None
    assert result.diff["added"] == [
        {"address": "10.1.0.8", "port": 8080, "weight": 1, "admin_state": "active", "host": None}
    ]
    assert [b["address"] for b in result.diff["removed"]] == ["10.1.0.5"]
    assert result.diff["changed"] == [
        {
            "before": {
                "address": "10.1.0.6",
                "port": 8080,
                "weight": 2,
                "admin_state": "active",
                "host": None,
            },
            "after": {
                "address": "10.1.0.6",
                "port": 8080,
                "weight": 2,
                "admin_state": "draining",
                "host": None,
            },
        }
    ]
    assert list(Backend.objects.filter(listener=listener).values()) == rows
    assert (Generation.objects.count(), AuditEntry.objects.count(), Event.objects.count()) == counts


def test_stale_generation_is_refused_409_or_412(world):
    listener = world.listener_a
    seen = listener.generation
    services.replace_backends(listener, [{"address": "10.1.0.9", "port": 80}], expected_generation=seen)
    with pytest.raises(StaleGeneration) as body_precondition:
        services.replace_backends(listener, [{"address": "10.1.0.10", "port": 80}], expected_generation=seen)
    assert body_precondition.value.http_status == 409
    assert body_precondition.value.current == seen + 1
    with pytest.raises(StaleGeneration) as if_match:
        services.replace_backends(listener, [], expected_generation=seen, via_if_match=True)
    assert if_match.value.http_status == 412
    assert services.current_backends(listener)[0]["address"] == "10.1.0.9"


def test_kept_backends_keep_their_ids(world):
    listener = world.listener_a
    kept = Backend.objects.get(listener=listener, address="10.1.0.6")
    services.replace_backends(
        listener, [{"address": "10.1.0.6", "port": 8080, "weight": 7}, {"address": "10.1.0.11", "port": 8080}]
    )
    kept_after = Backend.objects.get(listener=listener, address="10.1.0.6")
    assert kept_after.pk == kept.pk
    assert kept_after.weight == 7
    assert kept_after.position == 0
    assert not Backend.objects.filter(listener=listener, address="10.1.0.5").exists()


def test_generation_created_signal_fires_on_commit(world, django_capture_on_commit_callbacks):
    received = []

    def receiver(sender, generation, **kwargs):
        received.append(generation.number)

    generation_created.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            result = services.replace_backends(world.listener_a, [{"address": "10.1.0.12", "port": 80}])
    finally:
        generation_created.disconnect(receiver)
    assert received == [result.generation.number]


def test_backend_quota_has_a_clear_message(world):
    world.tenant_a.max_backends_per_listener = 2
    world.tenant_a.save()
    with pytest.raises(QuotaExceeded) as excinfo:
        services.replace_backends(
            world.listener_a, [{"address": f"10.1.0.{i}", "port": 80} for i in range(20, 23)]
        )
    assert excinfo.value.quota == "max_backends_per_listener"
    assert excinfo.value.limit == 2
    assert "at most 2 backends per listener; this list has 3" in str(excinfo.value)


def test_vip_and_listener_quotas(world):
    world.tenant_a.max_vips = 1
    world.tenant_a.max_listeners_per_vip = 1
    world.tenant_a.save()
    with pytest.raises(QuotaExceeded, match="at most 1 VIPs and already has 1"):
        services.create_vip(tenant=world.tenant_a, name="second")
    with pytest.raises(QuotaExceeded, match="at most 1 listeners per VIP"):
        services.create_listener(vip=world.vip_a, port=443)


@pytest.mark.parametrize(
    ("items", "field", "fragment"),
    [
        ([{"address": "10.1.0.300", "port": 80}], "backends[0].address", "not a valid IPv4 or IPv6 address"),
        (
            [{"address": "2001:db8::5", "port": 80}],
            "backends[0].address",
            "IPv6 but VIP 203.0.113.10 is IPv4",
        ),
        ([{"address": "10.1.0.5", "port": 0}], "backends[0].port", "0 is not a port number"),
        ([{"address": "10.1.0.5", "port": 70000}], "backends[0].port", "70000 is not a port number"),
        ([{"address": "10.1.0.5", "port": "80"}], "backends[0].port", "'80' is not a port number"),
        (
            [{"address": "10.1.0.5", "port": 80, "weight": 0}],
            "backends[0].weight",
            "0 is not a weight from 1 to 256",
        ),
        ([{"address": "10.1.0.5", "port": 80, "weight": 1000}], "backends[0].weight", "1000 is not a weight"),
        (
            [{"address": "10.1.0.5", "port": 80}, {"address": "10.1.0.5", "port": 80}],
            "backends[1].address",
            "duplicate of backends[0]",
        ),
        ([{"address": "203.0.113.20", "port": 80}], "backends[0].address", "is a VIP address"),
        ([{"address": "10.1.0.5", "port": 80, "host": "nope"}], "backends[0].host", "unknown host 'nope'"),
        (
            [{"address": "10.1.0.5", "port": 80, "admin_state": "sleeping"}],
            "backends[0].admin_state",
            "'sleeping'",
        ),
        ([{"address": "10.1.0.5", "port": 80, "colour": "red"}], "backends[0].colour", "unknown field"),
        ([{"address": "127.0.0.1", "port": 80}], "backends[0].address", "not a unicast host address"),
        (["10.1.0.5:80"], "backends[0]", "expected an object"),
    ],
)
def test_validation_errors_name_the_field(world, items, field, fragment):
    generation = world.listener_a.generation
    with pytest.raises(FieldErrors) as excinfo:
        services.replace_backends(world.listener_a, items)
    errors = _errors(excinfo)
    assert field in errors, errors
    assert fragment in " ".join(errors[field])
    assert _fresh(world.listener_a).generation == generation


def test_other_tenants_host_is_unknown(world):
    other = Host.objects.create(name="globex-web", management_address="10.2.0.5", tenant=world.tenant_b)
    with pytest.raises(FieldErrors) as excinfo:
        services.replace_backends(world.listener_a, [{"address": "10.1.0.5", "port": 80, "host": other.name}])
    assert "unknown host" in _errors(excinfo)["backends[0].host"][0]
    result = services.replace_backends(
        world.listener_a, [{"address": "10.1.0.5", "port": 80, "host": "lb-1"}]
    )
    assert result.backends[0]["host"] == "lb-1", "shared hosts are usable by every tenant"


def test_vip_address_must_be_inside_an_allowed_pool(world):
    with pytest.raises(FieldErrors) as outside:
        services.create_vip(tenant=world.tenant_a, name="x", address="192.0.2.1")
    assert "192.0.2.1 is not inside an allowed VIP pool" in _errors(outside)["address"][0]
    with pytest.raises(FieldErrors) as not_allowed:
        services.create_vip(tenant=world.tenant_b, name="x", address="198.51.100.5")
    assert "not inside an allowed VIP pool for tenant 'Globex'" in _errors(not_allowed)["address"][0]
    with pytest.raises(FieldErrors) as pool_denied:
        services.create_vip(tenant=world.tenant_b, name="x", pool=world.pool_a_only)
    assert "not available to tenant 'Globex'" in _errors(pool_denied)["pool"][0]
    with pytest.raises(FieldErrors) as taken:
        services.create_vip(tenant=world.tenant_b, name="x", address="203.0.113.10")
    assert "already used by another VIP" in _errors(taken)["address"][0]
    services.replace_backends(world.listener_b, [{"address": "203.0.113.99", "port": 80}])
    with pytest.raises(FieldErrors) as backend_address:
        services.create_vip(tenant=world.tenant_a, name="x", address="203.0.113.99")
    assert "already used as a backend address" in _errors(backend_address)["address"][0]
    with pytest.raises(FieldErrors) as bad:
        services.create_vip(tenant=world.tenant_a, name="x", address="not-an-ip")
    assert "'not-an-ip' is not a valid IPv4 or IPv6 address" in _errors(bad)["address"][0]


def test_vip_allocation_takes_the_first_free_address(world):
    vip = services.create_vip(tenant=world.tenant_a, name="auto", pool=world.pool_a_only)
    assert vip.address == "198.51.100.1"
    second = services.create_vip(tenant=world.tenant_a, name="auto2", pool=world.pool_a_only)
    assert second.address == "198.51.100.2"
    assert Vip.objects.get(pk=vip.pk).pool == world.pool_a_only


def test_listener_port_clash_and_health_check_validation(world):
    with pytest.raises(FieldErrors) as clash:
        services.create_listener(vip=world.vip_a, protocol="tcp", port=80)
    assert "already has a tcp listener on port 80" in _errors(clash)["port"][0]
    udp = services.create_listener(vip=world.vip_a, protocol="udp", port=80)
    assert udp.protocol == "udp"
    with pytest.raises(FieldErrors) as hc:
        services.create_listener(
            vip=world.vip_a, port=8080, health_check={"kind": "http", "path": "x", "interval_s": 0}
        )
    assert set(_errors(hc)) == {"health_check.path", "health_check.interval_s"}
    good = services.create_listener(vip=world.vip_a, port=8081, health_check={"kind": "http"})
    assert good.health_check == {
        "kind": "http",
        "path": "/",
        "interval_s": 2,
        "timeout_s": 1,
        "rise": 2,
        "fall": 2,
    }


def test_single_backend_helpers_each_make_a_generation(world):
    listener = world.listener_a
    start = listener.generation
    backend = Backend.objects.get(listener=listener, address="10.1.0.6")
    drained, _ = services.update_backend(backend, {"admin_state": "draining"})
    assert drained.pk == backend.pk
    assert drained.admin_state == "draining"
    added, _ = services.add_backend(listener, {"address": "10.1.0.13", "port": 8080})
    assert added.position == 2
    services.remove_backend(Backend.objects.get(listener=listener, address="10.1.0.5"))
    assert [b["address"] for b in services.current_backends(listener)] == ["10.1.0.6", "10.1.0.13"]
    assert _fresh(listener).generation == start + 3


def test_flow_idle_timeout_outside_the_agents_range_is_refused_by_the_service(world):
    """The service checks it too (admin, seed and tasks do not go through the serializer): a value
    the agents would refuse never reaches the document."""
    for bad in (0, 1, 604_801, "600", True):
        with pytest.raises(FieldErrors) as excinfo:
            services.update_listener(world.listener_a, flow_idle_timeout_s=bad)
        assert "from 2 to 604800" in excinfo.value.errors["flow_idle_timeout_s"][0]
    assert Listener.objects.get(pk=world.listener_a.pk).flow_idle_timeout_s is None
    services.update_listener(world.listener_a, flow_idle_timeout_s=2)
    assert Listener.objects.get(pk=world.listener_a.pk).flow_idle_timeout_s == 2
