"""Filters shared by every app's filtersets."""

import django_filters
from django import forms
from drf_spectacular.utils import extend_schema_field


class IPAddressFilter(django_filters.CharFilter):
    """Exact IP match; a malformed address is a 400 naming the filter (PostgreSQL's inet would 500)."""

    field_class = forms.GenericIPAddressField


# The schema says "an IPv4 or IPv6 address" (datacenter/api/schema.py publishes it for these).
IPAddressFilter = extend_schema_field({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]})(
    IPAddressFilter)
