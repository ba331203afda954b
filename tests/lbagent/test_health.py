"""Backend health checks against real sockets on loopback: TCP connect, HTTP GET, rise/fall."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from lbagent.health import CheckState, HealthMonitor, probe_http, probe_tcp
from lbagent.protocol import BackendHealth
from lbagent.state import HealthCheck, parse_state
from tests.lbagent.test_state import example_document


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def http_server(status: int):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.0 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_tcp_probe_tells_open_from_closed_port() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await probe_tcp("127.0.0.1", port, 1.0) is None
    reason = await probe_tcp("127.0.0.1", free_port(), 1.0)
    assert reason is not None
    assert "refused" in reason.lower()


async def test_http_probe_accepts_2xx_and_reports_5xx() -> None:
    for status, healthy in ((200, True), (302, True), (503, False)):
        server = await http_server(status)
        async with server:
            reason = await probe_http("127.0.0.1", server.sockets[0].getsockname()[1], "/healthz", 1.0)
        assert (reason is None) is healthy, reason
        if not healthy:
            assert reason == "http status 503"


async def test_http_probe_times_out_on_a_silent_server() -> None:
    async def silent(reader, writer):
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        reason = await probe_http("127.0.0.1", server.sockets[0].getsockname()[1], "/", 0.2)
    assert reason == "http check timed out after 0.2s"


def test_rise_and_fall_hysteresis() -> None:
    state = CheckState(HealthCheck(kind="tcp", rise=2, fall=3))
    assert [state.record("down") for _ in range(3)] == [False, False, True]
    assert state.healthy is False
    assert state.reason == "down"
    assert [state.record(None), state.record("down"), state.record(None), state.record(None)] == [
        False, False, False, True]
    assert state.healthy is True


async def test_monitor_reports_a_backend_whose_service_stops_and_returns() -> None:
    probes = []  # one entry per connection the monitor's probes opened

    def answer(_reader, writer):
        probes.append(1)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    doc = example_document()
    listener = doc["vips"][0]["listeners"][0]
    doc["vips"][0]["address"] = "127.0.0.10"
    listener["previous"] = None
    listener["backends"] = [{"address": "127.0.0.1", "port": port}]
    listener["health_check"] = {"kind": "tcp", "interval_s": 0.5, "timeout_s": 0.5, "rise": 2, "fall": 2}
    reports: list[BackendHealth] = []
    monitor = HealthMonitor(reports.extend)
    monitor.update(parse_state(doc))
    try:
        # Waits for probes that happened, not for time: after three successful probes a backend that
        # started healthy has had every chance to be (wrongly) reported. Bounds are generous.
        async with asyncio.timeout(60):
            while len(probes) < 3:
                await asyncio.sleep(0.02)
        assert reports == []  # healthy from the start: no transition to report
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(60):
            while not reports:
                await asyncio.sleep(0.02)
        assert reports[0].healthy is False
        assert (reports[0].listener, reports[0].port) == (12, port)
        server = await asyncio.start_server(answer, "127.0.0.1", port)
        async with asyncio.timeout(60):
            while len(reports) < 2:
                await asyncio.sleep(0.02)
        assert reports[1].healthy is True
        listener["health_check"] = None
        monitor.update(parse_state(doc))
        assert monitor.snapshot() == []  # checks stop with the health_check
    finally:
        monitor.stop()
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
