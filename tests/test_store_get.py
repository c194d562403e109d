"""Store and Get over a real gRPC channel against a real PostgreSQL: fidelity, encryption at rest, idempotency."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

import asyncpg
import grpc
import grpc.aio
import pytest

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.crypto import generate_key, key_id
from tests.conftest import SAMPLES, Sample, channel_to, row_count, settings_for, token

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

WHATSAPP = next(s for s in SAMPLES if s.file == "whatsapp-text-message.json")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.file)
async def test_every_sample_round_trips_byte_for_byte(stub: Stub, sample: Sample) -> None:
    request = sample.store_request()
    stored = await stub.Store(request)
    got = await stub.Get(pb.GetRequest(id=stored.id))

    assert got.payload == sample.body
    assert dict(got.headers) == sample.headers
    letter = got.dead_letter
    assert letter.id == stored.id
    assert (letter.event_id, letter.provider, letter.correlation_id) == (
        request.event_id,
        request.provider,
        request.correlation_id,
    )
    assert (letter.error_message, letter.retry_count) == (request.error_message, request.retry_count)
    assert letter.received_at == request.received_at
    assert letter.payload_size_bytes == len(sample.body)
    assert letter.HasField("failed_at")
    assert not stored.deduplicated


async def test_ids_above_2_pow_53_survive(stub: Stub) -> None:
    sample = next(s for s in SAMPLES if s.file == "messenger-bigint-ids.json")
    stored = await stub.Store(sample.store_request())
    got = await stub.Get(pb.GetRequest(id=stored.id))
    assert b"9007199254740993" in got.payload  # 2^53 + 1: a double would have made it ...992


async def test_raw_row_holds_no_plaintext(stub: Stub, db: asyncpg.Connection) -> None:
    canary = "canary-7f3b9c1e-payload"
    header_canary = "canary-header-51d0"
    body = WHATSAPP.body.replace(b"Dr. Rivera", canary.encode())
    assert canary.encode() in body
    stored = await stub.Store(WHATSAPP.store_request(payload=body, headers={"x-canary": header_canary}))

    row = await db.fetchrow("SELECT * FROM dead_letter_queue WHERE id = $1::uuid", stored.id)
    assert row is not None
    everything = " ".join(str(value) for value in row.values())
    assert canary not in everything
    assert header_canary not in everything
    assert "x-canary" not in everything
    assert row["payload_encrypted"].startswith("v1.")


async def test_tampered_ciphertext_is_data_loss(stub: Stub, db: asyncpg.Connection) -> None:
    stored = await stub.Store(WHATSAPP.store_request())
    sealed: str = await db.fetchval("SELECT payload_encrypted FROM dead_letter_queue WHERE id = $1::uuid", stored.id)
    position = len(sealed) - 10
    flipped = sealed[:position] + ("A" if sealed[position] != "A" else "B") + sealed[position + 1 :]
    await db.execute("UPDATE dead_letter_queue SET payload_encrypted = $2 WHERE id = $1::uuid", stored.id, flipped)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(id=stored.id))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert stored.id in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("column", "keep"),
    [("headers_encrypted", 0), ("headers_encrypted", 20), ("payload_encrypted", 40), ("payload_encrypted", -8)],
    ids=["empty", "prefix-only", "shorter-than-nonce-and-tag", "tag-cut"],
)
async def test_truncated_ciphertext_is_data_loss(stub: Stub, db: asyncpg.Connection, column: str, keep: int) -> None:
    stored = await stub.Store(WHATSAPP.store_request())
    # -8 cuts 8 base64 characters (6 bytes) off the tag: still well-formed base64, long enough, fails InvalidTag.
    await db.execute(
        f"UPDATE dead_letter_queue SET {column} = left({column}, $2) WHERE id = $1::uuid",
        stored.id,
        keep,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(id=stored.id))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS


async def test_swapped_ciphertexts_are_data_loss(stub: Stub, db: asyncpg.Connection) -> None:
    first = await stub.Store(SAMPLES[0].store_request())
    second = await stub.Store(SAMPLES[1].store_request())
    await db.execute(
        """
        UPDATE dead_letter_queue AS t SET payload_encrypted = o.payload_encrypted
        FROM dead_letter_queue AS o
        WHERE (t.id, o.id) IN (($1::uuid, $2::uuid), ($2::uuid, $1::uuid))
        """,
        first.id,
        second.id,
    )
    for stored in (first, second):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(id=stored.id))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert stored.id in (caught.value.details() or "")
        assert "Rivera" not in (caught.value.details() or "")


async def test_payload_and_headers_ciphertexts_cannot_trade_places(stub: Stub, db: asyncpg.Connection) -> None:
    stored = await stub.Store(WHATSAPP.store_request())
    await db.execute(
        "UPDATE dead_letter_queue SET payload_encrypted = headers_encrypted, headers_encrypted = payload_encrypted"
        " WHERE id = $1::uuid",
        stored.id,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(id=stored.id))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS


async def _serve(database_url: str, keys: str) -> app.Application:
    return await app.start(settings_for(database_url, keys))


async def test_keyring_reads_records_written_under_old_and_new_keys(database_url: str, db: asyncpg.Connection) -> None:
    old, new = generate_key(), generate_key()
    before = await _serve(database_url, old)
    try:
        async with channel_to(before.address, token()) as channel:
            old_id = (await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLES[0].store_request())).id
    finally:
        await before.stop(0)

    rotated = await _serve(database_url, f"{new},{old}")
    try:
        async with channel_to(rotated.address, token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            new_id = (await stub.Store(SAMPLES[1].store_request())).id
            assert (await stub.Get(pb.GetRequest(id=old_id))).payload == SAMPLES[0].body
            assert (await stub.Get(pb.GetRequest(id=new_id))).payload == SAMPLES[1].body
    finally:
        await rotated.stop(0)

    rows = await db.fetch("SELECT id::text, payload_encrypted, headers_encrypted FROM dead_letter_queue")
    kids = {row["id"]: row["payload_encrypted"].split(".")[1] for row in rows}
    assert kids[old_id] == key_id(base64.b64decode(old))
    assert kids[new_id] == key_id(base64.b64decode(new))


async def test_record_under_a_key_no_longer_configured_names_the_key(database_url: str) -> None:
    old = generate_key()
    first = await _serve(database_url, old)
    try:
        async with channel_to(first.address, token()) as channel:
            stored_id = (await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLES[0].store_request())).id
    finally:
        await first.stop(0)

    second = await _serve(database_url, generate_key())
    try:
        async with channel_to(second.address, token()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.DeadLetterServiceStub(channel).Get(pb.GetRequest(id=stored_id))
    finally:
        await second.stop(0)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert stored_id in details
    assert old not in details


async def test_same_idempotency_key_and_content_returns_the_first_id(stub: Stub, db: asyncpg.Connection) -> None:
    request = WHATSAPP.store_request(idempotency_key="worker-7:wamid.1")
    first = await stub.Store(request)
    again = await stub.Store(request)
    assert again.id == first.id
    assert (first.deduplicated, again.deduplicated) == (False, True)
    assert await row_count(db) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"error_message": "a different error"},
        {"retry_count": 4},
        {"correlation_id": "another-correlation"},
        {"event_id": "another-event"},
        {"headers": {"content-type": "text/plain"}},
        {"payload": b'{"other":"body"}'},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_same_idempotency_key_with_different_content_is_already_exists(
    stub: Stub, db: asyncpg.Connection, change: dict[str, object]
) -> None:
    request = WHATSAPP.store_request(idempotency_key="worker-7:wamid.2")
    first = await stub.Store(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Store(WHATSAPP.store_request(idempotency_key="worker-7:wamid.2", **change))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in (caught.value.details() or "")
    assert await row_count(db) == 1


async def test_without_a_key_every_store_creates_a_record(stub: Stub, db: asyncpg.Connection) -> None:
    request = WHATSAPP.store_request()
    ids = {(await stub.Store(request)).id for _ in range(3)}
    assert len(ids) == 3
    assert await row_count(db) == 3


async def test_twenty_concurrent_stores_with_one_key_create_one_record(stub: Stub, db: asyncpg.Connection) -> None:
    request = WHATSAPP.store_request(idempotency_key="burst-key")
    responses = await asyncio.gather(*[stub.Store(request) for _ in range(20)])
    assert len({r.id for r in responses}) == 1
    assert sum(not r.deduplicated for r in responses) == 1
    assert await row_count(db) == 1


async def test_get_of_unknown_id_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(id="3f2504e0-4f89-41d3-9a0c-0305e82c3301"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad_id", ["", "42", "not-a-uuid", "3f2504e0-4f89-41d3-9a0c-0305e82c330Z", "x" * 36])
async def test_get_of_malformed_id_is_invalid_argument(stub: Stub, bad_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Get(pb.GetRequest(id=bad_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in (caught.value.details() or "")


async def test_get_accepts_an_uppercase_id(stub: Stub) -> None:
    stored = await stub.Store(WHATSAPP.store_request())
    got = await stub.Get(pb.GetRequest(id=stored.id.upper()))
    assert got.dead_letter.id == stored.id
