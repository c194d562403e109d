"""The daily retention purge: scheduled in every replica, run by one, never stalling Store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from apscheduler.triggers.cron import CronTrigger

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.retention import JOB_ID, MISFIRE_GRACE_SECONDS
from tests.conftest import JWT_SECRET, SAMPLES, channel_to, eventually, settings_for, token
from tests.processes import ServerProcess, free_port

SAMPLE = SAMPLES[0]


async def _insert_expired(db: asyncpg.Connection, count: int, age_days: int) -> None:
    """Rows as old as age_days, written directly: the purge only looks at failed_at."""
    await db.execute(
        """
        INSERT INTO dead_letter_queue (event_id, provider, received_at, correlation_id, payload_encrypted,
            headers_encrypted, payload_size_bytes, error_message, retry_count, failed_at)
        SELECT 'old-' || n, 'whatsapp', now() - make_interval(days => $2), 'c', 'v1.x.y', 'v1.x.y', 1, 'e', 3,
               now() - make_interval(days => $2)
        FROM generate_series(1, $1) AS n
        """,
        count,
        age_days,
    )


async def test_the_job_is_scheduled_daily_with_a_deliberate_misfire_policy(server: app.Application) -> None:
    assert server.retention is not None
    scheduler = server.retention.scheduler
    assert scheduler is not None
    assert scheduler.running
    job = scheduler.get_job(JOB_ID)
    assert isinstance(job.trigger, CronTrigger)
    assert str(job.trigger) == str(CronTrigger.from_crontab("0 3 * * *", timezone=UTC))
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, MISFIRE_GRACE_SECONDS)
    next_run = job.next_run_time.astimezone(UTC)
    assert (next_run.hour, next_run.minute) == (3, 0)
    await server.stop(0)
    assert not scheduler.running


async def test_two_replicas_trigger_it_and_it_runs_once(
    database_url: str, encryption_key: str, db: asyncpg.Connection
) -> None:
    await _insert_expired(db, 120, age_days=91)
    await _insert_expired(db, 30, age_days=89)
    first = await app.start(settings_for(database_url, encryption_key))
    second = await app.start(settings_for(database_url, encryption_key))
    try:
        assert first.retention is not None
        assert second.retention is not None
        results = await asyncio.gather(first.retention.run_once(), second.retention.run_once())
        again = await first.retention.run_once()
    finally:
        await first.stop(0)
        await second.stop(0)
    assert sorted(results, key=lambda r: r is None) == [120, None]
    assert again is None
    assert await db.fetchval("SELECT count(*) FROM dead_letter_queue") == 30
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'purged'") == 1
    assert await db.fetchval("SELECT purged FROM retention_runs") == 120


async def test_two_server_processes_on_one_database_purge_once(
    database_url: str, encryption_key: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await _insert_expired(db, 200, age_days=100)
    await _insert_expired(db, 10, age_days=1)
    env = {
        "DATABASE_URL": database_url,
        "DEADLETTER_ENCRYPTION_KEYS": encryption_key,
        "DEADLETTER_JWT_SECRET": JWT_SECRET,
        "DEADLETTER_RETENTION_CRON": "* * * * *",  # every minute, so both fire in this test
    }
    async with (
        ServerProcess(env | {"DEADLETTER_LISTEN": f"127.0.0.1:{free_port()}"}) as one,
        ServerProcess(env | {"DEADLETTER_LISTEN": f"127.0.0.1:{free_port()}"}) as two,
    ):

        async def both_ran() -> bool:
            return _logged_job(one) and _logged_job(two)

        await eventually(both_ran, within=75, every=1)
    logs = one.logs() + two.logs()
    assert _logged_job(one), one.logs()[-2000:]
    assert _logged_job(two), two.logs()[-2000:]
    assert logs.count("retention purge done") == 1
    assert await db.fetchval("SELECT count(*) FROM dead_letter_queue") == 10
    assert await db.fetchval("SELECT count(*) FROM retention_runs") == 1
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'purged'") == 1


def _logged_job(process: ServerProcess) -> bool:
    text = process.logs()
    return "retention purge done" in text or "retention purge skipped" in text


async def test_purging_100k_rows_never_fails_a_concurrent_store(
    server: app.Application, db: asyncpg.Connection
) -> None:
    await _insert_expired(db, 100_000, age_days=120)
    stop = asyncio.Event()
    stored: list[str] = []

    async def store_meanwhile() -> None:
        async with channel_to(server.address, token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            while not stop.is_set():
                stored.append((await stub.Store(SAMPLE.store_request(), timeout=10)).id)

    writers = [asyncio.create_task(store_meanwhile()) for _ in range(4)]
    try:
        async with channel_to(server.address, token()) as channel:
            response = await pb_grpc.DeadLetterServiceStub(channel).Purge(pb.PurgeRequest(), timeout=300)
    finally:
        stop.set()
    await asyncio.gather(*writers)  # any failed Store raises here

    assert response.purged_count == 100_000
    assert len(stored) > 0
    remaining = {str(r["id"]) for r in await db.fetch("SELECT id FROM dead_letter_queue")}
    assert remaining == set(stored)
    cutoff = response.cutoff.ToDatetime(UTC)
    assert abs(cutoff - (datetime.now(UTC) - timedelta(days=90))) < timedelta(minutes=5)
