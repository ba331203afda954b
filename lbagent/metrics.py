"""Prometheus text exposition of the agent's counters on a local HTTP endpoint (GET /metrics)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Metric:
    """One metric family: name, help, type and samples (labels -> value)."""

    name: str
    help: str
    kind: str = "gauge"  # or "counter"
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    """The text format (version 0.0.4) for these metric families."""
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
                lines.append(f"{m.name}{{{inner}}} {_format_value(value)}")
            else:
                lines.append(f"{m.name} {_format_value(value)}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition, keyed by (name, labels); for tests and tools."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: set[tuple[str, str]] = set()
        if rest:
            for part in rest.rstrip("}").split(","):
                if part:
                    k, _, v = part.partition("=")
                    labels.add((k, v.strip('"')))
        out[(name, frozenset(labels))] = float(value)
    return out


class MetricsServer:
    """Serves `collect()` as /metrics on (host, port) from a background thread, and each of
    `extra` (path -> function returning JSON text) for tests and debugging."""

    def __init__(self, host: str, port: int, collect: Callable[[], str],
                 extra: Mapping[str, Callable[[], str]] | None = None) -> None:
        pages = dict(extra or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, kind = collect().encode(), "text/plain; version=0.0.4; charset=utf-8"
                elif path in pages:
                    body, kind = pages[path]().encode(), "application/json"
                else:
                    self.send_error(404, f"served here: /metrics {' '.join(sorted(pages))}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
