"""Every rejected request: a clear status code, a message naming the field, and no row written."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.domain import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_EVENT_ID_CHARS,
    MAX_HEADERS,
    MAX_HEADERS_BYTES,
    REQUEST_OVERHEAD_BYTES,
)
from tests.conftest import SAMPLES, channel_to, row_count, token

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

SAMPLE = SAMPLES[0]
LIMIT = 1024 * 1024  # the default DEADLETTER_MAX_PAYLOAD_BYTES the test server runs with


def _timestamp(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


INVALID_STORES: list[tuple[str, dict[str, Any], str]] = [
    ("provider unspecified", {"provider": pb.PROVIDER_UNSPECIFIED}, "provider"),
    ("provider unknown number", {"provider": 42}, "provider"),
    ("event_id empty", {"event_id": ""}, "event_id"),
    ("event_id blank", {"event_id": "   "}, "event_id"),
    ("event_id too long", {"event_id": "e" * (MAX_EVENT_ID_CHARS + 1)}, "event_id"),
    ("event_id with NUL", {"event_id": "evt\x00"}, "event_id"),
    ("correlation_id empty", {"correlation_id": ""}, "correlation_id"),
    ("error_message empty", {"error_message": ""}, "error_message"),
    ("error_message too long", {"error_message": "x" * (MAX_ERROR_MESSAGE_CHARS + 1)}, "error_message"),
    ("retry_count negative", {"retry_count": -1}, "retry_count"),
    ("received_at missing", {"received_at": None}, "received_at"),
    ("received_at out of range", {"received_at": _timestamp(253402300800)}, "received_at"),
    ("payload empty", {"payload": b""}, "payload"),
    ("payload one byte over the limit", {"payload": b"x" * (LIMIT + 1)}, "payload"),
    ("header name empty", {"headers": {"": "v"}}, "headers"),
    ("headers too large", {"headers": {"x-big": "v" * (MAX_HEADERS_BYTES + 1)}}, "headers"),
    ("too many headers", {"headers": {f"x-{i}": "v" for i in range(MAX_HEADERS + 1)}}, "headers"),
    ("idempotency_key too long", {"idempotency_key": "k" * 257}, "idempotency_key"),
]


@pytest.mark.parametrize(("case", "change", "field"), INVALID_STORES, ids=[c[0] for c in INVALID_STORES])
async def test_invalid_store_is_invalid_argument_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection, case: str, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Store(SAMPLE.store_request(**change))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert (caught.value.details() or "").startswith(field), caught.value.details()
    assert await row_count(db) == 0


async def test_payload_exactly_at_the_limit_is_accepted(stub: Stub, db: asyncpg.Connection) -> None:
    stored = await stub.Store(SAMPLE.store_request(payload=b"x" * LIMIT))
    assert (await stub.Get(pb.GetRequest(id=stored.id))).dead_letter.payload_size_bytes == LIMIT
    assert await row_count(db) == 1


async def test_largest_valid_request_is_accepted(stub: Stub, db: asyncpg.Connection) -> None:
    """Every field at its limit, in 4-byte characters where text allows: within the receive limit."""
    wide = "\U0001f600"
    headers = {f"x-{i:02d}-" + wide * 50: wide * 100 for i in range(MAX_HEADERS)}
    assert sum(len(k.encode()) + len(v.encode()) for k, v in headers.items()) <= MAX_HEADERS_BYTES
    request = SAMPLE.store_request(
        payload=b"x" * LIMIT,
        headers=headers,
        event_id=wide * MAX_EVENT_ID_CHARS,
        correlation_id=wide * 512,
        error_message=wide * MAX_ERROR_MESSAGE_CHARS,
        idempotency_key=wide * 256,
    )
    assert (await stub.Store(request)).id
    assert await row_count(db) == 1


async def test_message_over_the_receive_limit_is_resource_exhausted_and_the_server_lives_on(
    stub: Stub, db: asyncpg.Connection
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Store(SAMPLE.store_request(payload=b"x" * (LIMIT + REQUEST_OVERHEAD_BYTES + 1)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await row_count(db) == 0
    assert (await stub.Store(SAMPLE.store_request())).id


async def test_configured_payload_limit_sets_validation_and_receive_limit(
    database_url: str, encryption_key: str, db: asyncpg.Connection
) -> None:
    from tests.conftest import settings_for

    small = await app.start(settings_for(database_url, encryption_key, max_payload_bytes=1000))
    try:
        async with channel_to(small.address, token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await stub.Store(SAMPLE.store_request(payload=b"x" * 1001))
            with pytest.raises(grpc.aio.AioRpcError) as far_over:
                await stub.Store(SAMPLE.store_request(payload=b"x" * (1000 + REQUEST_OVERHEAD_BYTES + 1)))
            assert (await stub.Store(SAMPLE.store_request(payload=b"x" * 1000))).id
    finally:
        await small.stop(0)
    assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert far_over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await row_count(db) == 1


async def test_rejections_never_echo_the_payload_or_headers(stub: Stub) -> None:
    canary = "canary-9d2e-in-error"
    for change in (
        {"payload": (canary.encode() * 60_000)[: LIMIT + 1]},
        {"headers": {"x": canary * 10_000}},
        {"event_id": canary * 100},
        {"provider": pb.PROVIDER_UNSPECIFIED, "payload": canary.encode()},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Store(SAMPLE.store_request(**change))
        assert canary not in (caught.value.details() or "")
