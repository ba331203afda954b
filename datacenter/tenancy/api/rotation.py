"""Credential rotation with a grace window: `?grace_s=` (default DATACENTER_TOKEN_GRACE_S) says how
long the replaced credential keeps working, so its holder can switch without being cut off."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import ValidationError

MAX_GRACE_S = 30 * 86400

GRACE_PARAM = OpenApiParameter(
    "grace_s", {"type": "integer", "minimum": 0, "maximum": MAX_GRACE_S},
    description="Seconds the replaced credential keeps working (default DATACENTER_TOKEN_GRACE_S, 0: revoked "
                "at once).",
)


def grace_seconds(request) -> int:
    raw = request.query_params.get("grace_s")
    if raw is None:
        return int(settings.DATACENTER_TOKEN_GRACE_S)
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_GRACE_S:
        raise ValidationError({"grace_s": [f"{raw!r}: expected whole seconds from 0 to {MAX_GRACE_S}."]})
    return int(raw)
