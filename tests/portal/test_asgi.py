"""The ASGI entry point: lifespan protocol and the websocket Origin guard."""

from __future__ import annotations

import pytest
from channels.generic.websocket import WebsocketConsumer
from channels.testing import WebsocketCommunicator

from datacenter.asgi import BrowserOriginGuard, Lifespan


class Echo(WebsocketConsumer):
    def connect(self):
        self.accept()


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ([], True),  # agents and CLIs send no Origin: their token decides
        ([(b"origin", b"http://127.0.0.1:8000")], True),
        ([(b"origin", b"https://evil.example")], False),
    ],
)
async def test_browser_origin_guard(headers, accepted):
    communicator = WebsocketCommunicator(BrowserOriginGuard(Echo.as_asgi()), "/ws/x/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected is accepted
    await communicator.disconnect()


async def test_lifespan_completes_startup_and_shutdown(settings):
    settings.EMBEDDED_WORKER_ENABLED = False  # a worker here would consume other tests' Redis queue
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message["type"])

    await Lifespan()({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
