"""OneHopASGIHandler (datacenter/asgi_handler.py) answers exactly what Django's own ASGIHandler
answers, and every request hands its database connection back to the pool."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler
from django.db import connection

from datacenter.asgi_handler import OneHopASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)

VOLATILE = {b"x-request-id"}  # a fresh id per request


async def _call(app, method: str, path: str, *, key: str = "", body: bytes = b"", query: bytes = b"") -> dict:
    headers = [(b"host", b"testserver"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    if key:
        headers.append((b"authorization", f"Token {key}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("testserver", 80)}  # fmt: skip
    exchange = ApplicationCommunicator(app, scope)
    await exchange.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await exchange.receive_output(30)
    chunks = [await exchange.receive_output(30)]
    while chunks[-1].get("more_body"):
        chunks.append(await exchange.receive_output(30))
    await exchange.wait(30)
    return {
        "status": start["status"],
        "headers": sorted((k.lower(), v) for k, v in start["headers"] if k.lower() not in VOLATILE),
        "body": b"".join(c.get("body", b"") for c in chunks),
    }


def _requests(world) -> list[tuple[str, str, dict]]:
    member = world.keys["a_member"]
    replace = b'{"backends": [{"address": "10.1.0.7", "port": 80}]}'
    return [
        ("GET", "/api/vips/", {"key": member}),
        ("GET", f"/api/listeners/{world.listener_a.pk}/backends/", {"key": member}),
        ("GET", "/api/vips/", {"key": member, "query": b"limit=x"}),  # 400
        ("GET", f"/api/listeners/{world.listener_b.pk}/", {"key": member}),  # another tenant's: 404
        ("GET", "/api/vips/", {}),  # no credentials: 401/403
        ("GET", "/no-such-page/", {}),
        ("PUT", f"/api/listeners/{world.listener_a.pk}/backends/", {"key": member, "body": replace}),
        ("PUT", f"/api/listeners/{world.listener_a.pk}/backends/", {"key": member, "body": b"{not json"}),
    ]


def test_answers_are_the_same_as_djangos_own_handler(world):
    ours, django_handler = OneHopASGIHandler(threads=4), ASGIHandler()

    async def both() -> list[tuple[dict, dict]]:
        pairs = []
        for method, path, options in _requests(world):
            mine = await _call(ours, method, path, **options)
            if method == "PUT" and mine["status"] == 200:
                # the same change again would be a no-op: compare the answers to the same state
                theirs = await _call(django_handler, method, path, **options)
                assert theirs["status"] == 200
                continue
            theirs = await _call(django_handler, method, path, **options)
            pairs.append((mine, theirs))
        return pairs

    pairs = asyncio.run(both())
    statuses = [mine["status"] for mine, _ in pairs]
    assert statuses == [200, 200, 400, 404, 401, 404, 400]
    for mine, theirs in pairs:
        assert mine == theirs


def test_a_static_file_streams_through_it(world):
    ours, django_handler = OneHopASGIHandler(threads=2), ASGIHandler()
    path = "/static/rest_framework/css/bootstrap.min.css"

    async def both():
        return await _call(ours, "GET", path), await _call(django_handler, "GET", path)

    mine, theirs = asyncio.run(both())
    assert mine["status"] == 200
    assert len(mine["body"]) > 10_000
    assert mine == theirs


def test_every_request_hands_its_database_connection_back(world):
    """Eight threads serving 40 requests, 20 at a time: afterwards no more connections are checked
    out of the pool than before (a request that kept its connection would hold one per thread)."""
    if connection.vendor != "postgresql":
        pytest.fail("needs PostgreSQL and its connection pool (set DATABASE_URL)")
    ours = OneHopASGIHandler(threads=8)
    requests = _requests(world)[:2] * 20
    before = connection.pool.get_stats()

    async def run() -> list[int]:
        batches = []
        for start in range(0, len(requests), 20):
            batch = requests[start : start + 20]
            answers = await asyncio.gather(*(_call(ours, m, p, **o) for m, p, o in batch))
            batches += [a["status"] for a in answers]
        return batches

    assert asyncio.run(run()) == [200] * 40
    after = connection.pool.get_stats()
    # this test's own thread may hold one (the fixture's writes): the same number as before
    checked_out = [s.get("pool_size", 0) - s.get("pool_available", 0) for s in (before, after)]
    assert checked_out[1] == checked_out[0], (before, after)
