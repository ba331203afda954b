"""Announce every committed Event row on the channel layer (group `dash.feed`), so open dashboard
pages learn of a change made anywhere (a REST call, a Celery worker, another portal process)
without polling. The page's consumer filters by tenant; the Event id is the catch-up cursor."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from datacenter.events.models import Event

logger = logging.getLogger("frontend.live")

FEED_GROUP = "dash.feed"


def announce_event(sender, instance: Event, created: bool, **kwargs) -> None:
    if not created:
        return
    from .consumers import event_message

    message = {"type": "feed.event", "tenant": instance.tenant_id, "event": event_message(instance)}
    transaction.on_commit(lambda: _send(message))


def _send(message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(FEED_GROUP, message)
    except Exception:  # the change is committed; pages catch up from the cursor on reconnect
        logger.exception("could not announce event %s", message["event"]["id"])
