"""The PostgreSQL store: runs the named queries in server/sql and translates driver errors at this boundary.

It handles ciphertext only; encryption happens in the vault before anything reaches here. Connection
failures and pool time-outs become DatabaseUnavailable (UNAVAILABLE to the caller): a Store that raises has
not been committed, and one that returns has.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.config import Settings
from server.domain import Cursor, DeadLetter, ListFilter, Provider
from server.errors import DatabaseUnavailable
from server.sql import QUERIES

# Errors that mean "the database is not there right now", not "this request is wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
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


class Store:
    """Reads and writes dead_letter_queue through a pool."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    async def insert(self, record: NewRecord) -> datetime | None:
        """Insert and commit; return failed_at, or None if the idempotency key is already taken."""
        async with self._connection() as conn:
            failed_at: datetime | None = await conn.fetchval(
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
            )
        return failed_at

    async def get(self, record_id: uuid.UUID) -> SealedRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(QUERIES["get_dead_letter"], record_id)
        return None if row is None else _sealed(row)

    async def get_by_idempotency_key(self, key: str) -> SealedRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(QUERIES["get_dead_letter_by_idempotency_key"], key)
        return None if row is None else _sealed(row)

    async def list(self, filters: ListFilter, after: Cursor | None, limit: int) -> list[DeadLetter]:
        """Up to limit rows after the cursor, newest failure first."""
        args: list[object] = [
            filters.failed_after,
            filters.failed_before,
            after.failed_at if after else None,
            after.id if after else None,
            limit,
        ]
        query = QUERIES["list_dead_letters"]
        if filters.provider is not None:
            query = QUERIES["list_dead_letters_by_provider"]
            args.append(filters.provider.value)
        async with self._connection() as conn:
            rows = await conn.fetch(query, *args)
        return [_meta(row) for row in rows]

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        with translate_errors():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn


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
    )


def _sealed(row: asyncpg.Record) -> SealedRecord:
    return SealedRecord(_meta(row), row["payload_encrypted"], row["headers_encrypted"])
