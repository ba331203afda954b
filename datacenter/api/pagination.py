"""Pagination for every list: ?limit=&offset= (default 50, at most 1000 per page); the count
query only when the page does not tell it (paginate_queryset).

DRF's LimitOffsetPagination silently falls back to its defaults when `limit` or `offset` is not a
number (`?offset=null` returned the first page), although the schema says "integer". Here a value
that is not what the schema says is a 400 naming the parameter; a `limit` above the maximum is
capped (the schema says so), as before.
"""

import re

from rest_framework import pagination
from rest_framework.exceptions import ValidationError

BIGINT_MAX = 2**63 - 1  # what PostgreSQL's LIMIT and OFFSET take


def _integer_param(request, name: str, minimum: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not re.fullmatch(r"-?[0-9]{1,20}", raw):  # ASCII digits only: int() also takes "1_0", " 7"
        raise ValidationError({name: [f"{raw!r} is not an integer."]})
    value = int(raw)
    if not minimum <= value <= BIGINT_MAX:
        raise ValidationError({name: [f"must be between {minimum} and {BIGINT_MAX}, got {value}."]})
    return value


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    default_limit = 50
    max_limit = 1000

    def paginate_queryset(self, queryset, request, view=None):
        """DRF's, but the count query only runs when the page cannot tell the count: one row more
        than the limit is fetched, and a page that is not full (or the empty first page) ends the
        list, so the count is offset + rows. Tenants' lists are mostly shorter than a page, so
        most list calls make one query fewer (issue 15). Same body as DRF's in every case."""
        self.request = request
        self.limit = self.get_limit(request)
        if self.limit is None:
            return None
        self.offset = self.get_offset(request)
        rows = list(queryset[self.offset : self.offset + self.limit + 1])
        if len(rows) <= self.limit and (rows or self.offset == 0):
            self.count = self.offset + len(rows)
        else:
            self.count = self.get_count(queryset)
        if self.count > self.limit and self.template is not None:
            self.display_page_controls = True
        if self.count == 0 or self.offset > self.count:
            return []
        return rows[: self.limit]

    def get_limit(self, request):
        value = _integer_param(request, self.limit_query_param, 1)
        return self.default_limit if value is None else min(value, self.max_limit)

    def get_offset(self, request):
        value = _integer_param(request, self.offset_query_param, 0)
        return 0 if value is None else value

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.limit_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}
                parameter["description"] = (
                    f"Results per page (default {self.default_limit}; above {self.max_limit} is capped)."
                )
            elif parameter["name"] == self.offset_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX}
        return parameters
