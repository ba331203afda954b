"""Live job progress over a websocket: operators subscribe to one job's Channels group.

Who: the browser's session user, or (scripts, CLI) the REST API's `Authorization: Token <key>`
header checked by the API's own ApiTokenAuthentication, with the API's scoping: only operators
(staff) may watch jobs, exactly like /api/p2v/jobs/. A token that is wrong, expired or belongs to an
inactive user closes with 4401; a valid token of a non-operator with 4403; an unknown job 4404.
The key is never logged.
"""

from __future__ import annotations

import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from rest_framework import exceptions

from datacenter.tenancy.authentication import ApiTokenAuthentication
from datacenter.tenancy.scoping import is_operator

from .models import ConversionJob

logger = logging.getLogger(__name__)
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


def _token_key(scope: dict) -> str | None:
    """The key of an `Authorization: Token <key>` header, None without one; ValueError if malformed."""
    for name, value in scope.get("headers", []):
        if name.lower() != b"authorization":
            continue
        parts = value.split()
        if not parts or parts[0].lower() != ApiTokenAuthentication.keyword.lower().encode():
            return None  # another scheme (e.g. an agent's Bearer): not ours to judge
        if len(parts) != 2:
            raise ValueError("expected 'Token <key>'")
        try:
            return parts[1].decode("ascii")
        except UnicodeError:
            raise ValueError("key is not ASCII") from None
    return None


@database_sync_to_async
def _user_for_token(key: str):
    """The token's user, or None when the API would refuse the token (unknown, expired, inactive)."""
    try:
        user, _token = ApiTokenAuthentication().authenticate_key(key)
    except exceptions.AuthenticationFailed as exc:
        logger.info("job websocket refused a token: %s", exc.detail)  # the reason, never the key
        return None
    return user


class ConversionJobConsumer(AsyncJsonWebsocketConsumer):
    """Sends the job's current snapshot on connect, then every update and log line as they happen."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        try:
            key = _token_key(self.scope)
        except ValueError as exc:
            logger.info("job websocket refused a malformed Authorization header: %s", exc)
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if key is not None:
            user = await _user_for_token(key)
            if user is None:
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return
            self.scope["user"] = user
        if not is_operator(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.job_id = int(self.scope["url_route"]["kwargs"]["job_id"])
        snapshot = await self._snapshot()
        if snapshot is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = f"p2v-job-{self.job_id}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "job.update", "data": snapshot})

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    @database_sync_to_async
    def _snapshot(self) -> dict | None:
        from .services import job_snapshot

        job = ConversionJob.objects.filter(pk=self.job_id).first()
        return job_snapshot(job) if job else None

    async def job_update(self, message: dict) -> None:
        await self.send_json({"type": "job.update", "data": message["data"]})

    async def job_log(self, message: dict) -> None:
        await self.send_json({"type": "job.log", "data": message["data"]})
