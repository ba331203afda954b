"""API request guards that run before any view: NUL characters in the query string."""

from __future__ import annotations

from django.http import JsonResponse


class RejectNulInQueryMiddleware:
    """A NUL in a query parameter of /api/ is a 400 (PostgreSQL cannot compare text with it, and
    some parameters reach a query without a form's validation)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith("/api/"):
            for name, values in request.GET.lists():
                if "\x00" in name or any("\x00" in value for value in values):
                    return JsonResponse(
                        {"detail": f"NUL characters are not allowed (query parameter {name!r}).",
                         "code": "invalid"}, status=400)
        return self.get_response(request)


class SyncChainEnd:
    """Last in MIDDLEWARE, sync only, does nothing: it keeps the whole middleware chain sync.

    Under ASGI, Django runs a middleware that can be both sync and async in the mode of what it
    wraps. The innermost handler is async, so CSRF, authentication, messages and X-Frame-Options
    (all both) ran as async middleware, each calling its process_request/_view/_response through
    sync_to_async: about eight thread hand-overs per request, which cost the API a measurable
    share of its CPU under load (docs/bench-load.md). With a sync-only middleware innermost, the
    chain is one sync_to_async for the whole chain and one async_to_sync around the view.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)
