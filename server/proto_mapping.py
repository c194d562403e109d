"""The proto mapping: deadletter.v1 messages to domain values and back. No rules live here, only shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from deadletter.v1 import deadletter_pb2 as pb
from server.domain import DeadLetter, ListFilter, NewDeadLetter, OpenedDeadLetter, Page, Provider, list_filter
from server.domain import new_dead_letter as validated_new_dead_letter
from server.errors import InvalidArgument

_TO_DOMAIN = {
    pb.PROVIDER_FACEBOOK: Provider.FACEBOOK,
    pb.PROVIDER_INSTAGRAM: Provider.INSTAGRAM,
    pb.PROVIDER_WHATSAPP: Provider.WHATSAPP,
}
_TO_PROTO = {provider: number for number, provider in _TO_DOMAIN.items()}


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
    )


def list_filters(request: pb.ListRequest) -> ListFilter:
    """Decode and validate List's filters. An unknown provider number is an error, not 'every provider'."""
    provider = _TO_DOMAIN.get(request.provider)
    if provider is None and request.provider != pb.PROVIDER_UNSPECIFIED:
        raise InvalidArgument("provider", "unknown value")
    return list_filter(provider, _datetime(request, "failed_after"), _datetime(request, "failed_before"))


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
    )
    message.received_at.FromDatetime(meta.received_at)
    message.failed_at.FromDatetime(meta.failed_at)
    return message


def get_response(opened: OpenedDeadLetter) -> pb.GetResponse:
    return pb.GetResponse(dead_letter=dead_letter(opened.meta), payload=opened.payload, headers=opened.headers)


def list_response(page: Page) -> pb.ListResponse:
    return pb.ListResponse(
        dead_letters=[dead_letter(m) for m in page.dead_letters], next_page_token=page.next_page_token
    )


def _datetime(message: pb.StoreRequest | pb.ListRequest, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    timestamp: Timestamp = getattr(message, field)
    try:
        # Microseconds are what PostgreSQL keeps; finer digits are dropped here, consistently.
        return timestamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid timestamp (years 1 to 9999)") from None
