"""Template helpers of the dashboard: times the browser shows in the user's zone (ISO on hover),
status badges, percentages, and small server-rendered SVG bar charts (no chart library)."""

from __future__ import annotations

import datetime
import json
from typing import Any

from django import template
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

register = template.Library()

BAD = {"error", "failed", "offline", "rejected", "cancelled", "disabled"}
WARN = {
    "pending_create",
    "pending_update",
    "pending_delete",
    "degraded",
    "draining",
    "queued",
    "pending-approval",
    "running",
    "behind",
}
GOOD = {"active", "online", "succeeded", "approved", "started", "connected", "no_monitor"}


@register.simple_tag
def when(value: datetime.datetime | float | None) -> SafeString:
    """<time> in UTC; dashboard.js rewrites its text to the browser's time zone, the title keeps ISO."""
    if value is None:
        return mark_safe('<span class="muted">never</span>')
    if isinstance(value, int | float):
        value = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    iso = value.astimezone(datetime.UTC).isoformat(timespec="seconds")
    return format_html(
        '<time datetime="{}" title="{}">{} UTC</time>', iso, iso, value.strftime("%Y-%m-%d %H:%M:%S")
    )


@register.simple_tag
def badge(value: Any, label: Any = None) -> SafeString:
    text = str(label if label is not None else value)
    key = str(value)
    tone = "bad" if key in BAD else "warn" if key in WARN else "good" if key in GOOD else "info"
    return format_html('<span class="badge {}">{}</span>', tone, text.replace("_", " "))


@register.filter
def percent(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.{digits}f} %"


@register.filter
def bytes_h(value: int | float | None) -> str:
    if value is None:
        return "–"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@register.filter
def get(mapping: Any, key: Any) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.simple_tag
def share_chart(rows: list[dict], value_key: str, title: str) -> SafeString:
    """A horizontal bar per backend: `value_key` of each row is a share (0..1). Inline SVG with a
    <title> and a text label per bar, so a screen reader reads the numbers, not a picture."""
    bar_h, gap, label_w, width = 18, 6, 150, 420
    height = max(1, len(rows)) * (bar_h + gap)
    bars = []
    for i, row in enumerate(rows):
        backend = row["backend"]
        share = float(row.get(value_key) or 0.0)
        y = i * (bar_h + gap)
        bars.append(
            (
                y + bar_h - 5,
                f"{backend.address}:{backend.port}",
                label_w,
                y,
                f"{max(0.0, (width - label_w - 60) * share):.1f}",
                bar_h,
                f"{label_w + (width - label_w - 60) * share + 4:.1f}",
                y + bar_h - 5,
                f"{share * 100:.1f} %",
            )
        )
    body = format_html_join(
        "",
        '<text x="0" y="{}" class="lbl">{}</text>'
        '<rect x="{}" y="{}" width="{}" height="{}" rx="2"></rect>'
        '<text x="{}" y="{}" class="val">{}</text>',
        bars,
    )
    return format_html(
        '<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}">'
        "<title>{}</title>{}</svg>",
        title,
        width,
        height,
        width,
        height,
        title,
        body,
    )


@register.filter
def kind(value: Any) -> str:
    """dict, list, none or scalar: how the facts partial lays a value out."""
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list | tuple):
        return "list"
    return "none" if value is None else "scalar"
