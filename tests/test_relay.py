"""The RabbitMQ relay against the real broker: delivery, a broker outage, and a detectable duplicate.

The broker is DEADLETTER_TEST_RABBITMQ_URL, or RabbitMQ on 127.0.0.1:5672 (guest/guest) as CI machines have
it. An outage is made with a TCP proxy the test controls, never by stopping the shared broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import asyncpg
import pytest

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from tests.conftest import SAMPLES, channel_to, eventually, settings_for, token

BROKER = os.environ.get("DEADLETTER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
SAMPLE = next(s for s in SAMPLES if s.file == "whatsapp-image-with-caption.json")


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = f"deadletter-test-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(BROKER, timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)


async def _messages(queue: str, want: int, within: float) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Read messages from the queue until want arrived or within seconds passed."""
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(BROKER, timeout=5)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        deadline = time.monotonic() + within
        while len(received) < want and time.monotonic() < deadline:
            message = await declared.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
            else:
                received.append(message)
    return received


async def _reprocess_one(address: str) -> str:
    async with channel_to(address, token()) as channel:
        stub = pb_grpc.DeadLetterServiceStub(channel)
        stored = await stub.Store(SAMPLE.store_request())
        await stub.Reprocess(pb.ReprocessRequest(id=stored.id))
    return stored.id


async def _outbox_empty(db: asyncpg.Connection) -> bool:
    return await _outbox(db) == 0


async def _outbox(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM webhook_queue")
    return count


async def test_reprocessed_webhook_reaches_rabbitmq_byte_for_byte(
    database_url: str, encryption_key: str, db: asyncpg.Connection, queue_name: str
) -> None:
    server = await app.start(settings_for(database_url, encryption_key, rabbitmq_url=BROKER, rabbitmq_queue=queue_name))
    try:
        record_id = await _reprocess_one(server.address)
        messages = await _messages(queue_name, 1, within=15)
    finally:
        await server.stop(0)
    assert len(messages) == 1
    message = messages[0]
    assert message.body == SAMPLE.body
    assert message.message_id == record_id
    headers: dict[str, Any] = dict(message.headers)
    assert headers["x-hub-signature-256"] == SAMPLE.headers["x-hub-signature-256"]
    assert headers["x-deadletter-attempt"] == 1
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert await _outbox(db) == 0


class _Proxy:
    """A TCP forwarder to the broker that the test opens and closes: a broker outage on demand."""

    def __init__(self) -> None:
        target = urlsplit(BROKER)
        self._target = (target.hostname or "127.0.0.1", target.port or 5672)
        self._server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()

    def url(self) -> str:
        parts = urlsplit(BROKER)
        return f"{parts.scheme}://{parts.username}:{parts.password}@127.0.0.1:{self.port}{parts.path or '/'}"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def test_a_broker_outage_delays_delivery_but_loses_nothing(
    database_url: str, encryption_key: str, db: asyncpg.Connection, queue_name: str
) -> None:
    proxy = _Proxy()
    await proxy.open()
    url = proxy.url()
    await proxy.close()  # the broker is "down" before the server starts
    server = await app.start(settings_for(database_url, encryption_key, rabbitmq_url=url, rabbitmq_queue=queue_name))
    try:
        record_id = await _reprocess_one(server.address)
        await asyncio.sleep(3)
        assert await _outbox(db) == 1, "kept in the outbox while the broker is away"
        await proxy.open()  # the broker is back, on the same address; the server is not restarted
        messages = await _messages(queue_name, 1, within=20)
    finally:
        await server.stop(0)
        await proxy.close()
    assert [m.message_id for m in messages] == [record_id]
    assert messages[0].body == SAMPLE.body
    assert await _outbox(db) == 0


async def test_a_relay_that_fails_after_publishing_resends_under_the_same_message_id(
    database_url: str, encryption_key: str, db: asyncpg.Connection, queue_name: str
) -> None:
    # The relay's DELETE from the outbox fails, as if it died between the broker's confirm and its commit.
    await db.execute("REVOKE DELETE ON webhook_queue FROM deadletter_service")
    server = await app.start(settings_for(database_url, encryption_key, rabbitmq_url=BROKER, rabbitmq_queue=queue_name))
    try:
        record_id = await _reprocess_one(server.address)
        duplicates = await _messages(queue_name, 2, within=15)
        await db.execute("GRANT DELETE ON webhook_queue TO deadletter_service")
        await eventually(lambda: _outbox_empty(db), within=15)
    finally:
        await server.stop(0)
    assert len(duplicates) == 2
    assert {m.message_id for m in duplicates} == {record_id}, "a duplicate carries the same message id"
    assert {dict(m.headers)["x-deadletter-attempt"] for m in duplicates} == {1}, "and the same attempt"
    assert await _outbox(db) == 0
