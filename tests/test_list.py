"""List: filters, order, AIP-158 page sizes and keyset pagination over thousands of rows."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from deadletter.v1 import deadletter_pb2 as pb
from tests.conftest import SAMPLES, row_count

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _ts(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


async def _store_many(stub: Stub, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 100):
        batch = [
            stub.Store(SAMPLES[i % len(SAMPLES)].store_request(event_id=f"evt-{i}"))
            for i in range(start, min(count, start + 100))
        ]
        ids += [r.id for r in await asyncio.gather(*batch)]
    return ids


async def _spread_failed_at(db: asyncpg.Connection, ids: list[str], distinct_times: int) -> None:
    """Give rows failed_at values with many ties, so ordering must fall back to the id."""
    await db.executemany(
        "UPDATE dead_letter_queue SET failed_at = $2 WHERE id = $1::uuid",
        [(record_id, T0 + timedelta(seconds=i % distinct_times)) for i, record_id in enumerate(ids)],
    )


async def _walk(stub: Stub, request: pb.ListRequest) -> list[pb.DeadLetter]:
    seen: list[pb.DeadLetter] = []
    while True:
        response = await stub.List(request)
        seen += response.dead_letters
        if not response.next_page_token:
            return seen
        request.page_token = response.next_page_token


def _key(letter: pb.DeadLetter) -> tuple[datetime, uuid.UUID]:
    return letter.failed_at.ToDatetime(UTC), uuid.UUID(letter.id)


async def test_walking_every_page_returns_each_row_once_in_order(stub: Stub, db: asyncpg.Connection) -> None:
    ids = await _store_many(stub, 2100)
    await _spread_failed_at(db, ids, distinct_times=300)

    seen = await _walk(stub, pb.ListRequest(page_size=37))

    assert sorted(letter.id for letter in seen) == sorted(ids)
    keys = [_key(letter) for letter in seen]
    assert keys == sorted(keys, reverse=True)


async def test_walk_is_stable_while_rows_are_inserted(stub: Stub, db: asyncpg.Connection) -> None:
    ids = await _store_many(stub, 2000)
    await _spread_failed_at(db, ids, distinct_times=500)
    stop = asyncio.Event()

    async def insert_meanwhile() -> int:
        inserted = 0
        while not stop.is_set():
            await stub.Store(SAMPLES[0].store_request())
            inserted += 1
        return inserted

    writer = asyncio.create_task(insert_meanwhile())
    try:
        seen = await _walk(stub, pb.ListRequest(page_size=50))
    finally:
        stop.set()
    inserted = await writer

    seen_ids = [letter.id for letter in seen]
    assert len(seen_ids) == len(set(seen_ids)), "a row appeared twice"
    assert set(ids) <= set(seen_ids), "a row that existed before the walk was missed"
    assert inserted > 0
    assert await row_count(db) == 2000 + inserted


async def test_filters_by_provider_and_time_window(stub: Stub, db: asyncpg.Connection) -> None:
    ids = await _store_many(stub, 90)
    await _spread_failed_at(db, ids, distinct_times=90)  # row i failed at T0 + i seconds
    rows = await db.fetch("SELECT id::text, provider, failed_at FROM dead_letter_queue")
    after, before = T0 + timedelta(seconds=20), T0 + timedelta(seconds=60)

    seen = await _walk(
        stub,
        pb.ListRequest(provider=pb.PROVIDER_WHATSAPP, failed_after=_ts(after), failed_before=_ts(before), page_size=7),
    )

    expected = {r["id"] for r in rows if r["provider"] == "whatsapp" and after <= r["failed_at"] < before}
    assert expected
    assert {letter.id for letter in seen} == expected
    assert all(letter.provider == pb.PROVIDER_WHATSAPP for letter in seen)


async def test_default_and_maximum_page_sizes(stub: Stub) -> None:
    await _store_many(stub, 1001)
    assert len((await stub.List(pb.ListRequest())).dead_letters) == 50
    assert len((await stub.List(pb.ListRequest(page_size=5000))).dead_letters) == 1000
    last = await stub.List(pb.ListRequest(page_size=1001))
    assert len(last.dead_letters) == 1000
    assert last.next_page_token


async def test_last_page_has_no_token(stub: Stub) -> None:
    await _store_many(stub, 3)
    response = await stub.List(pb.ListRequest(page_size=3))
    assert len(response.dead_letters) == 3
    assert response.next_page_token == ""
    assert (await stub.List(pb.ListRequest())).next_page_token == ""


async def test_list_never_carries_payloads_or_headers(stub: Stub) -> None:
    canary = b"canary-list-4b1f"
    await stub.Store(SAMPLES[0].store_request(payload=canary, headers={"x-canary": canary.decode()}))
    response = await stub.List(pb.ListRequest())
    assert len(response.dead_letters) == 1
    assert canary not in response.SerializeToString()


def _edited(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


async def test_bad_requests_are_invalid_argument(stub: Stub, db: asyncpg.Connection) -> None:
    await _store_many(stub, 5)
    token = (await stub.List(pb.ListRequest(page_size=2))).next_page_token
    assert token
    bad_requests = {
        "negative page_size": pb.ListRequest(page_size=-1),
        "garbage token": pb.ListRequest(page_token="not-a-token"),
        "edited token": pb.ListRequest(page_size=2, page_token=_edited(token)),
        "token with a foreign character": pb.ListRequest(page_size=2, page_token=token + "!"),
        "token with a line break": pb.ListRequest(page_size=2, page_token=token[:5] + "\n" + token[5:]),
        "token of other time filters": pb.ListRequest(page_size=2, page_token=token, failed_after=_ts(T0)),
        "token of other filters": pb.ListRequest(page_size=2, page_token=token, provider=pb.PROVIDER_INSTAGRAM),
        "unknown provider": pb.ListRequest(provider=cast(Any, 99)),
        "empty window": pb.ListRequest(failed_after=_ts(T0), failed_before=_ts(T0)),
    }
    for case, request in bad_requests.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.List(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert await row_count(db) == 5
    # The genuine token still works with a different page size (AIP-158 allows that).
    assert len((await stub.List(pb.ListRequest(page_size=10, page_token=token))).dead_letters) == 3
