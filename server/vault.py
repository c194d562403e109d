"""The vault: the dead-letter operations, joining validation, encryption and the store.

Plaintext payloads and headers exist only inside these calls and in the responses they return; they are never
logged and never placed in an error.
"""

from __future__ import annotations

import json
import uuid

from server.crypto import Keyring
from server.domain import Cursor, ListFilter, NewDeadLetter, OpenedDeadLetter, Page, StoreResult
from server.errors import Aborted, IdempotencyConflict, NotFound
from server.page_token import PageTokens
from server.store import NewRecord, SealedRecord, Store

PAYLOAD_FIELD = "payload"
HEADERS_FIELD = "headers"
# A purge can remove the record that holds a key between our failed insert and our read: try again, briefly.
_IDEMPOTENT_INSERT_ATTEMPTS = 3


class Vault:
    """Stores, opens and lists dead letters."""

    def __init__(self, store: Store, keyring: Keyring) -> None:
        self._store = store
        self._keyring = keyring
        self.page_tokens = PageTokens(keyring.derive(b"page token"))

    async def store(self, letter: NewDeadLetter) -> StoreResult:
        """Encrypt and commit a dead letter, or return the record an identical earlier Store created."""
        for _ in range(_IDEMPOTENT_INSERT_ATTEMPTS):
            record = self._seal(letter)
            if await self._store.insert(record) is not None:
                return StoreResult(str(record.id), deduplicated=False)
            assert letter.idempotency_key is not None  # only a key conflict skips the insert
            existing = await self._store.get_by_idempotency_key(letter.idempotency_key)
            if existing is not None:
                return self._replay(letter, existing)
        raise Aborted("the record holding this idempotency_key changed while storing; retry")

    async def get(self, record_id: uuid.UUID) -> OpenedDeadLetter:
        """Return a dead letter with its payload and headers decrypted."""
        sealed = await self._store.get(record_id)
        if sealed is None:
            raise NotFound(str(record_id))
        return self._open(sealed)

    async def list(self, filters: ListFilter, page_token: str, page_size: int) -> Page:
        """Return one page, newest failure first, with the token for the next one."""
        after = self.page_tokens.decode(page_token, filters) if page_token else None
        # One row more than asked tells whether another page follows, without a count.
        rows = await self._store.list(filters, after, page_size + 1)
        page = rows[:page_size]
        if len(rows) <= page_size:
            return Page(page, "")
        last = page[-1]
        cursor = Cursor(last.failed_at, uuid.UUID(last.id))
        return Page(page, self.page_tokens.encode(cursor, filters))

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
