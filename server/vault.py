"""The vault: the dead-letter operations, joining validation, encryption, the store and the audit trail.

Plaintext payloads and headers exist only inside these calls and in the responses they return; they are never
logged, never placed in an error and never written to the audit trail. Each operation is one transaction that
includes its audit row: an operation whose audit row cannot be written is not acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import uuid

from server.audit import Action, Actor, AuditEntry
from server.crypto import Keyring
from server.domain import Cursor, ListFilter, NewDeadLetter, OpenedDeadLetter, Page, StoreResult
from server.errors import Aborted, DeadLetterError, IdempotencyConflict, NotFound
from server.page_token import PageTokens
from server.store import NewRecord, SealedRecord, Store, Transaction

PAYLOAD_FIELD = "payload"
HEADERS_FIELD = "headers"
# A purge can remove the record that holds a key between our failed insert and our read: try again, briefly.
_IDEMPOTENT_INSERT_ATTEMPTS = 3


class Vault:
    """Stores, opens and lists dead letters on behalf of an authenticated actor."""

    def __init__(self, store: Store, keyring: Keyring) -> None:
        self._store = store
        self._keyring = keyring
        self.page_tokens = PageTokens(keyring.derive(b"page token"))

    async def store(self, actor: Actor, letter: NewDeadLetter) -> StoreResult:
        """Encrypt and commit a dead letter, or return the record an identical earlier Store created."""
        for _ in range(_IDEMPOTENT_INSERT_ATTEMPTS):
            record = self._seal(letter)
            async with self._transaction(actor) as tx:
                if await tx.insert(record, actor) is not None:
                    return StoreResult(str(record.id), deduplicated=False)
                assert letter.idempotency_key is not None  # only a key conflict skips the insert
                existing = await tx.get_by_idempotency_key(letter.idempotency_key)
                if existing is not None:
                    result = self._replay(letter, existing)
                    await tx.audit(_entry(actor, Action.STORED, existing.meta.id, existing, deduplicated=True))
                    return result
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
            raise failure
        return opened

    async def list(self, actor: Actor, filters: ListFilter, page_token: str, page_size: int) -> Page:
        """Return one page, newest failure first, with the token for the next one."""
        after = self.page_tokens.decode(page_token, filters) if page_token else None
        async with self._transaction(actor) as tx:
            # One row more than asked tells whether another page follows, without a count.
            rows = await tx.list(filters, after, page_size + 1)
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
        )

    def _open(self, sealed: SealedRecord) -> OpenedDeadLetter:
        record_id = sealed.meta.id
        payload = self._keyring.open(sealed.payload_encrypted, record_id, PAYLOAD_FIELD)
        headers = json.loads(self._keyring.open(sealed.headers_encrypted, record_id, HEADERS_FIELD))
        return OpenedDeadLetter(sealed.meta, payload, headers)

    def _replay(self, letter: NewDeadLetter, existing: SealedRecord) -> StoreResult:
        opened = self._open(existing)
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
        )
        if not letter.same_content(earlier):
            raise IdempotencyConflict(meta.id)
        return StoreResult(meta.id, deduplicated=True)


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
