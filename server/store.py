"""The PostgreSQL store: runs the named queries in server/sql and translates driver errors at this boundary.

It handles ciphertext only; encryption happens in the vault before anything reaches here. Every request runs
in one transaction that first switches to the caller's database role (SET LOCAL semantics), so PostgreSQL's
row-level security applies to it independently of the gRPC interceptor. Connection
failures and pool time-outs become DatabaseUnavailable (UNAVAILABLE to the caller): a Store that raises has
not been committed, and one that returns has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from server.audit import Actor, AuditEntry
from server.auth import Role
from server.config import Settings
from server.domain import Cursor, DeadLetter, FailureKind, ListFilter, Provider, Status
from server.errors import DatabaseUnavailable
from server.sql import QUERIES

# Errors that mean "the database is not there right now", not "this request is wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash recovery, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
)


@dataclass(frozen=True)
class SealedRecord:
    """A dead letter as stored: metadata plus the sealed payload and headers."""

    meta: DeadLetter
    payload_encrypted: str
    headers_encrypted: str


@dataclass(frozen=True)
class NewRecord:
    """What the vault asks the store to insert."""

    id: uuid.UUID
    event_id: str
    provider: Provider
    received_at: datetime
    correlation_id: str
    payload_encrypted: str
    headers_encrypted: str
    payload_size_bytes: int
    error_message: str
    retry_count: int
    idempotency_key: str | None
    failure_kind: FailureKind


@dataclass(frozen=True)
class QueuedRow:
    """An item of the webhook_queue outbox, still sealed."""

    id: uuid.UUID
    dead_letter_id: uuid.UUID
    attempt: int
    provider: Provider
    event_id: str
    correlation_id: str
    payload_encrypted: str
    headers_encrypted: str


async def create_pool(settings: Settings, dsn: str) -> asyncpg.Pool:
    """Open the connection pool; raises DatabaseUnavailable if the database cannot be reached."""
    with translate_errors():
        return await asyncpg.create_pool(
            dsn,
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            command_timeout=settings.db_statement_timeout_seconds + 5,
            server_settings={
                "application_name": "deadletter",
                "statement_timeout": str(int(settings.db_statement_timeout_seconds * 1000)),
            },
        )


# The database roles (migrations/0002) that carry each caller role's privileges.
DB_ROLES = {Role.SERVICE: "deadletter_service", Role.ADMIN: "deadletter_admin"}


class Store:
    """Opens role-scoped transactions on dead_letter_queue and audit_log."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    @contextlib.asynccontextmanager
    async def transaction(self, role: Role, subject: str) -> AsyncIterator[Transaction]:
        """One transaction as the caller's database role; commits when the block ends without an error."""
        with translate_errors():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn, conn.transaction():
                await conn.execute(QUERIES["act_as"], DB_ROLES[role], subject)
                yield Transaction(conn)

    async def audit(self, entry: AuditEntry) -> None:
        """Record an entry on its own, for calls that touch nothing else (denied ones)."""
        # The server writes these on its own behalf: a denied caller has no role of its own to write with.
        async with self.transaction(Role.SERVICE, entry.actor.subject) as tx:
            await tx.audit(entry)


class Transaction:
    """The queries of one request, all inside its transaction."""

    def __init__(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        self._conn = conn

    async def insert(self, record: NewRecord, actor: Actor) -> datetime | None:
        """Insert the record with its 'stored' audit row; None if the idempotency key is already taken."""
        failed_at: datetime | None = await self._conn.fetchval(
            QUERIES["insert_dead_letter"],
            record.id,
            record.event_id,
            record.provider.value,
            record.received_at,
            record.correlation_id,
            record.payload_encrypted,
            record.headers_encrypted,
            record.payload_size_bytes,
            record.error_message,
            record.retry_count,
            record.idempotency_key,
            actor.subject,
            actor.role or "",
            actor.peer,
            actor.method,
            record.failure_kind.value,
        )
        return failed_at

    async def get(self, record_id: uuid.UUID) -> SealedRecord | None:
        row = await self._conn.fetchrow(QUERIES["get_dead_letter"], record_id)
        return None if row is None else _sealed(row)

    async def get_by_idempotency_key(self, key: str) -> SealedRecord | None:
        row = await self._conn.fetchrow(QUERIES["get_dead_letter_by_idempotency_key"], key)
        return None if row is None else _sealed(row)

    async def list_page(self, filters: ListFilter, after: Cursor | None, limit: int) -> list[DeadLetter]:
        """Up to limit rows after the cursor, newest failure first."""
        args: list[object] = [
            filters.failed_after,
            filters.failed_before,
            after.failed_at if after else None,
            after.id if after else None,
            limit,
            filters.failure_kind.value if filters.failure_kind else None,
            filters.status.value if filters.status else None,
        ]
        query = QUERIES["list_dead_letters"]
        if filters.provider is not None:
            query = QUERIES["list_dead_letters_by_provider"]
            args.append(filters.provider.value)
        return [_meta(row) for row in await self._conn.fetch(query, *args)]

    async def get_for_update(self, record_id: uuid.UUID) -> SealedRecord | None:
        row = await self._conn.fetchrow(QUERIES["get_dead_letter_for_update"], record_id)
        return None if row is None else _sealed(row)

    async def reprocess(self, record_id: uuid.UUID, subject: str, message_id: uuid.UUID) -> DeadLetter:
        """Mark a locked dead letter reprocessed and put it on the outbox."""
        row = await self._conn.fetchrow(QUERIES["reprocess_dead_letter"], record_id, subject, message_id)
        assert row is not None, "the caller holds the row lock"
        return _meta(row)

    async def redrive_candidates(self, filters: ListFilter, limit: int) -> list[uuid.UUID]:
        """Pending, retryable matches, oldest first."""
        rows = await self._conn.fetch(QUERIES["redrive_candidates"], *_redrive_args(filters), limit)
        return [row["id"] for row in rows]

    async def redrive_skipped(self, filters: ListFilter) -> int:
        """How many matches a Redrive leaves alone (reprocessed already, or not retryable)."""
        count: int = await self._conn.fetchval(QUERIES["redrive_skipped"], *_redrive_args(filters))
        return count

    async def claim_queued(self, lease_seconds: int, subject: str) -> QueuedRow | None:
        row = await self._conn.fetchrow(QUERIES["claim_queued"], float(lease_seconds), subject)
        return None if row is None else _queued(row)

    async def acknowledge_queued(self, message_id: uuid.UUID) -> uuid.UUID | None:
        dead_letter_id: uuid.UUID | None = await self._conn.fetchval(QUERIES["acknowledge_queued"], message_id)
        return dead_letter_id

    async def relay_batch(self, limit: int) -> list[QueuedRow]:
        return [_queued(row) for row in await self._conn.fetch(QUERIES["relay_batch"], limit)]

    async def delete_queued(self, ids: list[uuid.UUID]) -> None:
        await self._conn.execute(QUERIES["delete_queued"], ids)

    async def count_expired(self, cutoff: datetime) -> int:
        count: int = await self._conn.fetchval(QUERIES["count_expired"], cutoff)
        return count

    async def purge_batch(self, cutoff: datetime, batch_size: int) -> int:
        status: str = await self._conn.execute(QUERIES["purge_batch"], cutoff, batch_size)
        return int(status.rsplit(" ", 1)[1])  # "DELETE <n>"

    async def try_lock(self, key: int) -> bool:
        """Take a transaction-scoped advisory lock if it is free."""
        locked: bool = await self._conn.fetchval(QUERIES["try_retention_lock"], key)
        return locked

    async def claim_retention_run(self, day: date, cutoff: datetime) -> bool:
        return await self._conn.fetchval(QUERIES["claim_retention_run"], day, cutoff) is not None

    async def finish_retention_run(self, day: date, purged: int) -> None:
        await self._conn.execute(QUERIES["finish_retention_run"], day, purged)

    async def ping(self) -> None:
        await self._conn.fetchval(QUERIES["ping"])

    async def pending_by_provider(self) -> list[tuple[Provider, int, datetime]]:
        rows = await self._conn.fetch(QUERIES["pending_by_provider"])
        return [(Provider(r["provider"]), r["pending"], r["oldest"]) for r in rows]

    async def queued_count(self) -> int:
        count: int = await self._conn.fetchval(QUERIES["queued_count"])
        return count

    async def last_retention_success(self) -> datetime | None:
        last: datetime | None = await self._conn.fetchval(QUERIES["last_retention_success"])
        return last

    async def audit(self, entry: AuditEntry) -> None:
        actor = entry.actor
        await self._conn.execute(
            QUERIES["insert_audit"],
            actor.subject,
            actor.role or "",
            actor.peer,
            actor.method,
            entry.action.value,
            entry.outcome,
            [uuid.UUID(i) for i in entry.dead_letter_ids],
            entry.event_id,
            entry.provider,
            entry.correlation_id,
            json.dumps(entry.metadata),
        )


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn 'the database is not there' driver errors into DatabaseUnavailable."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable() from exc


def _meta(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(
        id=str(row["id"]),
        event_id=row["event_id"],
        provider=Provider(row["provider"]),
        correlation_id=row["correlation_id"],
        error_message=row["error_message"],
        retry_count=row["retry_count"],
        received_at=row["received_at"],
        failed_at=row["failed_at"],
        payload_size_bytes=row["payload_size_bytes"],
        idempotency_key=row["idempotency_key"],
        failure_kind=FailureKind(row["failure_kind"]),
        status=Status(row["status"]),
        reprocessed_at=row["reprocessed_at"],
        reprocessed_by=row["reprocessed_by"],
        reprocess_count=row["reprocess_count"],
    )


def _redrive_args(filters: ListFilter) -> tuple[object, ...]:
    return (
        filters.failed_after,
        filters.failed_before,
        filters.provider.value if filters.provider else None,
        filters.failure_kind.value if filters.failure_kind else None,
    )


def _queued(row: asyncpg.Record) -> QueuedRow:
    return QueuedRow(
        id=row["id"],
        dead_letter_id=row["dead_letter_id"],
        attempt=row["attempt"],
        provider=Provider(row["provider"]),
        event_id=row["event_id"],
        correlation_id=row["correlation_id"],
        payload_encrypted=row["payload_encrypted"],
        headers_encrypted=row["headers_encrypted"],
    )


def _sealed(row: asyncpg.Record) -> SealedRecord:
    return SealedRecord(_meta(row), row["payload_encrypted"], row["headers_encrypted"])
