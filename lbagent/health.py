"""Backend health checks run by an agent: TCP connect or HTTP GET, with interval, timeout and
rise/fall hysteresis. Only transitions are reported (to the portal, which takes an unhealthy
backend out of every mux's table through the normal generation change)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from lbagent.protocol import BackendHealth
from lbagent.state import DesiredState, HealthCheck

logger = logging.getLogger("lbagent.health")

MAX_RESPONSE_LINE_BYTES = 1024

CheckKey = tuple[int, str, int]  # listener id, backend address, backend port


def _os_reason(exc: OSError) -> str:
    # asyncio's connect errors carry the errno but a generic message ("Connect call failed").
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def probe_tcp(address: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection opens within the timeout, else the reason it did not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except TimeoutError:
        return f"tcp connect timed out after {timeout_s:g}s"
    except OSError as exc:
        return f"tcp connect failed: {_os_reason(exc)}"
    writer.close()
    with contextlib.suppress(OSError):  # the check already succeeded; a reset on close is irrelevant
        await writer.wait_closed()
    return None


async def probe_http(address: str, port: int, path: str, timeout_s: float) -> str | None:
    """None when `GET path` answers 2xx or 3xx within the timeout, else the reason."""

    async def exchange() -> str | None:
        reader, writer = await asyncio.open_connection(address, port)
        try:
            host = f"[{address}]" if ":" in address else address
            writer.write(
                f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbagent-health\r\n\r\n".encode()
            )
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parts = line[:MAX_RESPONSE_LINE_BYTES].decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return f"http: not an HTTP status line: {line[:60]!r}"
        status = int(parts[1])
        return None if 200 <= status < 400 else f"http status {status}"

    try:
        return await asyncio.wait_for(exchange(), timeout_s)
    except TimeoutError:
        return f"http check timed out after {timeout_s:g}s"
    except OSError as exc:
        return f"http connect failed: {_os_reason(exc)}"


@dataclass
class CheckState:
    """Rise/fall hysteresis for one backend. Starts healthy: a new backend is not pulled before
    it had `fall` chances to fail."""

    check: HealthCheck
    healthy: bool = True
    successes: int = 0
    failures: int = 0
    reason: str | None = None

    def record(self, failure_reason: str | None) -> bool:
        """Feed one probe result; True when the healthy/unhealthy verdict changed."""
        if failure_reason is None:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.check.rise:
                self.healthy, self.reason = True, None
                return True
        else:
            self.failures += 1
            self.successes = 0
            self.reason = failure_reason
            if self.healthy and self.failures >= self.check.fall:
                self.healthy = False
                return True
        return False


Reporter = Callable[[list[BackendHealth]], None]


class HealthMonitor:
    """Runs one asyncio task per checked backend of the applied state; `update(state)` after
    every apply starts new checks, stops removed ones and keeps the verdicts of unchanged ones."""

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self._states: dict[CheckKey, CheckState] = {}
        self._tasks: dict[CheckKey, asyncio.Task] = {}

    def update(self, state: DesiredState) -> None:
        wanted: dict[CheckKey, HealthCheck] = {}
        for _, listener in state.listeners():
            if listener.health_check is None:
                continue
            for backend in listener.backends:
                wanted[(listener.id, backend.address, backend.port)] = listener.health_check
            # Backends the portal pulled for being unhealthy are still checked, so they can come back.
            if listener.previous is not None:
                for backend in listener.previous.backends:
                    wanted.setdefault((listener.id, backend.address, backend.port), listener.health_check)
        for key in list(self._tasks):
            if key not in wanted or self._states[key].check != wanted[key]:
                self._tasks.pop(key).cancel()
                self._states.pop(key)
        for key, check in wanted.items():
            if key not in self._tasks:
                self._states[key] = CheckState(check)
                self._tasks[key] = asyncio.create_task(self._run(key), name=f"health {key}")

    def snapshot(self) -> list[BackendHealth]:
        return [BackendHealth(key[0], key[1], key[2], s.healthy, s.reason) for key, s in self._states.items()]

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._states.clear()

    async def _run(self, key: CheckKey) -> None:
        listener_id, address, port = key
        state = self._states[key]
        check = state.check
        while True:
            started = time.monotonic()
            if check.kind == "http":
                reason = await probe_http(address, port, check.path, check.timeout_s)
            else:
                reason = await probe_tcp(address, port, check.timeout_s)
            if state.record(reason):
                logger.info(
                    "backend %s:%s of listener %s is now %s%s",
                    address,
                    port,
                    listener_id,
                    "healthy" if state.healthy else "unhealthy",
                    f" ({reason})" if reason else "",
                )
                self._report([BackendHealth(listener_id, address, port, state.healthy, state.reason)])
            await asyncio.sleep(max(0.0, check.interval_s - (time.monotonic() - started)))
