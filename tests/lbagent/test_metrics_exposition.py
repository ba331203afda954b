"""The agent's /metrics through prometheus_client: what a Prometheus server scraping a mux gets."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbagent.metrics import Metric, MetricsServer, parse, render


def _snapshot(calls: list[int]) -> list[Metric]:
    calls.append(1)
    return [
        Metric("lbagent_backend_packets_total", "Packets forwarded to a backend", "counter")
        .add(1_234_567, listener="7", backend="10.0.0.1")
        .add(3, listener="8", backend="2001:db8::2"),
        Metric("lbagent_flow_records", "Flow records held").add(len(calls)),
        Metric("lbagent_last_apply_seconds", "Duration of the last apply").add(0.25),
    ]


@pytest.fixture
def server():
    calls: list[int] = []
    srv = MetricsServer("127.0.0.1", 0, lambda: _snapshot(calls), extra={"/records": lambda: '[{"a": 1}]'})
    srv.start()
    try:
        yield srv, calls
    finally:
        srv.stop()


def _get(srv: MetricsServer, path: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        return response.headers["Content-Type"], response.read().decode()


def test_each_scrape_reads_a_fresh_snapshot_with_types_and_labels(server) -> None:
    srv, _ = server
    kind, first = _get(srv, "/metrics")
    _, second = _get(srv, "/metrics")
    assert kind.startswith("text/plain; version=0.0.4")
    assert "# TYPE lbagent_backend_packets_total counter" in first
    assert "# TYPE lbagent_flow_records gauge" in first
    assert parse(first)[("lbagent_flow_records", frozenset())] == 1
    assert parse(second)[("lbagent_flow_records", frozenset())] == 2  # not cached between scrapes
    labels = frozenset({("listener", "7"), ("backend", "10.0.0.1")})
    assert parse(second)[("lbagent_backend_packets_total", labels)] == 1_234_567


def test_openmetrics_is_negotiated_for_scrapers_that_ask(server) -> None:
    srv, _ = server
    kind, text = _get(srv, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "lbagent_backend_packets_total{" in text


def test_json_pages_and_a_clear_404(server) -> None:
    srv, _ = server
    kind, body = _get(srv, "/records")
    assert kind == "application/json"
    assert body == '[{"a": 1}]'
    with pytest.raises(urllib.error.HTTPError) as missing:
        _get(srv, "/nothing")
    assert missing.value.code == 404
    assert "/metrics /records" in missing.value.read().decode()


def test_render_is_valid_exposition_that_the_library_parses() -> None:
    text = render(_snapshot([]))
    names = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert names["lbagent_backend_packets"] == "counter"
    assert names["lbagent_last_apply_seconds"] == "gauge"
    assert parse(text)[("lbagent_last_apply_seconds", frozenset())] == 0.25


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("lbagent_applies", "counter", "must end in _total"),
        ("lbagent_x", "histogram", "not one of gauge, counter"),
    ],
)
def test_a_badly_named_or_typed_metric_is_refused_with_its_name(name: str, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        Metric(name, "help", kind)
    assert name in str(refused.value)
