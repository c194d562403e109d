"""Domain errors: one base class, each carrying the data its message needs and the status it maps to.

Messages are built only from ids, field names and limits. They must never include payloads, headers, keys or
tokens: they travel to the caller, into logs and into audit rows. ``code`` names the gRPC status code;
server/status.py is the one place that turns it into a gRPC status.
"""

from __future__ import annotations

from typing import ClassVar


class DeadLetterError(Exception):
    """Base of every error the service reports to callers on purpose."""

    code: ClassVar[str] = "INTERNAL"
    # Set once an audit row records this failure, so an outer layer does not record it twice.
    audited: bool = False

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(DeadLetterError):
    """A request field is missing or malformed."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(DeadLetterError):
    """No dead letter has this id."""

    code = "NOT_FOUND"

    def __init__(self, record_id: str, what: str = "dead letter") -> None:
        super().__init__(f"{what} {record_id} not found")
        self.record_id = record_id


class IdempotencyConflict(DeadLetterError):
    """The idempotency key was already used for a Store with different content."""

    code = "ALREADY_EXISTS"

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"idempotency_key was already used by dead letter {existing_id} with different content")
        self.existing_id = existing_id


class RecordCorrupted(DeadLetterError):
    """A stored ciphertext failed authentication: altered, truncated, or copied from another record."""

    code = "DATA_LOSS"

    def __init__(self, record_id: str) -> None:
        super().__init__(
            f"dead letter {record_id} failed its integrity check: the stored ciphertext was altered "
            "or does not belong to this record"
        )
        self.record_id = record_id


class KeyUnavailable(DeadLetterError):
    """A record names an encryption key that is not in the configured keyring."""

    code = "INTERNAL"

    def __init__(self, record_id: str, key_id: str) -> None:
        super().__init__(
            f"dead letter {record_id} is encrypted with key {key_id}, which is not in the configured keyring"
        )
        self.record_id = record_id
        self.key_id = key_id


class FailedPrecondition(DeadLetterError):
    """The request is well-formed but the dead letter is not in a state that allows it."""

    code = "FAILED_PRECONDITION"


class Aborted(DeadLetterError):
    """A concurrent change got in the way; the caller may retry the same request."""

    code = "ABORTED"


class Unauthenticated(DeadLetterError):
    """No bearer token, or one that fails verification."""

    code = "UNAUTHENTICATED"


class PermissionDenied(DeadLetterError):
    """A valid token whose role may not call this method."""

    code = "PERMISSION_DENIED"


class DatabaseUnavailable(DeadLetterError):
    """The database could not be reached, gave no connection in time, or dropped it mid-request."""

    code = "UNAVAILABLE"

    def __init__(self) -> None:
        # A connection lost around COMMIT leaves the outcome unknown: say so, and point at the safe retry.
        super().__init__(
            "the database is unavailable; the request may not have completed: retry (Store with the same "
            "idempotency_key)"
        )
