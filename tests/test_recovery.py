"""Reprocess, the webhook_queue outbox (ClaimQueued, AcknowledgeQueued), Redrive and Purge.

Real server, real gRPC, real PostgreSQL: every test checks the status codes and what the database holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from deadletter.v1 import deadletter_pb2 as pb
from tests.conftest import (
    PROVIDERS,
    SAMPLES,
    Sample,
    eventually,
    row_count,
    serving,
)

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

WHATSAPP = next(s for s in SAMPLES if s.file == "whatsapp-text-message.json")
SIGNED = [s for s in SAMPLES if s.signature_valid]
TAMPERED = next(s for s in SAMPLES if not s.signature_valid)
APP_SECRETS = "some-old-secret-xxxxxxxxxxxxxxxxxxxx,sample-app-secret-not-real-0123456789"
UNKNOWN_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
SUBJECT = "test-worker"  # the subject of conftest's default token
NOT_RETRYABLE = [pb.FAILURE_KIND_SIGNATURE_INVALID, pb.FAILURE_KIND_MALFORMED_PAYLOAD, pb.FAILURE_KIND_PERMANENT]
RETRYABLE = (pb.FAILURE_KIND_UNSPECIFIED, pb.FAILURE_KIND_RETRYABLE)
# The kinds the redrive tests store, in turn: half retryable (one of them by default), half not.
MIXED_KINDS = [
    pb.FAILURE_KIND_RETRYABLE,
    pb.FAILURE_KIND_UNSPECIFIED,
    pb.FAILURE_KIND_PERMANENT,
    pb.FAILURE_KIND_RETRYABLE,
    pb.FAILURE_KIND_SIGNATURE_INVALID,
    pb.FAILURE_KIND_MALFORMED_PAYLOAD,
]


# --- helpers -----------------------------------------------------------------------------------------------------


async def _store(stub: Stub, sample: Sample = WHATSAPP, **overrides: Any) -> str:
    return (await stub.Store(sample.store_request(**overrides), timeout=10)).id


async def _store_many(stub: Stub, count: int, **overrides: Any) -> list[str]:
    return [await _store(stub, SIGNED[i % len(SIGNED)], **overrides) for i in range(count)]


async def _error(call: Awaitable[object]) -> grpc.StatusCode:
    """The status code a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def _reprocess(stub: Stub, record_id: str, force: bool = False) -> pb.ReprocessResponse:
    return await stub.Reprocess(pb.ReprocessRequest(id=record_id, force=force), timeout=10)


async def _age(db: asyncpg.Connection, ids: list[str], days: int) -> None:
    """Pretend the dead letters failed that many days ago."""
    await db.execute(
        "UPDATE dead_letter_queue SET failed_at = now() - make_interval(days => $2) WHERE id = ANY($1::uuid[])",
        ids,
        days,
    )


async def _queue(db: asyncpg.Connection, dead_letter_id: str | None = None) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM webhook_queue WHERE $1::uuid IS NULL OR dead_letter_id = $1::uuid ORDER BY attempt",
        dead_letter_id,
    )


async def _audits(db: asyncpg.Connection, action: str, dead_letter_id: str | None = None) -> list[dict[str, Any]]:
    """The audit rows of one action (for one dead letter), oldest first, with metadata decoded."""
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE action = $1 AND ($2::uuid IS NULL OR $2::uuid = ANY(dead_letter_ids))"
        " ORDER BY id",
        action,
        dead_letter_id,
    )
    return [dict(row) | {"metadata": json.loads(row["metadata"])} for row in rows]


async def _dead_letter(db: asyncpg.Connection, record_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM dead_letter_queue WHERE id = $1::uuid", record_id)
    assert row is not None
    return row


async def _claimed_dead_letter(stub: Stub) -> str | None:
    """ClaimQueued's dead letter id, or None when the call fails."""
    try:
        return (await stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10)).webhook.dead_letter_id
    except grpc.aio.AioRpcError:
        return None


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


@pytest.fixture
async def signing_stub(database_url: str, encryption_key: str) -> AsyncIterator[Stub]:
    """A server that checks x-hub-signature-256 against two app secrets (an old one and the samples' one)."""
    async with serving(database_url, encryption_key, meta_app_secrets=APP_SECRETS) as stub:
        yield stub


# --- Reprocess ---------------------------------------------------------------------------------------------------


async def test_reprocess_queues_the_dead_letter_and_marks_it(stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(stub)
    response = await _reprocess(stub, record_id)

    letter = response.dead_letter
    assert (letter.id, letter.status, letter.reprocess_count) == (record_id, pb.STATUS_REPROCESSED, 1)
    assert letter.reprocessed_by == SUBJECT
    assert letter.HasField("reprocessed_at")
    got = await stub.Get(pb.GetRequest(id=record_id), timeout=10)
    assert (got.dead_letter.status, got.dead_letter.reprocess_count) == (pb.STATUS_REPROCESSED, 1)

    row = await _dead_letter(db, record_id)  # kept, not moved
    assert (row["status"], row["reprocess_count"], row["reprocessed_by"]) == ("reprocessed", 1, SUBJECT)
    [queued] = await _queue(db)
    assert (str(queued["id"]), str(queued["dead_letter_id"]), queued["attempt"]) == (
        response.queue_message_id,
        record_id,
        1,
    )
    assert queued["payload_encrypted"] == row["payload_encrypted"]
    assert queued["headers_encrypted"] == row["headers_encrypted"]
    assert (queued["event_id"], queued["correlation_id"]) == (row["event_id"], row["correlation_id"])
    [audit] = await _audits(db, "reprocessed")
    assert (audit["outcome"], audit["actor"], [str(i) for i in audit["dead_letter_ids"]]) == (
        "OK",
        SUBJECT,
        [record_id],
    )
    assert audit["metadata"]["forced"] is False


async def test_a_second_reprocess_needs_force(stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(stub)
    await _reprocess(stub, record_id)

    assert await _error(_reprocess(stub, record_id)) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(await _queue(db)) == 1
    assert [a["outcome"] for a in await _audits(db, "reprocessed")] == ["OK", "FAILED_PRECONDITION"]

    forced = await _reprocess(stub, record_id, force=True)
    assert forced.dead_letter.reprocess_count == 2
    assert [q["attempt"] for q in await _queue(db, record_id)] == [1, 2]
    audits = await _audits(db, "reprocessed")
    assert (audits[-1]["outcome"], audits[-1]["metadata"]["forced"]) == ("OK", True)


@pytest.mark.parametrize("kind", NOT_RETRYABLE, ids=lambda k: pb.FailureKind.Name(k))
async def test_a_non_retryable_kind_needs_force(stub: Stub, db: asyncpg.Connection, kind: int) -> None:
    record_id = await _store(stub, failure_kind=kind)

    assert await _error(_reprocess(stub, record_id)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await _queue(db) == []
    assert (await _dead_letter(db, record_id))["status"] == "pending"

    forced = await _reprocess(stub, record_id, force=True)
    assert (forced.dead_letter.status, forced.dead_letter.failure_kind) == (pb.STATUS_REPROCESSED, kind)
    assert len(await _queue(db, record_id)) == 1
    assert [(a["outcome"], a["metadata"]["forced"]) for a in await _audits(db, "reprocessed")] == [
        ("FAILED_PRECONDITION", False),
        ("OK", True),
    ]


@pytest.mark.parametrize(
    ("record_id", "code"),
    [
        (UNKNOWN_ID, grpc.StatusCode.NOT_FOUND),
        ("not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["unknown", "malformed", "empty"],
)
async def test_reprocess_of_a_missing_or_malformed_id(
    stub: Stub, db: asyncpg.Connection, record_id: str, code: grpc.StatusCode
) -> None:
    await _store(stub)
    assert await _error(_reprocess(stub, record_id, force=True)) == code
    assert await _queue(db) == []
    assert (await db.fetchval("SELECT status FROM dead_letter_queue")) == "pending"


async def test_ten_concurrent_reprocess_calls_send_it_once(stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(stub)
    results = await asyncio.gather(*[_reprocess(stub, record_id) for _ in range(10)], return_exceptions=True)

    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results]
    assert sum(isinstance(c, pb.ReprocessResponse) for c in codes) == 1
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 9
    assert len(await _queue(db)) == 1
    assert (await _dead_letter(db, record_id))["reprocess_count"] == 1


async def test_signatures_are_checked_against_every_app_secret(signing_stub: Stub, db: asyncpg.Connection) -> None:
    ids = {sample.file: await _store(signing_stub, sample) for sample in SAMPLES}

    for sample in SIGNED:
        await _reprocess(signing_stub, ids[sample.file])
    tampered = ids[TAMPERED.file]
    for force in (False, True):
        assert await _error(_reprocess(signing_stub, tampered, force)) == grpc.StatusCode.FAILED_PRECONDITION

    assert {str(q["dead_letter_id"]) for q in await _queue(db)} == {ids[s.file] for s in SIGNED}
    assert (await _dead_letter(db, tampered))["status"] == "pending"
    assert [a["outcome"] for a in await _audits(db, "reprocessed", tampered)] == ["FAILED_PRECONDITION"] * 2


async def test_a_webhook_without_its_signature_header_is_refused(signing_stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(signing_stub, headers={"content-type": "application/json"})
    assert await _error(_reprocess(signing_stub, record_id, force=True)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await _queue(db) == []


async def test_a_corrupted_dead_letter_is_not_sent_back(stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(stub)
    await db.execute("UPDATE dead_letter_queue SET payload_encrypted = headers_encrypted")

    assert await _error(_reprocess(stub, record_id, force=True)) == grpc.StatusCode.DATA_LOSS
    assert await _queue(db) == []
    assert (await _dead_letter(db, record_id))["status"] == "pending"
    assert [a["outcome"] for a in await _audits(db, "reprocessed")] == ["DATA_LOSS"]


async def test_reprocess_is_atomic_when_the_outbox_insert_fails(stub: Stub, db: asyncpg.Connection) -> None:
    record_id = await _store(stub)
    await db.execute("REVOKE INSERT ON webhook_queue FROM deadletter_service")

    assert await _error(_reprocess(stub, record_id)) != grpc.StatusCode.OK
    row = await _dead_letter(db, record_id)
    assert (row["status"], row["reprocess_count"], row["reprocessed_at"]) == ("pending", 0, None)
    assert await _queue(db) == []
    assert [a for a in await _audits(db, "reprocessed") if a["outcome"] == "OK"] == []


# --- ClaimQueued / AcknowledgeQueued -----------------------------------------------------------------------------


async def test_claim_returns_the_webhook_decrypted_and_acknowledge_removes_it(
    stub: Stub, db: asyncpg.Connection
) -> None:
    record_id = await _store(stub)
    sent = await _reprocess(stub, record_id)

    claimed = (await stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10)).webhook
    assert claimed.payload == WHATSAPP.body
    assert dict(claimed.headers) == WHATSAPP.headers
    assert (claimed.message_id, claimed.dead_letter_id, claimed.attempt) == (sent.queue_message_id, record_id, 1)
    assert (claimed.provider, claimed.event_id) == (pb.PROVIDER_WHATSAPP, f"evt-{WHATSAPP.file}")
    assert not (await stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10)).HasField("webhook")

    await stub.AcknowledgeQueued(pb.AcknowledgeQueuedRequest(message_id=claimed.message_id), timeout=10)
    assert await _queue(db) == []
    again = stub.AcknowledgeQueued(pb.AcknowledgeQueuedRequest(message_id=claimed.message_id), timeout=10)
    assert await _error(again) == grpc.StatusCode.NOT_FOUND


async def test_an_empty_queue_offers_nothing(stub: Stub) -> None:
    assert not (await stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10)).HasField("webhook")


async def test_concurrent_claims_get_different_items_with_the_default_lease(stub: Stub, db: asyncpg.Connection) -> None:
    for record_id in await _store_many(stub, 5):
        await _reprocess(stub, record_id)
    calls = [stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10) for _ in range(6)]
    claimed = [r.webhook.message_id for r in await asyncio.gather(*calls) if r.HasField("webhook")]

    rows = await _queue(db)
    assert sorted(claimed) == sorted(str(r["id"]) for r in rows)
    leases = await db.fetch("SELECT available_at - now() AS lease, claim_count FROM webhook_queue")
    assert all(timedelta(seconds=290) < r["lease"] <= timedelta(seconds=300) for r in leases)
    assert {r["claim_count"] for r in leases} == {1}


async def test_an_undecryptable_queue_item_does_not_block_the_others(stub: Stub, db: asyncpg.Connection) -> None:
    broken, healthy = await _store_many(stub, 2)
    for record_id in (broken, healthy):
        await _reprocess(stub, record_id)
    await db.execute(
        "UPDATE webhook_queue SET payload_encrypted = headers_encrypted WHERE dead_letter_id = $1::uuid", broken
    )

    delivered = [await _claimed_dead_letter(stub) for _ in range(3)]  # one after the other
    assert healthy in delivered


async def test_an_unacknowledged_claim_is_offered_again_when_its_lease_ends(stub: Stub, db: asyncpg.Connection) -> None:
    await _reprocess(stub, await _store(stub))
    first = (await stub.ClaimQueued(pb.ClaimQueuedRequest(lease_seconds=1), timeout=10)).webhook
    await asyncio.sleep(1.5)
    second = (await stub.ClaimQueued(pb.ClaimQueuedRequest(lease_seconds=60), timeout=10)).webhook

    assert second.message_id == first.message_id
    [row] = await _queue(db)
    assert (row["claim_count"], row["claimed_by"]) == (2, SUBJECT)


@pytest.mark.parametrize("lease", [-1, 3601, 4000])
async def test_lease_seconds_out_of_range_is_invalid_argument(stub: Stub, db: asyncpg.Connection, lease: int) -> None:
    await _reprocess(stub, await _store(stub))
    assert await _error(stub.ClaimQueued(pb.ClaimQueuedRequest(lease_seconds=lease), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (await _queue(db))[0]["claim_count"] == 0


async def test_acknowledge_of_a_malformed_id_is_invalid_argument(stub: Stub) -> None:
    call = stub.AcknowledgeQueued(pb.AcknowledgeQueuedRequest(message_id="nope"), timeout=10)
    assert await _error(call) == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_admin_may_not_claim(stub: Stub, admin_stub: Stub, db: asyncpg.Connection) -> None:
    await _reprocess(stub, await _store(stub))
    assert await _error(admin_stub.ClaimQueued(pb.ClaimQueuedRequest(), timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert (await _queue(db))[0]["claim_count"] == 0


# --- Redrive -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    id: str
    provider: int
    retryable: bool
    old: bool  # failed ten days ago


async def _store_mix(stub: Stub, db: asyncpg.Connection, count: int = 30) -> list[Stored]:
    """Dead letters of every provider and kind; every third one failed ten days ago."""
    letters = []
    for i in range(count):
        sample, kind = SIGNED[i % len(SIGNED)], MIXED_KINDS[i % len(MIXED_KINDS)]
        record_id = await _store(stub, sample, failure_kind=kind)
        letters.append(Stored(record_id, PROVIDERS[sample.provider], kind in RETRYABLE, old=i % 3 == 0))
    await _age(db, [s.id for s in letters if s.old], 10)
    return letters


async def _redrive(stub: Stub, **fields: Any) -> pb.RedriveResponse:
    return await stub.Redrive(pb.RedriveRequest(**fields), timeout=30)


async def test_redrive_dry_run_counts_and_sends_nothing(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)
    done = next(s for s in letters if s.retryable)
    await _reprocess(stub, done.id)  # already sent: counted as skipped

    counted = await _redrive(stub, dry_run=True)
    sendable = [s for s in letters if s.retryable and s != done]
    assert (counted.sent, counted.skipped, counted.dry_run, counted.truncated) == (
        len(sendable),
        len(letters) - len(sendable),
        True,
        False,
    )
    assert [str(q["dead_letter_id"]) for q in await _queue(db)] == [done.id]
    assert await db.fetchval("SELECT count(*) FROM dead_letter_queue WHERE status = 'pending'") == len(letters) - 1


async def test_redrive_sends_each_match_once(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)
    sendable = {s.id for s in letters if s.retryable}

    first = await _redrive(stub, max_per_second=1000)
    assert (first.sent, first.skipped, first.dry_run) == (len(sendable), len(letters) - len(sendable), False)
    assert {str(q["dead_letter_id"]) for q in await _queue(db)} == sendable
    assert len(await _queue(db)) == first.sent

    second = await _redrive(stub, max_per_second=1000)
    assert (second.sent, second.skipped) == (0, len(letters))
    assert len(await _queue(db)) == len(sendable)
    reprocessed = await db.fetch("SELECT id::text FROM dead_letter_queue WHERE status = 'reprocessed'")
    assert {r["id"] for r in reprocessed} == sendable


async def test_redrive_by_provider(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)
    facebook = [s for s in letters if s.provider == pb.PROVIDER_FACEBOOK]

    result = await _redrive(stub, provider=pb.PROVIDER_FACEBOOK, max_per_second=1000)
    sent = {s.id for s in facebook if s.retryable}
    assert (result.sent, result.skipped) == (len(sent), len(facebook) - len(sent))
    assert {str(q["dead_letter_id"]) for q in await _queue(db)} == sent


@pytest.mark.parametrize("old", [True, False], ids=["failed_before", "failed_after"])
async def test_redrive_by_failure_time(stub: Stub, db: asyncpg.Connection, old: bool) -> None:
    letters = await _store_mix(stub, db)
    boundary = _timestamp(datetime.now(UTC) - timedelta(days=5))
    window = {"failed_before": boundary} if old else {"failed_after": boundary}

    result = await _redrive(stub, max_per_second=1000, **window)
    matching = [s for s in letters if s.old == old]
    sent = {s.id for s in matching if s.retryable}
    assert (result.sent, result.skipped) == (len(sent), len(matching) - len(sent))
    assert {str(q["dead_letter_id"]) for q in await _queue(db)} == sent


async def test_redrive_by_a_non_retryable_kind_sends_nothing(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)
    result = await _redrive(stub, failure_kind=pb.FAILURE_KIND_PERMANENT)
    permanent = sum(MIXED_KINDS[i % len(MIXED_KINDS)] == pb.FAILURE_KIND_PERMANENT for i in range(len(letters)))
    assert (result.sent, result.skipped) == (0, permanent)
    assert await _queue(db) == []


async def test_redrive_limit_truncates(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)

    counted = await _redrive(stub, limit=5, dry_run=True)
    assert (counted.sent, counted.truncated) == (5, True)  # the five oldest failures are all retryable
    assert await _queue(db) == []

    result = await _redrive(stub, limit=5, max_per_second=1000)
    assert (result.sent, result.truncated) == (5, True)
    assert len(await _queue(db)) == 5

    rest = await _redrive(stub, max_per_second=1000)
    assert (rest.truncated, result.sent + rest.sent) == (False, sum(s.retryable for s in letters))
    assert len(await _queue(db)) == result.sent + rest.sent


async def test_redrive_called_again_continues_where_the_limit_stopped(stub: Stub, db: asyncpg.Connection) -> None:
    letters = await _store_mix(stub, db)
    sendable = {s.id for s in letters if s.retryable}

    sent, calls = 0, 0
    while calls < 20:  # 15 sendable at 5 a call: a working limit needs 4 or 5 calls
        calls += 1
        result = await _redrive(stub, limit=5, max_per_second=1000)
        sent += result.sent
        if not result.truncated:
            break
    assert (sent, result.truncated) == (len(sendable), False)
    assert {str(q["dead_letter_id"]) for q in await _queue(db)} == sendable


async def test_redrive_keeps_to_max_per_second(stub: Stub, db: asyncpg.Connection) -> None:
    await _store_many(stub, 20)
    started = time.monotonic()
    result = await _redrive(stub, max_per_second=10)
    elapsed = time.monotonic() - started

    assert result.sent == 20
    assert elapsed >= 1.5  # 19 gaps of 0.1 s
    assert len(await _queue(db)) == 20


@pytest.mark.parametrize("field", ["limit", "max_per_second"])
async def test_redrive_with_a_negative_number_is_invalid_argument(
    stub: Stub, db: asyncpg.Connection, field: str
) -> None:
    await _store(stub)
    assert await _error(_redrive(stub, **{field: -1})) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _queue(db) == []


# --- Purge -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ages:
    fresh: list[str]
    ten_days: list[str]
    hundred_days: list[str]


async def _store_ages(stub: Stub, db: asyncpg.Connection) -> Ages:
    ages = Ages(await _store_many(stub, 3), await _store_many(stub, 5), await _store_many(stub, 4))
    await _age(db, ages.ten_days, 10)
    await _age(db, ages.hundred_days, 100)
    return ages


async def _remaining(db: asyncpg.Connection) -> set[str]:
    return {r["id"] for r in await db.fetch("SELECT id::text FROM dead_letter_queue")}


async def _purge(stub: Stub, **fields: Any) -> pb.PurgeResponse:
    return await stub.Purge(pb.PurgeRequest(**fields), timeout=30)


async def test_purge_defaults_to_the_retention_period(stub: Stub, db: asyncpg.Connection) -> None:
    ages = await _store_ages(stub, db)
    audit_before = [r["id"] for r in await db.fetch("SELECT id FROM audit_log ORDER BY id")]

    result = await _purge(stub)
    cutoff = result.cutoff.ToDatetime(tzinfo=UTC)
    assert (result.purged_count, result.dry_run) == (len(ages.hundred_days), False)
    assert abs(cutoff - (datetime.now(UTC) - timedelta(days=90))) < timedelta(minutes=1)
    assert await _remaining(db) == set(ages.fresh + ages.ten_days)

    audit_after = [r["id"] for r in await db.fetch("SELECT id FROM audit_log ORDER BY id")]
    assert audit_after[: len(audit_before)] == audit_before  # purge never deletes the trail
    [purged] = await _audits(db, "purged")
    assert purged["metadata"]["count"] == len(ages.hundred_days)
    assert datetime.fromisoformat(purged["metadata"]["cutoff"]) == cutoff
    assert len(audit_after) == len(audit_before) + 1


async def test_purge_dry_run_counts_without_deleting(stub: Stub, db: asyncpg.Connection) -> None:
    ages = await _store_ages(stub, db)
    result = await _purge(stub, dry_run=True, older_than=Duration(seconds=5 * 86400))

    assert (result.purged_count, result.dry_run) == (len(ages.ten_days) + len(ages.hundred_days), True)
    assert await row_count(db) == len(ages.fresh) + len(ages.ten_days) + len(ages.hundred_days)
    [purged] = await _audits(db, "purged")
    assert purged["metadata"]["count"] == result.purged_count


async def test_purge_older_than_and_before(stub: Stub, db: asyncpg.Connection) -> None:
    ages = await _store_ages(stub, db)
    await _purge(stub)  # the 100-day-old ones

    result = await _purge(stub, older_than=Duration(seconds=5 * 86400))
    assert result.purged_count == len(ages.ten_days)
    assert await _remaining(db) == set(ages.fresh)
    before = await _purge(stub, before=_timestamp(datetime.now(UTC) - timedelta(days=2)))
    assert before.purged_count == 0
    counts = [a["metadata"]["count"] for a in await _audits(db, "purged")]
    assert counts == [len(ages.hundred_days), len(ages.ten_days), 0]


@pytest.mark.parametrize(
    "cutoff",
    [
        {"before": _timestamp(datetime.now(UTC) - timedelta(hours=12))},
        {"before": _timestamp(datetime.now(UTC) + timedelta(days=1))},
        {"older_than": Duration(seconds=3600)},
        {"older_than": Duration(seconds=-100 * 86400)},
    ],
    ids=["before-12h-ago", "before-tomorrow", "older-than-1h", "older-than-negative"],
)
async def test_a_too_recent_cutoff_is_invalid_argument(
    stub: Stub, db: asyncpg.Connection, cutoff: dict[str, Any]
) -> None:
    ages = await _store_ages(stub, db)
    for dry_run in (False, True):
        assert await _error(_purge(stub, dry_run=dry_run, **cutoff)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _remaining(db) == set(ages.fresh + ages.ten_days + ages.hundred_days)


async def test_purge_deletes_in_batches_each_audited_with_its_count(
    database_url: str, encryption_key: str, db: asyncpg.Connection
) -> None:
    async with serving(database_url, encryption_key, purge_batch_size=7) as stub:
        expired = await _store_many(stub, 50)
        fresh = await _store_many(stub, 3)
        await _age(db, expired, 100)
        result = await _purge(stub)

    assert result.purged_count == 50
    assert await _remaining(db) == set(fresh)
    audits = await _audits(db, "purged")
    assert [a["metadata"]["count"] for a in audits] == [7] * 7 + [1]
    assert [a["metadata"]["batch"] for a in audits] == list(range(1, 9))
    assert [a["metadata"]["last"] for a in audits] == [False] * 7 + [True]
    assert len({a["metadata"]["run"] for a in audits}) == 1
    assert audits[-1]["metadata"]["total"] == 50


async def test_an_interrupted_purge_leaves_every_deleted_row_accounted_for(
    database_url: str, encryption_key: str, db: asyncpg.Connection
) -> None:
    # Long rests between batches of 5 leave time to cancel the call after a couple of batches.
    async with serving(database_url, encryption_key, purge_batch_size=5, purge_rest_percent=1000) as stub:
        expired = await _store_many(stub, 60)
        await _age(db, expired, 100)
        call = stub.Purge(pb.PurgeRequest(), timeout=60)

        async def two_batches_done() -> bool:
            return len(await _audits(db, "purged")) >= 2

        assert await eventually(two_batches_done, within=30, every=0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.5)  # the server notices the cancellation; nothing more may be deleted

    deleted = len(expired) - await row_count(db)
    counts = [a["metadata"]["count"] for a in await _audits(db, "purged")]
    assert 0 < deleted < len(expired)
    assert sum(counts) == deleted
    assert all(count == 5 for count in counts)


async def test_only_the_service_role_may_purge(admin_stub: Stub, stub: Stub, db: asyncpg.Connection) -> None:
    expired = await _store_many(stub, 2)
    await _age(db, expired, 100)
    assert await _error(_purge(admin_stub)) == grpc.StatusCode.PERMISSION_DENIED
    assert await row_count(db) == 2
    assert await _audits(db, "purged") == []
