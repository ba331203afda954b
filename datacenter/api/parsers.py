"""The API's only request format: JSON.

Form and multipart bodies cannot say `null` or nest objects, so a client following the schema
could not express half of it; the API speaks JSON only (415 otherwise). (A NUL character in a
string reaches PostgreSQL only through a field without DRF's own NUL check: the exception
handler answers that 400 too.)
"""

from __future__ import annotations

from rest_framework.parsers import JSONParser


class StrictJSONParser(JSONParser):
    """DRF's JSON parser; named so settings say what the API accepts."""
