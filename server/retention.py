"""The daily retention purge: APScheduler inside the server's event loop, run by one replica a day.

Every replica schedules the job; the first to take the advisory lock and record today's run in
retention_runs performs it, the others skip. The run-day row is committed only when the purge finishes, so a
replica that dies mid-purge leaves the day free for another attempt (the misfire grace covers a late one).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from server.audit import Actor
from server.auth import Role
from server.store import Store
from server.vault import Vault

log = logging.getLogger("deadletter.retention")

JOB_ID = "retention-purge"
SUBJECT = "retention-job"
# A daily job that missed its time (the process was down) still runs if it starts within six hours.
MISFIRE_GRACE_SECONDS = 6 * 3600
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"deadletter retention").digest()[:8], "big", signed=True)


class Retention:
    def __init__(self, vault: Vault, store: Store, retention_days: int, cron: str) -> None:
        self._vault = vault
        self._store = store
        self._retention = timedelta(days=retention_days)
        self._trigger = CronTrigger.from_crontab(cron, timezone=UTC)
        self._scheduler: AsyncIOScheduler | None = None

    def start(self) -> None:
        """Schedule the daily job; call from inside the running event loop."""
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_job(
            self.run_once,
            self._trigger,
            id=JOB_ID,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=MISFIRE_GRACE_SECONDS,
            replace_existing=True,
        )
        self._scheduler.start()

    def shutdown(self) -> None:
        """Stop scheduling; a run in progress is cancelled with the loop's tasks."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    @property
    def scheduler(self) -> AsyncIOScheduler | None:
        return self._scheduler

    async def run_once(self, now: datetime | None = None) -> int | None:
        """Purge what expired, unless another replica runs or ran today's purge; return the count, or None."""
        now = now or datetime.now(UTC)
        cutoff = now - self._retention
        actor = Actor(SUBJECT, Role.SERVICE, "scheduler", JOB_ID)
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            if not await tx.try_lock(_LOCK_KEY) or not await tx.claim_retention_run(now.date(), cutoff):
                log.info("retention purge skipped: another replica runs or ran it today")
                return None
            purged = await self._vault.purge(actor, cutoff, dry_run=False)
            await tx.finish_retention_run(now.date(), purged)
        log.info("retention purge done", extra={"purged": purged, "cutoff": cutoff.isoformat()})
        return purged
