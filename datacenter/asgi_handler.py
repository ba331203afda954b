"""Django's ASGI handler with one thread hand-over per request instead of five.

Django's ASGIHandler runs a sync project (every view and middleware here is sync) as: the
request_started signal through sync_to_async, the middleware chain through sync_to_async, the
innermost async handler back on the event loop through async_to_sync, the view through
sync_to_async again, and the response's close (request_finished) through sync_to_async. Each
hand-over is a cross-thread future, a context copy and event loop turns: profiled, several
percent of a small API call's CPU time (docs/bench-load.md).

This handler loads the middleware in sync mode (as WSGI does) and runs the signal, the whole
chain with the view, and, for a response that is not streamed, its close in ONE sync_to_async
call; the body is then sent from the event loop. Each request's sync part runs, start to close,
on one thread of a pool kept for the process: Django starts a new thread for every request
(ThreadSensitiveContext) and joins it at the end, which under load showed up as a tenth of a web
worker's samples (py-spy). One request at a time per thread, as before, so the database
connection a request uses is the one its close (request_finished) hands back to the pool.

A streamed response (static files, which touch no database) is sent and then closed the way
Django does, on any pool thread. What is not kept: Django's listening for a client disconnect
while a view runs, which can only cancel async views (there are none; a sync view runs to its
end either way).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import django
from asgiref.sync import sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import FileResponse, HttpResponse
from django.urls import set_script_prefix


class OneHopASGIHandler(ASGIHandler):
    """ASGIHandler for a project of sync views: one thread hand-over per request."""

    def __init__(self, threads: int) -> None:
        base.BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        # More requests than threads wait for one, in order (the executor's queue is FIFO).
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="django-http")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def _on_thread(self, function):
        return sync_to_async(function, thread_sensitive=False, executor=self._threads)

    async def handle(self, scope, receive, send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        try:
            response = await self._on_thread(self._respond)(scope, body_file)
            await self.send_response(response, send)
            if response.streaming:
                await self._on_thread(response.close)()
        finally:
            body_file.close()

    def _respond(self, scope, body_file) -> HttpResponse:
        """On the request's thread: request_started, the request, and (unless the response streams)
        its close, which sends request_finished and so hands the database connection back."""
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
        if not response.streaming:
            response.close()
        return response


def get_one_hop_asgi_application() -> OneHopASGIHandler:
    """django.core.asgi.get_asgi_application, with this handler: as many threads as requests may
    run Django at once (DATACENTER_HTTP_CONCURRENCY; 32 when that limit is off)."""
    django.setup(set_prefix=False)
    from django.conf import settings

    return OneHopASGIHandler(settings.DATACENTER_HTTP_CONCURRENCY or 32)
