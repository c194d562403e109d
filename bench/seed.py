"""Bulk-loads dead_letter_queue with COPY, as the owner, for the List, Get and Purge sections.

failed_at is spread over the last 120 days and the providers take turns. EXPIRED_SHARE of the rows (90%) failed
between the retention period (90 days) and 120 days ago, evenly, and the rest within the retention period,
evenly: a purge then deletes most of the table, as a first daily purge after a backlog would. Rows are written
oldest first, so the heap is in failed_at order as Store leaves it (failed_at is the server's clock at Store
time): List and Purge touch the pages they would in production, not one page per row. Most rows share
one small sealed payload (valid ciphertext, but bound to another id, so Get would answer DATA_LOSS for them); a
couple of thousand are sealed for their own ids with the full 2 KiB webhook, and the Get section reads those.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.workload import ERROR_MESSAGE, Workload
from server.crypto import Keyring
from server.vault import HEADERS_FIELD, PAYLOAD_FIELD

SPREAD_DAYS = 120
EXPIRED_SHARE = 0.9
PROVIDERS = ("facebook", "instagram", "whatsapp")
COLUMNS = (
    "id", "event_id", "provider", "received_at", "correlation_id", "payload_encrypted", "error_message",
    "retry_count", "failed_at", "headers_encrypted", "payload_size_bytes", "failure_kind",
)  # fmt: skip
_CHUNK = 50_000
_SMALL_PAYLOAD = b'{"object":"page","entry":[{"id":"0","time":0,"messaging":[]}]}'


@dataclass(frozen=True)
class Seeded:
    rows: int
    expired: int  # failed_at older than retention_days when loaded
    sealed_ids: list[uuid.UUID]  # rows Get can open
    copy_seconds: float
    vacuum_seconds: float


Record = tuple[object, ...]


async def seed(owner_dsn: str, keyring: Keyring, work: Workload, rows: int, sealed: int, retention_days: int) -> Seeded:
    rng = random.Random(6)  # noqa: S311 -- spreading timestamps, not secrets
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    sealed_at = set(rng.sample(range(rows), min(sealed, rows)))
    ages = sorted((_age_days(rng, retention_days) for _ in range(rows)), reverse=True)  # oldest first
    shared = (
        keyring.seal(_SMALL_PAYLOAD, "bulk", PAYLOAD_FIELD),
        keyring.seal(work.headers_json, "bulk", HEADERS_FIELD),
    )
    sealed_ids: list[uuid.UUID] = []
    expired = 0

    def records(first: int, last: int) -> Iterator[Record]:
        nonlocal expired
        for i in range(first, last):
            record_id = uuid.uuid4()
            failed_at = now - timedelta(days=ages[i])
            expired += failed_at < cutoff
            if i in sealed_at:
                sealed_ids.append(record_id)
                payload = keyring.seal(work.body, str(record_id), PAYLOAD_FIELD)
                headers = keyring.seal(work.headers_json, str(record_id), HEADERS_FIELD)
                size = len(work.body)
            else:
                (payload, headers), size = shared, len(_SMALL_PAYLOAD)
            yield (
                record_id, f"wamid.bench{i:09d}", PROVIDERS[i % 3], failed_at - timedelta(seconds=45),
                f"bench-{i}", payload, ERROR_MESSAGE, 3, failed_at, headers, size, "retryable",
            )  # fmt: skip

    conn = await asyncpg.connect(owner_dsn)
    try:
        started = time.perf_counter()
        for first in range(0, rows, _CHUNK):
            chunk = list(records(first, min(rows, first + _CHUNK)))
            await conn.copy_records_to_table("dead_letter_queue", records=chunk, columns=COLUMNS)
        copied = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE) dead_letter_queue")
        vacuumed = time.perf_counter()
    finally:
        await conn.close()
    return Seeded(rows, expired, sealed_ids, copied - started, vacuumed - copied)


def _age_days(rng: random.Random, retention_days: int) -> float:
    """How many days ago a row failed: past retention with probability EXPIRED_SHARE, evenly within each span
    (with a margin of a few hours around the cut-off, which the purge computes minutes later)."""
    if rng.random() < EXPIRED_SHARE:
        return retention_days + 0.1 + rng.random() * (SPREAD_DAYS - retention_days - 0.1)
    return rng.random() * (retention_days - 0.1)
