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
