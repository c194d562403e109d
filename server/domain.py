"""What a dead letter is and the rules its fields follow, independent of gRPC and PostgreSQL.

Validation lives here, once, for every entry point. Messages name the field and the rule, never the value:
a rejected value may be PHI.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from server.errors import InvalidArgument

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

MAX_EVENT_ID_CHARS = 512
MAX_CORRELATION_ID_CHARS = 512
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_ERROR_MESSAGE_CHARS = 16_384
MAX_HEADERS_BYTES = 64 * 1024
MAX_HEADERS = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Room in a gRPC message for everything but the payload, within the limits above: text fields at 4 UTF-8 bytes
# a character, headers with their map-entry framing, and a margin for the fixed fields.
REQUEST_OVERHEAD_BYTES = (
    4 * (MAX_EVENT_ID_CHARS + MAX_CORRELATION_ID_CHARS + MAX_IDEMPOTENCY_KEY_CHARS + MAX_ERROR_MESSAGE_CHARS)
    + MAX_HEADERS_BYTES
    + 16 * MAX_HEADERS
    + 4096
)


class Provider(enum.StrEnum):
    """The platforms whose webhooks are kept; the values are what the database stores."""

    FACEBOOK = "facebook"
    INSTAGRAM = "instagram"
    WHATSAPP = "whatsapp"


class FailureKind(enum.StrEnum):
    """How the worker classified the failure; only RETRYABLE goes back for processing without force."""

    RETRYABLE = "retryable"
    SIGNATURE_INVALID = "signature_invalid"
    MALFORMED_PAYLOAD = "malformed_payload"
    PERMANENT = "permanent"


class Status(enum.StrEnum):
    PENDING = "pending"
    REPROCESSED = "reprocessed"


@dataclass(frozen=True)
class NewDeadLetter:
    """A validated Store request."""

    event_id: str
    provider: Provider
    payload: bytes
    headers: dict[str, str]
    error_message: str
    retry_count: int
    correlation_id: str
    received_at: datetime
    idempotency_key: str | None
    failure_kind: FailureKind = FailureKind.RETRYABLE

    def same_content(self, other: NewDeadLetter) -> bool:
        """Whether other is a retry of this Store (idempotency key aside)."""
        return (
            self.event_id == other.event_id
            and self.provider == other.provider
            and self.payload == other.payload
            and self.headers == other.headers
            and self.error_message == other.error_message
            and self.retry_count == other.retry_count
            and self.correlation_id == other.correlation_id
            and self.received_at == other.received_at
            and self.failure_kind == other.failure_kind
        )


@dataclass(frozen=True)
class DeadLetter:
    """A stored dead letter's metadata: everything but the payload and headers."""

    id: str
    event_id: str
    provider: Provider
    correlation_id: str
    error_message: str
    retry_count: int
    received_at: datetime
    failed_at: datetime
    payload_size_bytes: int
    idempotency_key: str | None
    failure_kind: FailureKind = FailureKind.RETRYABLE
    status: Status = Status.PENDING
    reprocessed_at: datetime | None = None
    reprocessed_by: str | None = None
    reprocess_count: int = 0


@dataclass(frozen=True)
class OpenedDeadLetter:
    """A dead letter with its decrypted payload and headers, as Get returns it."""

    meta: DeadLetter
    payload: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class StoreResult:
    id: str
    deduplicated: bool


@dataclass(frozen=True)
class Cursor:
    """The keyset position after the last row of a page."""

    failed_at: datetime
    id: uuid.UUID


@dataclass(frozen=True)
class ListFilter:
    provider: Provider | None
    failed_after: datetime | None
    failed_before: datetime | None
    failure_kind: FailureKind | None = None
    status: Status | None = None


@dataclass(frozen=True)
class Page:
    dead_letters: list[DeadLetter]
    next_page_token: str  # empty on the last page


def new_dead_letter(
    *,
    event_id: str,
    provider: Provider | None,
    payload: bytes,
    headers: dict[str, str],
    error_message: str,
    retry_count: int,
    correlation_id: str,
    received_at: datetime | None,
    idempotency_key: str,
    max_payload_bytes: int,
    failure_kind: FailureKind = FailureKind.RETRYABLE,
) -> NewDeadLetter:
    """Validate a Store request's fields and return them as a NewDeadLetter."""
    if provider is None:
        raise InvalidArgument("provider", "required; one of PROVIDER_FACEBOOK, PROVIDER_INSTAGRAM, PROVIDER_WHATSAPP")
    if received_at is None:
        raise InvalidArgument("received_at", "required")
    if retry_count < 0:
        raise InvalidArgument("retry_count", "must be zero or more")
    _check_payload(payload, max_payload_bytes)
    _check_headers(headers)
    _check_text("event_id", event_id, MAX_EVENT_ID_CHARS)
    _check_text("correlation_id", correlation_id, MAX_CORRELATION_ID_CHARS)
    _check_text("error_message", error_message, MAX_ERROR_MESSAGE_CHARS)
    if idempotency_key:
        _check_text("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_CHARS)
    return NewDeadLetter(
        event_id=event_id,
        provider=provider,
        payload=payload,
        headers=dict(headers),
        error_message=error_message,
        retry_count=retry_count,
        correlation_id=correlation_id,
        received_at=received_at,
        idempotency_key=idempotency_key or None,
        failure_kind=failure_kind,
    )


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    """Parse a dead letter id: a UUID in its canonical 36-character form, either case."""
    if not _UUID.fullmatch(value):
        raise InvalidArgument(field, "must be a UUID such as 3f2504e0-4f89-41d3-9a0c-0305e82c3301")
    return uuid.UUID(value)


def page_size(requested: int) -> int:
    """Apply AIP-158: 0 means the default, too large is capped, negative is an error."""
    if requested < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def list_filter(
    provider: Provider | None,
    failed_after: datetime | None,
    failed_before: datetime | None,
    failure_kind: FailureKind | None = None,
    status: Status | None = None,
) -> ListFilter:
    """Validate List's (and Redrive's) filters."""
    if failed_after is not None and failed_before is not None and failed_after >= failed_before:
        raise InvalidArgument("failed_before", "must be later than failed_after")
    return ListFilter(provider, failed_after, failed_before, failure_kind, status)


def _check_payload(payload: bytes, max_bytes: int) -> None:
    if not payload:
        raise InvalidArgument("payload", "required; the raw webhook body")
    if len(payload) > max_bytes:
        raise InvalidArgument("payload", f"is {len(payload)} bytes; the limit is {max_bytes}")


def _check_headers(headers: dict[str, str]) -> None:
    if len(headers) > MAX_HEADERS:
        raise InvalidArgument("headers", f"hold {len(headers)} entries; the limit is {MAX_HEADERS}")
    total = 0
    for name, value in headers.items():
        if not name.strip():
            raise InvalidArgument("headers", "a header name is empty")
        total += len(name.encode()) + len(value.encode())
    if total > MAX_HEADERS_BYTES:
        raise InvalidArgument("headers", f"hold {total} bytes; the limit is {MAX_HEADERS_BYTES}")


def _check_text(field: str, value: str, max_chars: int) -> None:
    if not value.strip():
        raise InvalidArgument(field, "required; must not be empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {max_chars}")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refusing here beats an INTERNAL error from the driver.
        raise InvalidArgument(field, "must not contain NUL characters")
