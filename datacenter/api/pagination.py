"""Pagination for every list: ?limit=&offset= (default 50, at most 1000 per page)."""

from rest_framework import pagination


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    default_limit = 50
    max_limit = 1000
