"""Filters shared by every app's filtersets."""

import django_filters
from django import forms


class IPAddressFilter(django_filters.CharFilter):
    """Exact IP match; a malformed address is a 400 naming the filter (PostgreSQL's inet would 500)."""

    field_class = forms.GenericIPAddressField
