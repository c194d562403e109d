"""The vault: the dead-letter operations, joining validation, encryption, the store and the audit trail.

Plaintext payloads and headers exist only inside these calls and in the responses they return; they are never
logged, never placed in an error and never written to the audit trail. Each operation is one transaction that
includes its audit row: an operation whose audit row cannot be written is not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from server import metrics, signatures
from server.audit import Action, Actor, AuditEntry
from server.crypto import Keyring
from server.domain import (
    Cursor,
    DeadLetter,
    FailureKind,
    ListFilter,
    NewDeadLetter,
    OpenedDeadLetter,
    Page,
    Status,
    StoreResult,
)
from server.errors import (
    Aborted,
    DeadLetterError,
    FailedPrecondition,
    IdempotencyConflict,
    KeyUnavailable,
    NotFound,
    RecordCorrupted,
)
from server.page_token import PageTokens
from server.store import NewRecord, QueuedRow, SealedRecord, Store, Transaction

log = logging.getLogger("deadletter.vault")

PAYLOAD_FIELD = "payload"
HEADERS_FIELD = "headers"
# A purge can remove the record that holds a key between our failed insert and our read: try again, briefly.
_IDEMPOTENT_INSERT_ATTEMPTS = 3


@dataclass(frozen=True)
class RecoveryPolicy:
    """Settings for sending dead letters back and purging them."""

    app_secrets: list[bytes] = field(default_factory=list)  # empty: signatures are not checked
    redrive_max_per_second: int = 50
    redrive_max_batch: int = 10_000
    purge_batch_size: int = 5_000
    purge_rest_percent: int = 200  # of each batch's time, spent idle before the next batch


class Vault:
    """Stores, opens, lists, sends back and purges dead letters on behalf of an authenticated actor."""

    def __init__(self, store: Store, keyring: Keyring, policy: RecoveryPolicy | None = None) -> None:
        self._store = store
        self._keyring = keyring
        self._policy = policy or RecoveryPolicy()
        self.page_tokens = PageTokens(keyring.derive(b"page token"))

    async def store(self, actor: Actor, letter: NewDeadLetter) -> StoreResult:
        """Encrypt and commit a dead letter, or return the record an identical earlier Store created."""
        for _ in range(_IDEMPOTENT_INSERT_ATTEMPTS):
            record = self._seal(letter)
            if await self._store.batcher.insert(record, actor) is not None:  # committed, audit row included
                metrics.STORED.labels(letter.provider.value).inc()
                return StoreResult(str(record.id), deduplicated=False)
            assert letter.idempotency_key is not None  # only a key conflict skips the insert
            outcome: StoreResult | DeadLetterError | None = None
            async with self._transaction(actor) as tx:
                existing = await tx.get_by_idempotency_key(letter.idempotency_key)
                if existing is not None:
                    outcome = self._replay(letter, existing)
                    code = outcome.code if isinstance(outcome, DeadLetterError) else "OK"
                    entry = _entry(actor, Action.STORED, existing.meta.id, existing, code, deduplicated=True)
                    await tx.audit(entry)
            if isinstance(outcome, DeadLetterError):
                outcome.audited = True
                raise outcome
            if outcome is not None:
                return outcome
        raise Aborted("the record holding this idempotency_key changed while storing; retry")

    async def get(self, actor: Actor, record_id: uuid.UUID) -> OpenedDeadLetter:
        """Return a dead letter with its payload and headers decrypted; failed attempts are audited too."""
        failure: DeadLetterError | None = None
        async with self._transaction(actor) as tx:
            sealed = await tx.get(record_id)
            try:
                if sealed is None:
                    raise NotFound(str(record_id))
                opened = self._open(sealed)
            except DeadLetterError as error:
                failure = error
            await tx.audit(_entry(actor, Action.VIEWED, str(record_id), sealed, failure.code if failure else "OK"))
        if failure is not None:
            failure.audited = True
            raise failure
        return opened

    async def list(self, actor: Actor, filters: ListFilter, page_token: str, page_size: int) -> Page:
        """Return one page, newest failure first, with the token for the next one."""
        after = self.page_tokens.decode(page_token, filters) if page_token else None
        async with self._transaction(actor) as tx:
            # One row more than asked tells whether another page follows, without a count.
            rows = await tx.list_page(filters, after, page_size + 1)
            page = rows[:page_size]
            await tx.audit(
                AuditEntry(
                    actor,
                    Action.LISTED,
                    dead_letter_ids=tuple(m.id for m in page),
                    provider=filters.provider.value if filters.provider else None,
                    metadata={"count": len(page), "page_size": page_size, "continued": after is not None},
                )
            )
        if len(rows) <= page_size:
            return Page(page, "")
        last = page[-1]
        return Page(page, self.page_tokens.encode(Cursor(last.failed_at, uuid.UUID(last.id)), filters))

    async def reprocess(self, actor: Actor, record_id: uuid.UUID, force: bool) -> ReprocessResult:
        """Put a dead letter back on the processing queue and mark it reprocessed, atomically, with its audit row."""
        failure: DeadLetterError | None = None
        result: ReprocessResult | None = None
        async with self._transaction(actor) as tx:
            # The row lock serialises concurrent Reprocess calls: the second one sees the first's outcome.
            sealed = await tx.get_for_update(record_id)
            try:
                if sealed is None:
                    raise NotFound(str(record_id))
                self._check_reprocessable(sealed, force)
                message_id = uuid.uuid4()
                result = ReprocessResult(await tx.reprocess(record_id, actor.subject, message_id), str(message_id))
            except DeadLetterError as error:
                failure = error
            extra = {"forced": force, "queue_message_id": result.queue_message_id if result else None}
            await tx.audit(
                _entry(actor, Action.REPROCESSED, str(record_id), sealed, failure.code if failure else "OK", **extra)
            )
        if failure is not None:
            failure.audited = True
            raise failure
        assert result is not None
        metrics.REPROCESSED.labels(result.dead_letter.provider.value).inc()
        return result

    async def redrive(self, actor: Actor, request: RedriveRequest) -> RedriveResult:
        """Send back every pending, retryable match, no faster than the rate, touching at most the limit."""
        limit = min(request.limit or self._policy.redrive_max_batch, self._policy.redrive_max_batch)
        async with self._transaction(actor) as tx:
            sendable = await tx.redrive_candidates(request.filters, limit + 1)
            skipped = await tx.redrive_skipped(request.filters)
        truncated = len(sendable) > limit
        sendable = sendable[:limit]
        if request.dry_run:
            return RedriveResult(len(sendable), skipped, dry_run=True, truncated=truncated)
        rate = min(request.max_per_second or self._policy.redrive_max_per_second, self._policy.redrive_max_per_second)
        sent = 0
        pace = _Pace(rate)
        for record_id in sendable:
            await pace.wait()
            try:
                await self.reprocess(actor, record_id, force=False)
                sent += 1
            except (FailedPrecondition, NotFound, RecordCorrupted, KeyUnavailable):
                skipped += 1  # changed since it was listed, or cannot be sent: audited by reprocess
        return RedriveResult(sent, skipped, dry_run=False, truncated=truncated)

    async def claim(self, actor: Actor, lease_seconds: int) -> QueuedWebhook | None:
        """Lease the next queued webhook to the caller and return it decrypted (audited as viewed)."""
        # The lease commits on its own first: an item that fails to open must not stay first in line for everyone.
        async with self._transaction(actor) as tx:
            row = await tx.claim_queued(lease_seconds, actor.subject)
        if row is None:
            return None
        try:
            webhook: QueuedWebhook | None = self.open_queued(row)
            failure: DeadLetterError | None = None
        except DeadLetterError as error:
            webhook, failure = None, error
        async with self._transaction(actor) as tx:
            await tx.audit(
                AuditEntry(
                    actor,
                    Action.VIEWED,
                    dead_letter_ids=(str(row.dead_letter_id),),
                    event_id=row.event_id,
                    provider=row.provider.value,
                    correlation_id=row.correlation_id,
                    outcome=failure.code if failure else "OK",
                    metadata={"queue_message_id": str(row.id), "attempt": row.attempt, "claimed": True},
                )
            )
        if failure is not None:
            failure.audited = True
            raise failure
        return webhook

    async def acknowledge(self, actor: Actor, message_id: uuid.UUID) -> None:
        async with self._transaction(actor) as tx:
            if await tx.acknowledge_queued(message_id) is None:
                raise NotFound(str(message_id), "queued message")

    async def purge(self, actor: Actor, cutoff: datetime, dry_run: bool) -> int:
        """Delete dead letters that failed before cutoff, a batch per transaction, each with its audit row."""
        if dry_run:
            async with self._transaction(actor) as tx:
                count = await tx.count_expired(cutoff)
                await tx.audit(_purge_entry(actor, cutoff, count, dry_run=True))
            return count
        total = 0
        batch_size = self._policy.purge_batch_size
        run = str(uuid.uuid4())  # groups one purge's rows, which may interleave with another purge's
        for batch in itertools.count(1):
            began = time.monotonic()
            # Each batch commits with the audit row that counts it: a purge interrupted midway (a restart, a
            # cancelled call) leaves exactly the rows it deleted accounted for.
            async with self._transaction(actor) as tx:
                deleted = await tx.purge_batch(cutoff, batch_size)
                last = deleted < batch_size
                extra: dict[str, object] = {"run": run, "batch": batch, "last": last}
                if last:
                    extra["total"] = total + deleted
                await tx.audit(_purge_entry(actor, cutoff, deleted, dry_run=False, **extra))
            total += deleted
            metrics.PURGED.inc(deleted)
            if last:
                break
            # A purge flat out takes a core and the WAL from the Stores arriving meanwhile (their p99 went 2.5x in
            # the benchmark; 1.4x resting twice each batch's time); resting in proportion leaves them their share.
            await asyncio.sleep((time.monotonic() - began) * self._policy.purge_rest_percent / 100)
        return total

    def open_queued(self, row: QueuedRow) -> QueuedWebhook:
        """Decrypt a queue item: its ciphertexts are the dead letter's, bound to the dead letter's id."""
        record_id = str(row.dead_letter_id)
        try:
            payload = self._keyring.open(row.payload_encrypted, record_id, PAYLOAD_FIELD)
            headers = json.loads(self._keyring.open(row.headers_encrypted, record_id, HEADERS_FIELD))
        except RecordCorrupted:
            metrics.DECRYPTION_FAILURES.inc()
            # Name the queue message too: it is what a worker can acknowledge away.
            raise RecordCorrupted(f"{record_id} (queue message {row.id})") from None
        return QueuedWebhook(row, payload, headers)

    def _check_reprocessable(self, sealed: SealedRecord, force: bool) -> None:
        meta = sealed.meta
        if not force and meta.failure_kind is not FailureKind.RETRYABLE:
            raise FailedPrecondition(
                f"dead letter {meta.id} failed as {meta.failure_kind.value}, which retrying cannot fix; "
                "pass force to send it anyway"
            )
        if not force and meta.status is Status.REPROCESSED:
            raise FailedPrecondition(
                f"dead letter {meta.id} was already reprocessed ({meta.reprocess_count} time(s)); "
                "pass force to send it again"
            )
        # Always open it: a dead letter that fails authentication must not go back (DATA_LOSS).
        opened = self._open(sealed)
        if self._policy.app_secrets and not signatures.verifies(
            opened.payload, opened.headers, self._policy.app_secrets
        ):
            raise FailedPrecondition(
                f"dead letter {meta.id}: x-hub-signature-256 does not match the payload under any configured app "
                "secret; it will not be sent back"
            )

    @contextlib.asynccontextmanager
    async def audit_failures(self, actor: Actor, action: Action) -> AsyncIterator[None]:
        """Audit a call that fails before its own audited transaction (a malformed id, a bad page token)."""
        try:
            yield
        except DeadLetterError as error:
            if not error.audited:
                try:
                    async with self._transaction(actor) as tx:
                        await tx.audit(AuditEntry(actor, action, error.code))
                except DeadLetterError as audit_error:
                    log.warning("could not audit a failed call", extra={"error": audit_error.code})
                error.audited = True
            raise

    def _transaction(self, actor: Actor) -> contextlib.AbstractAsyncContextManager[Transaction]:
        assert actor.role is not None, "the interceptor lets only callers with a role through"
        return self._store.transaction(actor.role, actor.subject)

    def _seal(self, letter: NewDeadLetter) -> NewRecord:
        record_id = uuid.uuid4()
        headers = json.dumps(letter.headers, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return NewRecord(
            id=record_id,
            event_id=letter.event_id,
            provider=letter.provider,
            received_at=letter.received_at,
            correlation_id=letter.correlation_id,
            payload_encrypted=self._keyring.seal(letter.payload, str(record_id), PAYLOAD_FIELD),
            headers_encrypted=self._keyring.seal(headers, str(record_id), HEADERS_FIELD),
            payload_size_bytes=len(letter.payload),
            error_message=letter.error_message,
            retry_count=letter.retry_count,
            idempotency_key=letter.idempotency_key,
            failure_kind=letter.failure_kind,
        )

    def _open(self, sealed: SealedRecord) -> OpenedDeadLetter:
        record_id = sealed.meta.id
        try:
            payload = self._keyring.open(sealed.payload_encrypted, record_id, PAYLOAD_FIELD)
            headers = json.loads(self._keyring.open(sealed.headers_encrypted, record_id, HEADERS_FIELD))
        except (RecordCorrupted, KeyUnavailable):
            metrics.DECRYPTION_FAILURES.inc()
            raise
        return OpenedDeadLetter(sealed.meta, payload, headers)

    def _replay(self, letter: NewDeadLetter, existing: SealedRecord) -> StoreResult | DeadLetterError:
        """The earlier record's id if letter repeats it; otherwise the error to answer (the caller audits it)."""
        try:
            opened = self._open(existing)
        except DeadLetterError as error:
            return error
        meta = opened.meta
        earlier = NewDeadLetter(
            event_id=meta.event_id,
            provider=meta.provider,
            payload=opened.payload,
            headers=opened.headers,
            error_message=meta.error_message,
            retry_count=meta.retry_count,
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            idempotency_key=meta.idempotency_key,
            failure_kind=meta.failure_kind,
        )
        if not letter.same_content(earlier):
            return IdempotencyConflict(meta.id)
        return StoreResult(meta.id, deduplicated=True)


@dataclass(frozen=True)
class ReprocessResult:
    dead_letter: DeadLetter
    queue_message_id: str


@dataclass(frozen=True)
class RedriveRequest:
    filters: ListFilter
    dry_run: bool
    max_per_second: int
    limit: int


@dataclass(frozen=True)
class RedriveResult:
    sent: int
    skipped: int
    dry_run: bool
    truncated: bool


@dataclass(frozen=True)
class QueuedWebhook:
    row: QueuedRow
    payload: bytes
    headers: dict[str, str]


class _Pace:
    """Spaces calls evenly at most rate per second."""

    def __init__(self, rate: int) -> None:
        self._interval = 1.0 / max(rate, 1)
        self._next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


def _purge_entry(actor: Actor, cutoff: datetime, count: int, dry_run: bool, **batch: object) -> AuditEntry:
    return AuditEntry(
        actor, Action.PURGED, metadata={"count": count, "cutoff": cutoff.isoformat(), "dry_run": dry_run, **batch}
    )


def _entry(
    actor: Actor, action: Action, record_id: str, sealed: SealedRecord | None, outcome: str = "OK", **metadata: object
) -> AuditEntry:
    """The audit row for an action on one dead letter (the id alone when there is no such record)."""
    if sealed is None:
        return AuditEntry(actor, action, outcome, dead_letter_ids=(record_id,), metadata=metadata)
    meta = sealed.meta
    return AuditEntry(
        actor,
        action,
        outcome,
        dead_letter_ids=(meta.id,),
        event_id=meta.event_id,
        provider=meta.provider.value,
        correlation_id=meta.correlation_id,
        metadata=metadata,
    )
