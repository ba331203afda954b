"""Django's ASGI handler with one thread hand-over per request instead of five.

Django's ASGIHandler runs a sync project (every view and middleware here is sync) as: the
request_started signal through sync_to_async, the middleware chain through sync_to_async, the
innermost async handler back on the event loop through async_to_sync, the view through
sync_to_async again, and the response's close (request_finished) through sync_to_async. Each
hand-over is a cross-thread future, a context copy and event loop turns: profiled, several
percent of a small API call's CPU time (docs/bench-load.md).

This handler loads the middleware in sync mode (as WSGI does) and runs the signal, the whole
chain with the view, and, for a response that is not streamed, its close in ONE sync_to_async
call, on the request's own thread as Django does (ThreadSensitiveContext: one thread per
request, so the database connection a request uses is the one its close returns). The body is
then sent from the event loop. A streamed response (static files) is sent and closed the way
Django does. What is not kept: Django's listening for a client disconnect while a view runs,
which can only cancel async views (there are none; a sync view runs to its end either way).
"""

from __future__ import annotations

import django
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import FileResponse, HttpResponse
from django.urls import set_script_prefix


class OneHopASGIHandler(ASGIHandler):
    """ASGIHandler for a project of sync views: one thread hand-over per request."""

    def __init__(self) -> None:
        base.BaseHandler.__init__(self)
        self.load_middleware(is_async=False)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with ThreadSensitiveContext():
            await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        try:
            response = await sync_to_async(self._respond, thread_sensitive=True)(scope, body_file)
            await self.send_response(response, send)
            if response.streaming:
                await sync_to_async(response.close, thread_sensitive=True)()
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
    """django.core.asgi.get_asgi_application, with this handler."""
    django.setup(set_prefix=False)
    return OneHopASGIHandler()
