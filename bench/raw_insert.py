"""Ceiling (b): raw asyncpg single-row INSERTs of the row Store writes, as the table owner, one commit each.

The row is sealed the way the vault seals it (AES-256-GCM bound to the new id and field), from the same number
of concurrent asyncio tasks as the load generator's concurrency, on at most as many connections as the server's
pool. No audit row, no role switch, no gRPC: what PostgreSQL and asyncpg can do on this machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC

import asyncpg

from bench.loadgen import Run
from bench.stats import Latency
from bench.workload import Workload
from server.crypto import Keyring
from server.vault import HEADERS_FIELD, PAYLOAD_FIELD

INSERT = """
INSERT INTO dead_letter_queue (id, event_id, provider, received_at, correlation_id, payload_encrypted,
                               headers_encrypted, payload_size_bytes, error_message, retry_count, failure_kind)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'retryable')
"""


async def raw_inserts(owner_dsn: str, keyring: Keyring, work: Workload, concurrency: int, requests: int,
                      pool_size: int) -> Run:  # fmt: skip
    connections = min(concurrency, pool_size)
    request = work.request
    received_at = request.received_at.ToDatetime(tzinfo=UTC)
    headers = work.headers_json
    latencies: list[float] = []
    tickets = iter(range(requests))
    pool = await asyncpg.create_pool(owner_dsn, min_size=connections, max_size=connections)
    try:

        async def worker() -> None:
            while next(tickets, None) is not None:
                record_id = uuid.uuid4()
                began = time.perf_counter()
                payload = keyring.seal(work.body, str(record_id), PAYLOAD_FIELD)
                sealed_headers = keyring.seal(headers, str(record_id), HEADERS_FIELD)
                await pool.execute(
                    INSERT, record_id, request.event_id, "whatsapp", received_at, request.correlation_id,
                    payload, sealed_headers, len(work.body), request.error_message, request.retry_count,
                )  # fmt: skip
                latencies.append((time.perf_counter() - began) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await pool.close()
    return Run(requests, len(latencies), seconds, Latency.of(latencies))
