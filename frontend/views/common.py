"""What every dashboard page shares: login, the operator-only gate, tenant scoping, pagination,
sorting, and the event cursor a page's websocket catches up from."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Page, Paginator
from django.db.models import Max, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from datacenter.events.models import Event
from datacenter.tenancy.scoping import is_operator, restrict

PAGE_SIZE = 50


def dashboard_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A page for any signed-in user; what it shows is scoped by the view's querysets."""
    return login_required(view)


def operator_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A page for operators only: 403 for everyone else, as the API's IsOperator endpoints answer."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_operator(request.user):
            raise PermissionDenied("Only operators may open this page.")
        return view(request, *args, **kwargs)

    return login_required(guarded)


def event_cursor(user) -> int:
    """The newest event id this user may see: the page's websocket replays what came after it."""
    return restrict(Event.objects.all(), user, "tenant").aggregate(m=Max("id"))["m"] or 0


def paginate(request: HttpRequest, queryset: QuerySet, per_page: int = PAGE_SIZE) -> Page:
    return Paginator(queryset, per_page).get_page(request.GET.get("page"))


def sorted_by(
    request: HttpRequest, queryset: QuerySet, allowed: dict[str, str], default: str
) -> tuple[QuerySet, str]:
    """Order by ?sort=<key> or ?sort=-<key> where key is one of `allowed` (else `default`)."""
    raw = request.GET.get("sort", default)
    key = raw.lstrip("-")
    if key not in allowed:
        raw, key = default, default.lstrip("-")
    field = allowed[key]
    return queryset.order_by(f"-{field}" if raw.startswith("-") else field, "pk"), raw


def page(
    request: HttpRequest, template: str, context: dict[str, Any], *, live: str, status: int = 200
) -> HttpResponse:
    """Render a dashboard page; `live` names what its websocket subscribes to (see consumers.py)."""
    context = {
        **context,
        "live_page": live,
        "event_cursor": event_cursor(request.user),
        "operator": is_operator(request.user),
    }
    return render(request, template, context, status=status)
