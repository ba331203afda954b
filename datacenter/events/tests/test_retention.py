"""Retention: events, audit entries and generations pruned by age and count, keeping each
listener's newest generations (its current one always) and the newest rows of the feeds."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from datacenter.events.models import AuditEntry, Event
from datacenter.events.retention import prune_history
from datacenter.events.tasks import prune_history as prune_history_task
from datacenter.loadbalancing import services
from datacenter.loadbalancing.models import Generation


def _age_everything(days: int) -> None:
    past = timezone.now() - timedelta(days=days)
    Event.objects.update(time=past)
    AuditEntry.objects.update(time=past)
    Generation.objects.update(created=past)


def _replace_n_times(listener, n: int) -> None:
    for i in range(n):
        services.replace_backends(listener, [{"address": "10.1.0.9", "port": 8000 + i}])


@pytest.fixture
def retention(settings):
    settings.RETENTION = {
        "events_days": 30,
        "events_max": 1000,
        "audit_days": 30,
        "audit_max": 1000,
        "generations_days": 30,
        "generations_keep": 3,
    }
    return settings.RETENTION


def test_old_rows_are_pruned_but_each_listener_keeps_its_newest_generations(world, retention):
    _replace_n_times(world.listener_a, 6)
    _age_everything(days=40)
    _replace_n_times(world.listener_b, 1)  # recent: kept whatever the age rule says
    listener_a = type(world.listener_a).objects.get(pk=world.listener_a.pk)
    result = prune_history()
    assert all(n > 0 for n in result.values()), result
    kept_a = sorted(Generation.objects.filter(listener=listener_a).values_list("number", flat=True))
    assert kept_a == [listener_a.generation - 2, listener_a.generation - 1, listener_a.generation]
    assert Generation.objects.filter(
        listener=world.listener_b, number=world.listener_b.generation + 1
    ).exists()
    # Only the recent change's feed rows remain.
    assert set(Event.objects.values_list("kind", flat=True)) == {"listener.backends_replaced"}
    assert Event.objects.filter(data__listener=world.listener_b.pk).count() == 1
    assert AuditEntry.objects.count() == 1
    # The generation history API still answers for the pruned listener.
    history = world.client("a_member").get("/api/generations/", {"listener": listener_a.pk})
    assert history.status_code == 200
    assert sorted(g["number"] for g in history.json()["results"]) == kept_a


def test_counts_are_capped_newest_kept(world, retention):
    retention["events_max"] = 2
    retention["audit_max"] = 2
    _replace_n_times(world.listener_a, 4)
    newest_events = list(Event.objects.order_by("-id").values_list("id", flat=True)[:2])
    newest_audit = list(AuditEntry.objects.order_by("-id").values_list("id", flat=True)[:2])
    prune_history_task.apply().get()  # the periodic job's entry point
    assert sorted(Event.objects.values_list("id", flat=True), reverse=True) == newest_events
    assert sorted(AuditEntry.objects.values_list("id", flat=True), reverse=True) == newest_audit


def test_a_bad_retention_setting_is_refused_by_name(world, retention):
    retention["audit_days"] = -1
    with pytest.raises(
        ValueError, match="RETENTION\\['audit_days'\\] must be a non-negative integer, got -1"
    ):
        prune_history()
