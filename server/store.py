"""The PostgreSQL store: runs the named queries in server/sql and translates driver errors at this boundary.

It handles ciphertext only; encryption happens in the vault before anything reaches here. Every request runs
in one transaction that first switches to the caller's database role (SET LOCAL semantics), so PostgreSQL's
row-level security applies to it independently of the gRPC interceptor. Connection
failures and pool time-outs become DatabaseUnavailable (UNAVAILABLE to the caller). A Store that returns has
been committed; one that raises or is cancelled promises nothing either way (its statement may have committed
before the answer was lost), which is why workers send an idempotency key.
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
    # The driver's protocol state after the server vanished mid-query (seen while PostgreSQL restarts).
    asyncpg.exceptions.InternalClientError,
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
            timeout=settings.db_acquire_timeout_seconds,  # connecting, too, must not outlast a caller's patience
            server_settings={
                "application_name": "deadletter",
                "statement_timeout": str(int(settings.db_statement_timeout_seconds * 1000)),
            },
            # No reset query on release: every request's settings are transaction-local (tests prove it), so
            # the default RESET ALL would only cost a round trip per call.
            reset=_keep_session,
        )


# The database roles (migrations/0002) that carry each caller role's privileges.
DB_ROLES = {Role.SERVICE: "deadletter_service", Role.ADMIN: "deadletter_admin"}


class Store:
    """Opens role-scoped transactions on dead_letter_queue and audit_log, and batches Stores."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        # Writers hold their connection while Stores keep coming: leave at least half the pool to the other calls.
        self.batcher = StoreBatcher(pool, acquire_timeout, max_writers=max(1, min(4, pool.get_max_size() // 2)))

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


_Item = tuple[NewRecord, Actor, "asyncio.Future[datetime | None]"]


class StoreBatcher:
    """Group commit: coalesces concurrent Stores into one statement per batch (one round trip, one commit).

    Each caller waits for the statement that carries its record; its answer comes after that commit. One writer
    drains the queue on one connection for as long as it is not empty, so what arrives while a batch is in
    flight rides in the next one: batches grow with the load instead of each Store paying its own round trip.
    Another writer (up to max_writers) starts only for each further spill records that wait, i.e. when the
    database rather than this process is the bottleneck. Records from different subjects go in different statements,
    because each transaction declares one actor.
    """

    def __init__(
        self, pool: asyncpg.Pool, acquire_timeout: float, max_batch: int = 256, max_writers: int = 4, spill: int = 64
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._max_batch = max_batch
        self._max_writers = max_writers
        self._spill = spill
        self._pending: list[_Item] = []
        self._writers = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def insert(self, record: NewRecord, actor: Actor) -> datetime | None:
        """Insert and commit with its audit row; failed_at, or None if the idempotency key is taken."""
        future: asyncio.Future[datetime | None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, actor, future))
        if self._writers == 0 or (
            self._writers < self._max_writers and len(self._pending) >= self._spill * self._writers
        ):
            self._writers += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._writer_done)  # runs even for a writer cancelled before it started
        # The statement runs in the writer task: a caller that gives up cancels only its own future, never the
        # statement that also carries other callers' rows (its own row may still commit, unacknowledged).
        return await future

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._writers -= 1
        if task.cancelled() and self._writers == 0:
            # Shutting down mid-drain: no writer is left for what is queued, and its callers must not wait for
            # ever. Cancelled, they are answered CANCELLED: nothing was promised.
            for _, _, future in self._pending:
                future.cancel()
            self._pending.clear()

    def _take(self) -> list[_Item]:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        return batch

    async def _drain(self) -> None:
        batch: list[_Item] = []
        try:
            while self._pending:
                batch = self._take()
                try:
                    with translate_errors():
                        async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                            await self._write_batch(conn, batch)
                            while self._pending:  # keep the connection for the batches that queued meanwhile
                                batch = self._take()
                                await self._write_batch(conn, batch)
                except _ConnectionLost:
                    continue  # its group failed; the rest of its batch was queued again, for a new connection
                except Exception as error:  # no connection to be had: the whole batch fails
                    _settle(batch, error)
        except BaseException:
            for _, _, future in batch:  # cancelled (shutdown): unanswered, so the callers know nothing is promised
                future.cancel()
            raise

    async def _write_batch(self, conn: asyncpg.pool.PoolConnectionProxy, batch: list[_Item]) -> None:
        groups: dict[str, list[_Item]] = {}
        for item in batch:
            groups.setdefault(item[1].subject, []).append(item)
        untried = list(groups.values())
        while untried:
            group = untried.pop(0)
            try:
                await self._write(conn, group)
            except DatabaseUnavailable as error:
                # Only the group whose statement was in flight may have committed or not: it fails. The others
                # were never sent; they go first in the queue, for the next connection.
                _settle(group, error)
                self._pending[:0] = [item for rest in untried for item in rest]
                raise _ConnectionLost from error

    async def _write(self, conn: asyncpg.pool.PoolConnectionProxy, group: list[_Item]) -> None:
        try:
            with translate_errors():
                rows = await conn.fetch(QUERIES["store_batch"], *_batch_args(group))
        except DatabaseUnavailable:
            raise
        except Exception as error:
            if len(group) == 1:
                _settle(group, error)
                return
            # One bad row must not fail the others: write them one by one.
            for item in group:
                await self._write(conn, [item])
            return
        committed = {row["id"]: row["failed_at"] for row in rows}
        for record, _, future in group:
            if not future.done():
                future.set_result(committed.get(record.id))


class _ConnectionLost(Exception):
    """The writer's connection broke; what was not yet sent is queued again."""


def _settle(items: list[_Item], error: BaseException) -> None:
    for _, _, future in items:
        if not future.done():
            future.set_exception(error)


def _batch_args(group: list[_Item]) -> list[object]:
    records = [record for record, _, _ in group]
    actor = group[0][1]
    return [
        actor.subject,
        actor.method,
        [r.id for r in records],
        [a.peer for _, a, _ in group],
        [r.event_id for r in records],
        [r.provider.value for r in records],
        [r.received_at for r in records],
        [r.correlation_id for r in records],
        [r.payload_encrypted for r in records],
        [r.headers_encrypted for r in records],
        [r.payload_size_bytes for r in records],
        [r.error_message for r in records],
        [r.retry_count for r in records],
        [r.idempotency_key for r in records],
        [r.failure_kind.value for r in records],
    ]


class Transaction:
    """The queries of one request, all inside its transaction."""

    def __init__(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        self._conn = conn

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
        locked: bool = await self._conn.fetchval(QUERIES["try_retention_lock"], key)  # the first column
        return locked

    async def claim_retention_run(self, day: date, cutoff: datetime) -> bool:
        return await self._conn.fetchval(QUERIES["claim_retention_run"], day, cutoff) is not None

    async def finish_retention_run(self, day: date, purged: int) -> None:
        await self._conn.execute(QUERIES["finish_retention_run"], day, purged)

    async def fetch_named(self, name: str, *args: object) -> list[asyncpg.Record]:
        """Run one of server/sql's named queries in this transaction (for modules such as key rotation)."""
        rows: list[asyncpg.Record] = await self._conn.fetch(QUERIES[name], *args)
        return rows

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
    except asyncpg.InterfaceError as exc:
        # "connection is closed", "pool is closed": the database went away. Other interface errors are our bugs.
        if "closed" in str(exc):
            raise DatabaseUnavailable() from exc
        raise


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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection as it is (asyncpg has already rolled back any open transaction)."""


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
