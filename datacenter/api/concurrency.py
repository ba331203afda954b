"""At most N HTTP requests of one web process run Django at once; the others wait in the event loop.

Under ASGI each HTTP request runs Django's sync code on a thread of its own, each holding one of
the 20 pooled database connections of its process: past 20 concurrent requests a request waited
up to 10 s for a connection and then failed, and the agent connections' acknowledgements queued
behind them (docs/bench-load.md). With the limit, requests beyond it wait in the event loop, in
arrival order (asyncio.Semaphore is FIFO), and none is refused: this is not a rate limit. A lower
limit also means fewer threads contending for the GIL; on a machine shared with other heavy work
it measured no better (the waits on a starved PostgreSQL then dominate), so the default is not
lower than the pool needs.

Websockets (agents, the dashboard) and lifespan events are not counted: they are long-lived.
DATACENTER_HTTP_CONCURRENCY (settings) sets N; 0 disables the limit.
"""

from __future__ import annotations

import asyncio


class HttpConcurrencyLimit:
    """ASGI wrapper: at most `limit` HTTP requests inside `inner` at once (0: no limit)."""

    def __init__(self, inner, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"DATACENTER_HTTP_CONCURRENCY must be 0 (no limit) or positive, got {limit}")
        self.inner = inner
        self.limit = limit
        self._slots = asyncio.Semaphore(limit) if limit else None

    async def __call__(self, scope, receive, send) -> None:
        if self._slots is None or scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        async with self._slots:
            await self.inner(scope, receive, send)
