"""Watches the database: flips the health service between SERVING and NOT_SERVING, and refreshes the gauges.

One cheap query every few seconds decides health; the pending counts are refreshed far less often, so a
Prometheus scrape never costs a count over a big table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server import metrics
from server.auth import Role
from server.domain import Provider
from server.store import Store

log = logging.getLogger("deadletter.monitor")

SUBJECT = "monitor"


class Monitor:
    def __init__(
        self,
        store: Store,
        health: HealthServicer,
        services: tuple[str, ...],
        *,
        check_seconds: float = 5.0,
        refresh_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._health = health
        self._services = services
        self._check_seconds = check_seconds
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None
        self.up = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="database-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        refreshed = float("-inf")
        while True:
            up = await self._check()
            await self._set_health(up)
            if up and time.monotonic() - refreshed >= self._refresh_seconds:
                with contextlib.suppress(Exception):  # a failed refresh keeps the old values
                    await self._refresh()
                    refreshed = time.monotonic()
            await asyncio.sleep(self._check_seconds)

    async def _check(self) -> bool:
        try:
            async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
                await tx.ping()
        except Exception:
            return False
        return True

    async def _set_health(self, up: bool) -> None:
        metrics.DATABASE_UP.set(1 if up else 0)
        if up == self.up:
            return
        self.up = up
        log.warning("database reachable again" if up else "database unreachable: health is NOT_SERVING")
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self._services:
            await self._health.set(service, status)

    async def _refresh(self) -> None:
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            pending = await tx.pending_by_provider()
            queued = await tx.queued_count()
            retention = await tx.last_retention_success()
        now = datetime.now(UTC)
        seen = {provider: (count, oldest) for provider, count, oldest in pending}
        for provider in Provider:
            count, oldest = seen.get(provider, (0, now))
            metrics.PENDING.labels(provider.value).set(count)
            metrics.OLDEST_PENDING_AGE.labels(provider.value).set((now - oldest).total_seconds())
        metrics.QUEUED.set(queued)
        if retention is not None:
            metrics.RETENTION_LAST_SUCCESS.set(retention.timestamp())
