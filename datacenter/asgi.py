"""ASGI entry point: HTTP (Django), websockets (Channels routes), lifespan (embedded jobs)."""

from __future__ import annotations

import importlib
import logging
import os
from urllib.parse import urlparse

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

if os.environ.get("DATACENTER_ASGI_ONE_HOP", "1") == "0":  # Django's own handler, to compare
    from django.core.asgi import get_asgi_application

    django_asgi_app = get_asgi_application()
else:
    from datacenter.asgi_handler import get_one_hop_asgi_application

    # Sets Django up before anything imports models. One thread hand-over per request instead of
    # Django's five (datacenter/asgi_handler.py).
    django_asgi_app = get_one_hop_asgi_application()

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from django.conf import settings
from django.http.request import validate_host

from datacenter.api.concurrency import HttpConcurrencyLimit

logger = logging.getLogger(__name__)


def _websocket_urlpatterns() -> list:
    try:
        module = importlib.import_module("datacenter.routing")
    except ModuleNotFoundError as exc:
        if exc.name != "datacenter.routing":
            raise
        return []
    return list(getattr(module, "websocket_urlpatterns", []))


class BrowserOriginGuard:
    """Refuse cross-site websocket handshakes from browsers (they always send Origin).

    Agents and other non-browser clients send no Origin and authenticate with their own token;
    Channels' AllowedHostsOriginValidator would refuse them, so this checks Origin only when present.
    """

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        origin = dict(scope.get("headers", [])).get(b"origin")
        if origin is not None:
            host = urlparse(origin.decode("latin1")).hostname or ""
            if not validate_host(host, settings.ALLOWED_HOSTS):
                from channels.security.websocket import WebsocketDenier

                await WebsocketDenier()(scope, receive, send)
                return
        await self.inner(scope, receive, send)


class Lifespan:
    """ASGI lifespan: start in-process Celery worker + beat when running without Redis."""

    def __init__(self):
        self.jobs = None
        self.demo_agents = None

    async def __call__(self, scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._startup()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _startup(self) -> None:
        self._start_demo_agents()
        if not settings.EMBEDDED_WORKER_ENABLED:
            return
        from asgiref.sync import sync_to_async

        from datacenter.celery import app as celery_app
        from datacenter.embedded import EmbeddedJobs

        self.jobs = EmbeddedJobs(celery_app, concurrency=settings.EMBEDDED_WORKER_CONCURRENCY)
        await sync_to_async(self.jobs.start, thread_sensitive=False)()

    def _start_demo_agents(self) -> None:
        """`make run` sets DEMO_AGENTS=1 and DEMO_PORTAL_URL: two simulated muxes (lbagent.demo)
        connect back to this portal; they stop with it (and die with it: PR_SET_PDEATHSIG)."""
        if os.environ.get("DEMO_AGENTS") != "1":
            return
        from datacenter.loadbalancing.management.commands.seed_demo import demo_agent_dir
        from lbagent.demo import DemoAgents

        tokens = {path.stem: path for path in sorted(demo_agent_dir().glob("*.token"))}
        url = os.environ.get("DEMO_PORTAL_URL", "ws://127.0.0.1:8000/ws/agents/")
        if not tokens:
            logger.warning("DEMO_AGENTS=1 but %s holds no tokens: run manage.py seed_demo", demo_agent_dir())
            return
        self.demo_agents = DemoAgents(url, tokens, log_dir=settings.VAR_DIR / "log")
        self.demo_agents.start()
        logger.info("demo muxes %s connect to %s (simulated data plane)", ", ".join(tokens), url)

    async def _shutdown(self) -> None:
        if self.demo_agents is not None:
            from asgiref.sync import sync_to_async

            await sync_to_async(self.demo_agents.stop, thread_sensitive=False)()
        if self.jobs is not None:
            from asgiref.sync import sync_to_async

            await sync_to_async(self.jobs.stop, thread_sensitive=False)()


application = ProtocolTypeRouter(
    {
        "http": HttpConcurrencyLimit(django_asgi_app, settings.DATACENTER_HTTP_CONCURRENCY),
        "websocket": BrowserOriginGuard(AuthMiddlewareStack(URLRouter(_websocket_urlpatterns()))),
        "lifespan": Lifespan(),
    }
)
