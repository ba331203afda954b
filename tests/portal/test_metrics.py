"""/metrics: Prometheus text for operators or the scrape token, with figures that match the data."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datacenter.loadbalancing.models import Listener
from datacenter.testing import new_agent


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _get(client, **headers):
    return client.get("/metrics", headers=headers)


@pytest.mark.parametrize("role", ["a_member", "a_admin", "b_member"])
def test_tenants_and_strangers_get_nothing(world, client, role):
    assert _get(client).status_code == 403
    assert _get(client, Authorization=f"Token {world.keys[role]}").status_code == 403
    assert _get(client, Authorization="Bearer wrong").status_code == 403


def test_an_operator_or_the_scrape_token_reads_figures_that_match_the_data(world, client, settings):
    settings.DATACENTER_METRICS_TOKEN = "scrape-secret-1"
    new_agent("metrics-mux-1", world.host_shared, "10.0.0.21")
    world.client("a_member").get("/api/vips/")  # one observed request of a known view
    answer = _get(client, Authorization=f"Token {world.keys['operator']}")
    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain; version=")  # the Prometheus text format
    assert _get(client, Authorization="Bearer scrape-secret-1").status_code == 200
    samples = _samples(answer.content.decode())
    for status in ("active", "pending_create", "pending_update", "error"):
        expected = Listener.objects.filter(provisioning_status=status).count()
        assert samples[("datacenter_listeners", (("provisioning_status", status),))] == expected
    assert samples[("datacenter_agents", (("role", "mux"), ("state", "disconnected")))] == 1
    assert samples[("datacenter_agents", (("role", "mux"), ("state", "connected")))] == 0
    assert samples[("datacenter_p2v_jobs", (("state", "running"),))] == 0
    vip_list = [key for key in samples if key[0] == "datacenter_http_request_duration_seconds_count"
                and dict(key[1]).get("view", "").endswith("vip-list")]
    assert vip_list, sorted({dict(k[1]).get("view") for k in samples if "duration" in k[0]})
    assert ("datacenter_celery_queue_length", (("queue", "celery"),)) in samples
