"""The per-process HTTP concurrency limit (datacenter/api/concurrency.py): at most N requests
inside Django at once, the others wait (none refused) in arrival order; websockets not counted."""

from __future__ import annotations

import asyncio

import pytest

from datacenter.api.concurrency import HttpConcurrencyLimit


class Gate:
    """An inner ASGI app that records who is inside and holds each call until released."""

    def __init__(self) -> None:
        self.inside: list[str] = []
        self.entered: list[str] = []
        self.most_inside = 0
        self.release: dict[str, asyncio.Event] = {}

    async def __call__(self, scope, receive, send) -> None:
        name = scope["path"]
        self.inside.append(name)
        self.entered.append(name)
        self.most_inside = max(self.most_inside, len(self.inside))
        await self.release.setdefault(name, asyncio.Event()).wait()
        self.inside.remove(name)


async def _until(condition) -> None:
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.001)


def test_requests_beyond_the_limit_wait_their_turn_and_all_are_served():
    async def scenario() -> None:
        gate = Gate()
        app = HttpConcurrencyLimit(gate, 2)
        names = [f"/r{i}" for i in range(5)]
        for name in names:
            gate.release[name] = asyncio.Event()
        calls = [asyncio.create_task(app({"type": "http", "path": n}, None, None)) for n in names]
        await _until(lambda: len(gate.inside) == 2)
        await asyncio.sleep(0)  # give the waiting ones every chance to slip in
        assert gate.inside == ["/r0", "/r1"]
        websocket = asyncio.create_task(app({"type": "websocket", "path": "/ws"}, None, None))
        await _until(lambda: "/ws" in gate.inside)  # not counted, not queued
        for name in ["/ws", *names]:
            gate.release[name].set()
        await asyncio.gather(websocket, *calls)
        assert gate.entered[-3:] == ["/r2", "/r3", "/r4"]  # arrival order
        assert gate.most_inside == 3  # two requests and the websocket

    asyncio.run(scenario())


def test_zero_is_no_limit_and_a_negative_one_names_the_setting():
    async def scenario() -> None:
        gate = Gate()
        app = HttpConcurrencyLimit(gate, 0)
        calls = [asyncio.create_task(app({"type": "http", "path": f"/r{i}"}, None, None)) for i in range(30)]
        await _until(lambda: len(gate.inside) == 30)
        for event in gate.release.values():
            event.set()
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    with pytest.raises(ValueError, match=r"DATACENTER_HTTP_CONCURRENCY must be 0 .* got -1"):
        HttpConcurrencyLimit(Gate(), -1)
