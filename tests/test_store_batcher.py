"""The Store group commit (server.store.StoreBatcher) against a real PostgreSQL.

failed_at defaults to now(), the transaction's start, so the distinct failed_at values of a set of Stores count
the statements that carried them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from server.audit import Actor
from server.auth import Role
from server.domain import FailureKind, Provider
from server.errors import DatabaseUnavailable
from server.store import NewRecord, StoreBatcher
from tests.conftest import eventually

ACTOR = Actor("batch-worker", Role.SERVICE, "ipv4:127.0.0.1:5555", "/deadletter.v1.DeadLetterService/Store")


def record(**overrides: object) -> NewRecord:
    fields: dict[str, object] = {
        "id": uuid.uuid4(),
        "event_id": "evt-batch",
        "provider": Provider.WHATSAPP,
        "received_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC),
        "correlation_id": "corr-batch",
        "payload_encrypted": "v1.k.c2VhbGVk",  # the store only moves ciphertext; its format is the vault's concern
        "headers_encrypted": "v1.k.aGVhZGVycw==",
        "payload_size_bytes": 6,
        "error_message": "downstream answered 503",
        "retry_count": 3,
        "idempotency_key": None,
        "failure_kind": FailureKind.RETRYABLE,
    }
    fields.update(overrides)
    return NewRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


async def test_concurrent_stores_share_statements_and_each_is_answered_after_its_commit(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    batcher = StoreBatcher(pool, acquire_timeout=5)
    records = [record() for _ in range(200)]
    answers = await asyncio.gather(*(batcher.insert(r, ACTOR) for r in records))

    assert all(isinstance(a, datetime) for a in answers)
    statements = len(set(answers))
    assert statements < len(records) / 4, f"{statements} statements for {len(records)} Stores: nothing coalesced"
    stored = {row["id"]: row["failed_at"] for row in await db.fetch("SELECT id, failed_at FROM dead_letter_queue")}
    assert stored == {r.id: a for r, a in zip(records, answers, strict=True)}  # each answer is its own row's commit
    audited = await db.fetch("SELECT dead_letter_ids[1] AS id, actor, peer FROM audit_log WHERE action = 'stored'")
    assert sorted(a["id"] for a in audited) == sorted(r.id for r in records)
    assert {(a["actor"], a["peer"]) for a in audited} == {(ACTOR.subject, ACTOR.peer)}


async def test_a_row_the_database_refuses_fails_alone(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    batcher = StoreBatcher(pool, acquire_timeout=5)
    good = [record() for _ in range(9)]
    bad = record(retry_count=-1)  # validation would refuse it; the table's CHECK is the last line
    answers = await asyncio.gather(
        *(batcher.insert(r, ACTOR) for r in [*good[:4], bad, *good[4:]]), return_exceptions=True
    )

    assert isinstance(answers[4], asyncpg.CheckViolationError)
    assert all(isinstance(a, datetime) for i, a in enumerate(answers) if i != 4)
    assert {row["id"] for row in await db.fetch("SELECT id FROM dead_letter_queue")} == {r.id for r in good}
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'stored'") == len(good)


async def test_a_taken_idempotency_key_is_reported_not_failed(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    batcher = StoreBatcher(pool, acquire_timeout=5)
    first, second = record(idempotency_key="key-1"), record(idempotency_key="key-1")
    answers = await asyncio.gather(batcher.insert(first, ACTOR), batcher.insert(second, ACTOR))

    assert isinstance(answers[0], datetime)
    assert answers[1] is None
    assert [row["id"] for row in await db.fetch("SELECT id FROM dead_letter_queue")] == [first.id]


async def test_stores_queue_behind_a_slow_statement_and_a_backlog_starts_another_writer(
    pool: asyncpg.Pool, owner_database_url: str, db: asyncpg.Connection
) -> None:
    batcher = StoreBatcher(pool, acquire_timeout=5, max_writers=3, spill=16)
    blocker = await asyncpg.connect(owner_database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("LOCK TABLE dead_letter_queue IN EXCLUSIVE MODE")  # every insert now waits

        async def statements_waiting(expected: int) -> bool:
            query = "SELECT count(*) FROM pg_locks WHERE relation = 'dead_letter_queue'::regclass AND NOT granted"
            return bool(await db.fetchval(query) == expected)

        first = asyncio.ensure_future(batcher.insert(record(), ACTOR))
        assert await eventually(lambda: statements_waiting(1), within=10)
        backlog = []
        for _ in range(10):  # Stores that trickle in queue behind the statement in flight
            backlog.append(asyncio.ensure_future(batcher.insert(record(), ACTOR)))
            await asyncio.sleep(0.02)
        assert await statements_waiting(1)
        # A backlog of 16 starts a second writer, which takes everything queued by the time it runs.
        backlog += [asyncio.ensure_future(batcher.insert(record(), ACTOR)) for _ in range(30)]
        assert await eventually(lambda: statements_waiting(2), within=10)
        await asyncio.sleep(0.2)
        assert await statements_waiting(2)
        assert not first.done()
        assert not any(f.done() for f in backlog)  # nothing is answered before its commit
        await blocking.rollback()
        answers = [await first] + [await f for f in backlog]
    finally:
        await blocker.close()

    assert all(isinstance(a, datetime) for a in answers)
    assert len(set(answers)) == 2
    assert await db.fetchval("SELECT count(*) FROM dead_letter_queue") == 41


async def test_a_broken_connection_fails_the_statement_in_flight_and_the_rest_of_its_batch_is_written(
    pool: asyncpg.Pool, owner_database_url: str, db: asyncpg.Connection
) -> None:
    other = Actor("other-worker", Role.SERVICE, "ipv4:127.0.0.1:6666", ACTOR.method)  # a second statement
    batcher = StoreBatcher(pool, acquire_timeout=5)
    waiting = "SELECT pid FROM pg_locks WHERE relation = 'dead_letter_queue'::regclass AND NOT granted"
    blocker = await asyncpg.connect(owner_database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("LOCK TABLE dead_letter_queue IN EXCLUSIVE MODE")
        first, second = record(), record()
        # One batch, two subjects: two statements, the first of which is blocked by the lock.
        in_flight = asyncio.ensure_future(batcher.insert(first, ACTOR))
        queued = asyncio.ensure_future(batcher.insert(second, other))

        async def one_waiting() -> bool:
            return len(await db.fetch(waiting)) == 1

        assert await eventually(one_waiting, within=10)
        [pid] = [row["pid"] for row in await db.fetch(waiting)]
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)

        with pytest.raises(DatabaseUnavailable):
            await in_flight
        # The untried statement goes out again on a new connection (and waits for the lock again).
        assert await eventually(one_waiting, within=10)
        assert [row["pid"] for row in await db.fetch(waiting)] != [pid]
        await blocking.rollback()
        assert isinstance(await queued, datetime)
    finally:
        await blocker.close()

    later = record()
    assert isinstance(await batcher.insert(later, ACTOR), datetime)  # the batcher still has a writer
    stored = {row["id"] for row in await db.fetch("SELECT id FROM dead_letter_queue")}
    assert stored == {second.id, later.id}
