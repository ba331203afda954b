"""The dashboard's websocket: one per open page, `/ws/dashboard/?page=<page>&since=<event id>`.

It subscribes to the groups the portal already publishes (`lb.operators` for operators, or
`lb.tenant.<id>` for each of a tenant user's tenants; `lb.vip.<id>` on a VIP page; the P2V job's
group on a job page) and to `dash.feed`, where every committed Event row is announced (see
apps.py). Authorised per user exactly like the API: anonymous users are refused, operator pages
refuse non-operators, an object page refuses an object the user cannot see. On connect it replays
the events after `since` (the cursor the page was rendered with, or the last one the page saw),
so a page that lost its socket misses nothing; the page then re-renders its live regions.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from datacenter.events.models import Event
from datacenter.loadbalancing.agent_sync import OPERATORS_GROUP, tenant_group, vip_group
from datacenter.loadbalancing.models import Vip
from datacenter.tenancy.scoping import is_operator, restrict, tenant_ids_for, tenants_for

from .live import FEED_GROUP

REPLAY_MAX = 500
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
OPERATOR_PAGES = {"agents", "p2v", "job"}
PAGES = {"overview", "vips", "vip", "agents", "hosts", "tenants", "tenant", "pools", "p2v", "job", "audit"}


def event_message(event: Event) -> dict[str, Any]:
    return {
        "type": "event",
        "id": event.id,
        "kind": event.kind,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "time": event.time.isoformat(),
    }


def parse_page(raw: str) -> tuple[str, int | None] | None:
    """ "vip:12" -> ("vip", 12); "overview" -> ("overview", None); None when malformed."""
    name, _, ident = raw.partition(":")
    if name not in PAGES:
        return None
    if ident:
        return (name, int(ident)) if ident.isdigit() and len(ident) < 19 else None
    return None if name in ("vip", "tenant", "job") else (name, None)


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined = []
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        page = parse_page(query.get("page", [""])[0])
        since_raw = query.get("since", ["0"])[0]
        if page is None or not since_raw.isdigit() or len(since_raw) > 18:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.user = user
        self.operator = is_operator(user)
        name, ident = page
        if name in OPERATOR_PAGES and not self.operator:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        groups = await self._groups_for(name, ident)
        if groups is None:
            await self.close(code=CLOSE_NOT_FOUND)  # an object this user cannot see does not exist
            return
        self.tenant_ids = set(await database_sync_to_async(tenant_ids_for)(user))
        for group in [*groups, FEED_GROUP]:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.append(group)
        await self.accept()
        replayed, cursor = await self._replay(int(since_raw))
        for message in replayed:
            await self.send_json(message)
        await self.send_json({"type": "synced", "cursor": cursor, "replayed": len(replayed)})

    @database_sync_to_async
    def _groups_for(self, name: str, ident: int | None) -> list[str] | None:
        groups = [OPERATORS_GROUP] if self.operator else [tenant_group(t) for t in tenant_ids_for(self.user)]
        base = groups
        if name == "vip":
            if not restrict(Vip.objects.filter(pk=ident), self.user, "tenant").exists():
                return None
            return [*base, vip_group(ident)]
        if name == "tenant" and not tenants_for(self.user).filter(pk=ident).exists():
            return None
        if name == "job":
            from p2v.conversion.models import ConversionJob

            job = ConversionJob.objects.filter(pk=ident).first()
            return None if job is None else [*base, job.group_name]
        return base

    @database_sync_to_async
    def _replay(self, since: int) -> tuple[list[dict[str, Any]], int]:
        events = list(
            restrict(Event.objects.filter(id__gt=since), self.user, "tenant").order_by("id")[:REPLAY_MAX]
        )
        cursor = events[-1].id if events else since
        return [event_message(e) for e in events], cursor

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    # -- from the channel layer ----------------------------------------------------------------

    async def feed_event(self, message: dict[str, Any]) -> None:
        tenant = message.get("tenant")
        if self.operator or (tenant is not None and tenant in self.tenant_ids):
            await self.send_json(message["event"])

    async def lb_event(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "change", "kind": message.get("kind"), "data": message.get("data")})

    async def job_update(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "job.update", "data": message["data"]})

    async def job_log(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "job.log", "data": message["data"]})
