"""The proto mapping: deadletter.v1 messages to domain values and back. No rules live here, only shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from deadletter.v1 import deadletter_pb2 as pb
from server.domain import (
    DeadLetter,
    FailureKind,
    ListFilter,
    NewDeadLetter,
    OpenedDeadLetter,
    Page,
    Provider,
    Status,
    list_filter,
)
from server.domain import new_dead_letter as validated_new_dead_letter
from server.errors import InvalidArgument
from server.vault import QueuedWebhook, RedriveRequest, RedriveResult, ReprocessResult

_TO_DOMAIN = {
    pb.PROVIDER_FACEBOOK: Provider.FACEBOOK,
    pb.PROVIDER_INSTAGRAM: Provider.INSTAGRAM,
    pb.PROVIDER_WHATSAPP: Provider.WHATSAPP,
}
_TO_PROTO = {provider: number for number, provider in _TO_DOMAIN.items()}
_KIND_TO_DOMAIN = {
    pb.FAILURE_KIND_RETRYABLE: FailureKind.RETRYABLE,
    pb.FAILURE_KIND_SIGNATURE_INVALID: FailureKind.SIGNATURE_INVALID,
    pb.FAILURE_KIND_MALFORMED_PAYLOAD: FailureKind.MALFORMED_PAYLOAD,
    pb.FAILURE_KIND_PERMANENT: FailureKind.PERMANENT,
}
_KIND_TO_PROTO = {kind: number for number, kind in _KIND_TO_DOMAIN.items()}
_STATUS_TO_DOMAIN = {pb.STATUS_PENDING: Status.PENDING, pb.STATUS_REPROCESSED: Status.REPROCESSED}
_STATUS_TO_PROTO = {status: number for number, status in _STATUS_TO_DOMAIN.items()}


def new_dead_letter(request: pb.StoreRequest, max_payload_bytes: int) -> NewDeadLetter:
    """Decode and validate a Store request."""
    return validated_new_dead_letter(
        event_id=request.event_id,
        provider=_TO_DOMAIN.get(request.provider),
        payload=request.payload,
        headers=dict(request.headers),
        error_message=request.error_message,
        retry_count=request.retry_count,
        correlation_id=request.correlation_id,
        received_at=_datetime(request, "received_at"),
        idempotency_key=request.idempotency_key,
        max_payload_bytes=max_payload_bytes,
        failure_kind=_failure_kind(request.failure_kind) or FailureKind.RETRYABLE,
    )


def list_filters(request: pb.ListRequest | pb.RedriveRequest) -> ListFilter:
    """Decode and validate List's or Redrive's filters. Unknown enum numbers are errors, not 'every value'."""
    provider = _TO_DOMAIN.get(request.provider)
    if provider is None and request.provider != pb.PROVIDER_UNSPECIFIED:
        raise InvalidArgument("provider", "unknown value")
    status: Status | None = None
    if isinstance(request, pb.ListRequest):
        status = _STATUS_TO_DOMAIN.get(request.status)
        if status is None and request.status != pb.STATUS_UNSPECIFIED:
            raise InvalidArgument("status", "unknown value")
    return list_filter(
        provider,
        _datetime(request, "failed_after"),
        _datetime(request, "failed_before"),
        _failure_kind(request.failure_kind),
        status,
    )


def redrive_request(request: pb.RedriveRequest) -> RedriveRequest:
    if request.max_per_second < 0:
        raise InvalidArgument("max_per_second", "must not be negative")
    if request.limit < 0:
        raise InvalidArgument("limit", "must not be negative")
    return RedriveRequest(list_filters(request), request.dry_run, request.max_per_second, request.limit)


def purge_cutoff(request: pb.PurgeRequest, now: datetime, retention_days: int, min_age_days: int) -> datetime:
    """The cut-off a Purge asks for (the retention period when it names none), refused if too recent."""
    which = request.WhichOneof("cutoff")
    if which == "before":
        cutoff = _datetime(request, "before")
        assert cutoff is not None
    elif which == "older_than":
        if request.older_than.seconds < 0 or request.older_than.nanos < 0:
            raise InvalidArgument("older_than", "must not be negative")
        cutoff = now - request.older_than.ToTimedelta()
    else:
        cutoff = now - timedelta(days=retention_days)
    if cutoff > now - timedelta(days=min_age_days):
        raise InvalidArgument(which or "cutoff", f"must be at least {min_age_days} day(s) ago")
    return cutoff


def reprocess_response(result: ReprocessResult) -> pb.ReprocessResponse:
    return pb.ReprocessResponse(dead_letter=dead_letter(result.dead_letter), queue_message_id=result.queue_message_id)


def redrive_response(result: RedriveResult) -> pb.RedriveResponse:
    return pb.RedriveResponse(
        sent=result.sent, skipped=result.skipped, dry_run=result.dry_run, truncated=result.truncated
    )


def claim_response(webhook: QueuedWebhook | None) -> pb.ClaimQueuedResponse:
    if webhook is None:
        return pb.ClaimQueuedResponse()
    row = webhook.row
    return pb.ClaimQueuedResponse(
        webhook=pb.QueuedWebhook(
            message_id=str(row.id),
            dead_letter_id=str(row.dead_letter_id),
            provider=_TO_PROTO[row.provider],
            event_id=row.event_id,
            correlation_id=row.correlation_id,
            payload=webhook.payload,
            headers=webhook.headers,
            attempt=row.attempt,
        )
    )


def _failure_kind(number: int) -> FailureKind | None:
    kind: FailureKind | None = _KIND_TO_DOMAIN.get(number)  # type: ignore[call-overload]
    if kind is None and number != pb.FAILURE_KIND_UNSPECIFIED:
        raise InvalidArgument("failure_kind", "unknown value")
    return kind


def dead_letter(meta: DeadLetter) -> pb.DeadLetter:
    message = pb.DeadLetter(
        id=meta.id,
        event_id=meta.event_id,
        provider=_TO_PROTO[meta.provider],
        correlation_id=meta.correlation_id,
        error_message=meta.error_message,
        retry_count=meta.retry_count,
        payload_size_bytes=meta.payload_size_bytes,
        idempotency_key=meta.idempotency_key or "",
        failure_kind=_KIND_TO_PROTO[meta.failure_kind],
        status=_STATUS_TO_PROTO[meta.status],
        reprocessed_by=meta.reprocessed_by or "",
        reprocess_count=meta.reprocess_count,
    )
    message.received_at.FromDatetime(meta.received_at)
    message.failed_at.FromDatetime(meta.failed_at)
    if meta.reprocessed_at is not None:
        message.reprocessed_at.FromDatetime(meta.reprocessed_at)
    return message


def get_response(opened: OpenedDeadLetter) -> pb.GetResponse:
    return pb.GetResponse(dead_letter=dead_letter(opened.meta), payload=opened.payload, headers=opened.headers)


def list_response(page: Page) -> pb.ListResponse:
    return pb.ListResponse(
        dead_letters=[dead_letter(m) for m in page.dead_letters], next_page_token=page.next_page_token
    )


def _datetime(
    message: pb.StoreRequest | pb.ListRequest | pb.RedriveRequest | pb.PurgeRequest, field: str
) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    timestamp: Timestamp = getattr(message, field)
    try:
        # Microseconds are what PostgreSQL keeps; finer digits are dropped here, consistently.
        return timestamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid timestamp (years 1 to 9999)") from None
