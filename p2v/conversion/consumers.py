"""Live job progress over a websocket: operators subscribe to one job's Channels group."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from datacenter.tenancy.scoping import is_operator

from .models import ConversionJob


class ConversionJobConsumer(AsyncJsonWebsocketConsumer):
    """Sends the job's current snapshot on connect, then every update and log line as they happen."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if not is_operator(user):
            await self.close(code=4403)
            return
        self.job_id = int(self.scope["url_route"]["kwargs"]["job_id"])
        snapshot = await self._snapshot()
        if snapshot is None:
            await self.close(code=4404)
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
