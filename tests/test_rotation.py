"""Key rotation (python -m server rotate-keys): under load, resumable, skipping what it cannot open, and the CLI.

Real PostgreSQL, real servers on real gRPC channels: records are stored under one key, rotated to another, then
read back byte for byte by a server that holds only the new key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import uuid
from typing import TYPE_CHECKING

import asyncpg
import grpc
import grpc.aio
import pytest

from deadletter.v1 import deadletter_pb2 as pb
from server.config import PROJECT_ROOT
from server.crypto import Keyring, generate_key, key_id
from server.rotation import RotationReport, rotate, rotate_database
from server.store import Store, create_pool
from tests.conftest import JWT_SECRET, SAMPLES, Sample, serving, settings_for
from tests.processes import server_env

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

TABLES = ("dead_letter_queue", "webhook_queue")


def _kid(key: str) -> str:
    return key_id(base64.b64decode(key))


def _serving(database_url: str, keys: str) -> contextlib.AbstractAsyncContextManager[Stub]:
    return serving(database_url, keys, retention_enabled=False)


async def _store(stub: Stub, sample: Sample) -> str:
    return (await stub.Store(sample.store_request(), timeout=10)).id


async def _reprocess(stub: Stub, record_id: str) -> None:
    await stub.Reprocess(pb.ReprocessRequest(id=record_id), timeout=10)


async def _store_samples(database_url: str, keys: str, count: int, reprocess: int) -> dict[str, Sample]:
    """Store count samples through a server configured with keys, and send the first `reprocess` back."""
    stored: dict[str, Sample] = {}
    async with _serving(database_url, keys) as stub:
        for i in range(count):
            sample = SAMPLES[i % len(SAMPLES)]
            stored[await _store(stub, sample)] = sample
        for record_id in list(stored)[:reprocess]:
            await _reprocess(stub, record_id)
    return stored


async def _key_ids(db: asyncpg.Connection, table: str) -> set[str]:
    """Every key id named by the table's sealed values (the test's database connection is the owner's)."""
    query = {
        "dead_letter_queue": "SELECT payload_encrypted, headers_encrypted FROM dead_letter_queue",
        "webhook_queue": "SELECT payload_encrypted, headers_encrypted FROM webhook_queue",
    }[table]
    return {value.split(".")[1] for row in await db.fetch(query) for value in row.values()}


async def _sealed(db: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    rows = await db.fetch(
        "SELECT id, payload_encrypted, headers_encrypted FROM dead_letter_queue UNION ALL "
        "SELECT id, payload_encrypted, headers_encrypted FROM webhook_queue"
    )
    return {str(r["id"]): (r["payload_encrypted"], r["headers_encrypted"]) for r in rows}


async def _read_back(stub: Stub, stored: dict[str, Sample]) -> None:
    """Get returns every record byte for byte."""
    for record_id, sample in stored.items():
        got = await stub.Get(pb.GetRequest(id=record_id), timeout=10)
        assert got.payload == sample.body
        assert dict(got.headers) == sample.headers


async def _claim_all(stub: Stub, stored: dict[str, Sample]) -> int:
    """Claim every queued webhook, checking each decrypts to its dead letter's payload and headers."""
    claimed = 0
    while (response := await stub.ClaimQueued(pb.ClaimQueuedRequest(lease_seconds=300), timeout=10)).HasField(
        "webhook"
    ):
        sample = stored[response.webhook.dead_letter_id]
        assert response.webhook.payload == sample.body
        assert dict(response.webhook.headers) == sample.headers
        claimed += 1
    return claimed


def _assert_no_secrets(text: str, *keys: str) -> None:
    for key in keys:
        assert key not in text
    for sample in SAMPLES:
        assert sample.body.decode() not in text
        for value in sample.headers.values():
            if value != "application/json":
                assert value not in text


class _Load:
    """Keeps calling Store, and Reprocess on every third turn, until told to stop."""

    def __init__(self, stub: Stub, stored: dict[str, Sample], pending: list[str]) -> None:
        self._stub = stub
        self.stored = stored
        self._pending = pending
        self.calls = 0
        self.stop = asyncio.Event()
        self._progress = asyncio.Condition()

    async def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            sample = SAMPLES[turn % len(SAMPLES)]
            record_id = await _store(self._stub, sample)
            self.stored[record_id] = sample
            self._pending.append(record_id)
            if turn % 3 == 0:
                await _reprocess(self._stub, self._pending.pop(0))
            turn += 1
            async with self._progress:
                self.calls += 1
                self._progress.notify_all()

    async def reached(self, calls: int) -> None:
        """Wait until the load has made this many calls in all (a failed load fails the wait by its time-out)."""
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: self.calls >= calls), 30)


async def test_rotation_under_load_then_a_server_with_only_the_new_key_reads_everything(
    database_url: str, db: asyncpg.Connection, encryption_key: str
) -> None:
    old, new = encryption_key, generate_key()
    stored = await _store_samples(database_url, old, count=36, reprocess=12)
    for table in TABLES:
        assert await _key_ids(db, table) == {_kid(old)}

    # The procedure: every replica runs with the new key first, then the rotation runs while they serve.
    async with _serving(database_url, f"{new},{old}") as stub:
        load = _Load(stub, stored, pending=list(stored)[12:])
        task = asyncio.create_task(load.run())
        try:
            await load.reached(3)
            calls_before = load.calls
            report = await rotate_database(settings_for(database_url, f"{new},{old}"), batch_size=4)
            calls_during = load.calls - calls_before
            await load.reached(calls_before + calls_during + 3)  # and a little after it, too
        finally:
            load.stop.set()
            await task

    assert calls_during > 0, "the load kept running while the rotation ran"
    assert report.complete, report.summary()
    assert report.table("dead_letter_queue").rotated == 36  # stored under the old key; the load's under the new one
    assert report.table("webhook_queue").rotated >= 12
    assert report.batches > 36 // 4
    for table in TABLES:
        assert await _key_ids(db, table) == {_kid(new)}
    queued: int = await db.fetchval("SELECT count(*) FROM webhook_queue")
    assert queued >= 12 + 1

    # The old key can go: a server that holds only the new one reads every record and every queued item.
    async with _serving(database_url, new) as stub:
        await _read_back(stub, stored)
        assert await _claim_all(stub, stored) == queued
    _assert_no_secrets(report.summary(), old, new)


async def test_rotation_stopped_after_a_batch_continues_where_it_stopped(
    database_url: str, db: asyncpg.Connection, encryption_key: str
) -> None:
    old, new = encryption_key, generate_key()
    stored = await _store_samples(database_url, old, count=9, reprocess=2)
    settings = settings_for(database_url, f"{new},{old}")

    first = await rotate_database(settings, batch_size=3, max_batches=1)
    assert (first.batches, first.stopped_early, first.complete) == (1, True, False)
    assert first.table("dead_letter_queue").rotated == 3
    assert first.table("dead_letter_queue").remaining == {_kid(old): 6}
    assert first.table("webhook_queue").remaining == {_kid(old): 2}
    assert "rerun to continue" in first.summary()
    # The batch took the three lowest ids, and committed.
    rows = await db.fetch("SELECT split_part(payload_encrypted, '.', 2) AS kid FROM dead_letter_queue ORDER BY id")
    assert [r["kid"] for r in rows] == [_kid(new)] * 3 + [_kid(old)] * 6

    second = await rotate_database(settings, batch_size=3)
    assert second.complete, second.summary()
    assert (second.table("dead_letter_queue").rotated, second.table("webhook_queue").rotated) == (6, 2)
    assert second.batches == 3  # 3 + 3 dead letters, then both queued items
    for table in TABLES:
        assert await _key_ids(db, table) == {_kid(new)}

    again = await rotate_database(settings, batch_size=3)
    assert (again.complete, again.batches) == (True, 0)
    assert [t.rotated for t in again.tables] == [0, 0]

    async with _serving(database_url, new) as stub:
        await _read_back(stub, stored)
        assert await _claim_all(stub, stored) == 2


async def test_a_corrupted_record_is_skipped_and_reported_and_the_rest_rotate(
    database_url: str, db: asyncpg.Connection, encryption_key: str
) -> None:
    old, new = encryption_key, generate_key()
    stored = await _store_samples(database_url, old, count=5, reprocess=2)
    ids = list(stored)
    # A payload copied from another record, and a queued item's headers copied from another dead letter: both
    # still name the old key, and both fail authentication.
    victim, donor = ids[2], ids[3]
    await db.execute(
        "UPDATE dead_letter_queue SET payload_encrypted = (SELECT payload_encrypted FROM dead_letter_queue "
        "WHERE id = $2) WHERE id = $1",
        uuid.UUID(victim),
        uuid.UUID(donor),
    )
    queue_victim = str(
        await db.fetchval(
            "UPDATE webhook_queue SET headers_encrypted = (SELECT headers_encrypted FROM dead_letter_queue "
            "WHERE id = $2) WHERE dead_letter_id = $1 RETURNING id",
            uuid.UUID(ids[1]),
            uuid.UUID(ids[4]),
        )
    )
    before = await _sealed(db)

    report = await rotate_database(settings_for(database_url, f"{new},{old}"), batch_size=2)

    letters, queue = report.table("dead_letter_queue"), report.table("webhook_queue")
    assert (letters.corrupted, letters.rotated, letters.remaining) == ([victim], 4, {_kid(old): 1})
    assert (queue.corrupted, queue.rotated, queue.remaining) == ([queue_victim], 1, {_kid(old): 1})
    assert not report.complete
    summary = report.summary()
    assert victim in summary
    assert queue_victim in summary
    assert "DATA_LOSS" in summary
    _assert_no_secrets(summary, old, new)

    after = await _sealed(db)
    assert after[victim] == before[victim]  # never rewritten, not even its intact headers
    assert after[queue_victim] == before[queue_victim]
    for row_id, values in after.items():
        if row_id not in (victim, queue_victim):
            assert {value.split(".")[1] for value in values} == {_kid(new)}

    async with _serving(database_url, f"{new},{old}") as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Get(pb.GetRequest(id=victim), timeout=10)
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        await _read_back(stub, {i: s for i, s in stored.items() if i != victim})


async def test_rows_locked_by_requests_are_skipped_not_waited_for_and_taken_by_a_later_pass(
    database_url: str, db: asyncpg.Connection, encryption_key: str
) -> None:
    old, new = encryption_key, generate_key()
    stored = await _store_samples(database_url, old, count=4, reprocess=0)
    busy = uuid.UUID(next(iter(stored)))
    settings = settings_for(database_url, f"{new},{old}")
    pool = await create_pool(settings, database_url)
    try:
        store, keyring = Store(pool, 2.0), Keyring.parse(f"{new},{old}")
        async with db.transaction():  # a request holding one dead letter (Reprocess does this)
            await db.execute("SELECT 1 FROM dead_letter_queue WHERE id = $1 FOR UPDATE", busy)
            one_pass = await asyncio.wait_for(rotate(store, keyring, max_passes=1), 10)
            assert one_pass.table("dead_letter_queue").rotated == 3
            assert one_pass.table("dead_letter_queue").remaining == {_kid(old): 1}
            assert not one_pass.complete

            # Passes again while the row stays locked, and takes it once the request commits.
            later = asyncio.create_task(rotate(store, keyring, retry_seconds=0.1))
            await asyncio.sleep(0.3)
            assert not later.done()
        report = await asyncio.wait_for(later, 10)
    finally:
        await pool.close()
    assert report.complete, report.summary()
    assert report.table("dead_letter_queue").rotated == 1
    assert await _key_ids(db, "dead_letter_queue") == {_kid(new)}


async def _rotate_keys_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "rotate-keys",
        *args,
        cwd=PROJECT_ROOT,
        env=server_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_rotate_keys_command_follows_the_readme_procedure(
    database_url: str, db: asyncpg.Connection, encryption_key: str
) -> None:
    old, new = encryption_key, generate_key()
    stored = await _store_samples(database_url, old, count=5, reprocess=1)
    env = {"DATABASE_URL": database_url, "DEADLETTER_JWT_SECRET": JWT_SECRET}
    outputs = []

    # Removing the old key too early: nothing is rewritten, every record is named, and the exit code says so.
    code, output = await _rotate_keys_cli(env | {"DEADLETTER_ENCRYPTION_KEYS": new})
    outputs.append(output)
    assert code == 1, output
    assert "missing from DEADLETTER_ENCRYPTION_KEYS" in output
    assert all(record_id in output for record_id in stored)
    for table in TABLES:
        assert await _key_ids(db, table) == {_kid(old)}

    # New key first, old key after it: rotates everything and exits 0.
    code, output = await _rotate_keys_cli(env | {"DEADLETTER_ENCRYPTION_KEYS": f"{new},{old}"}, "--batch-size", "2")
    outputs.append(output)
    assert code == 0, output
    assert "dead_letter_queue: 5 re-encrypted" in output
    assert "webhook_queue: 1 re-encrypted" in output
    assert f"every record is sealed under {_kid(new)}" in output
    for table in TABLES:
        assert await _key_ids(db, table) == {_kid(new)}

    # Verify with the new key alone before removing the old one from the secret store: still 0.
    code, output = await _rotate_keys_cli(env | {"DEADLETTER_ENCRYPTION_KEYS": new})
    outputs.append(output)
    assert code == 0, output
    assert "0 re-encrypted" in output

    for output in outputs:
        _assert_no_secrets(output, old, new)
    async with _serving(database_url, new) as stub:
        await _read_back(stub, stored)


async def test_rotate_keys_without_a_key_refuses_naming_the_setting(database_url: str) -> None:
    code, output = await _rotate_keys_cli({"DATABASE_URL": database_url, "DEADLETTER_JWT_SECRET": JWT_SECRET})
    assert code == 2
    assert "DEADLETTER_ENCRYPTION_KEYS" in output


def test_report_of_nothing_to_do_is_complete() -> None:
    report = RotationReport("0123456789abcdef", [])
    assert report.complete
    assert "Done" in report.summary()
