"""The agent's Prometheus metrics through prometheus_client, the library the portal's /metrics uses.

The daemon describes its figures as `Metric` snapshots built at scrape time (its counters live in
the kernel, the slow path and BGP, not in prometheus_client objects); `SnapshotCollector` turns
them into the library's metric families, and `MetricsServer` serves a registry holding that
collector with the library's WSGI exposition (content negotiation, OpenMetrics, gzip), next to a
few JSON pages for tests and debugging.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client import metrics_core as families
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

KINDS = ("gauge", "counter")


@dataclass
class Metric:
    """One metric family as the daemon sees it at a scrape: name, help, type, samples."""

    name: str
    help: str
    kind: str = "gauge"  # or "counter"
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total (Prometheus naming)")

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self

    def family(self) -> families.Metric:
        """This snapshot as a prometheus_client family. A counter's family is named without
        `_total` and its samples with it, as the library's own counters are."""
        name = self.name.removesuffix("_total") if self.kind == "counter" else self.name
        out = families.Metric(name, self.help, self.kind)
        for labels, value in self.samples:
            out.add_sample(self.name, {k: str(v) for k, v in labels.items()}, float(value))
        return out


class SnapshotCollector(Collector):
    """A prometheus_client collector over a function returning the daemon's current snapshots."""

    def __init__(self, snapshot: Callable[[], Iterable[Metric]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[families.Metric]:
        for metric in self._snapshot():
            yield metric.family()


def registry_of(snapshot: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry


def render(metrics: Iterable[Metric]) -> str:
    """The Prometheus text format (0.0.4) for these snapshots, by the library's exposition."""
    snapshot = list(metrics)
    return generate_latest(registry_of(lambda: snapshot)).decode()


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition keyed by (sample name, labels), by the library's parser."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not news
        pass


class MetricsServer:
    """Serves the snapshots as /metrics on (host, port) from a background thread, and each of
    `extra` (path -> function returning JSON text) for tests and debugging."""

    def __init__(
        self,
        host: str,
        port: int,
        snapshot: Callable[[], Iterable[Metric]],
        extra: Mapping[str, Callable[[], str]] | None = None,
    ) -> None:
        pages = dict(extra or {})
        exposition = make_wsgi_app(registry_of(snapshot))

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return exposition(environ, start_response)
            if path in pages:
                body = pages[path]().encode()
                start_response(
                    "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
                )
                return [body]
            body = f"not found; served here: /metrics {' '.join(sorted(pages))}\n".encode()
            start_response(
                "404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsWSGIServer", (ThreadingWSGIServer,), {"address_family": family})
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
