"""The broker sink: a relay that moves reprocessed webhooks from the webhook_queue outbox to RabbitMQ.

Why RabbitMQ: webhook workers are polyglot and most often consume durable work queues with per-message acks
(Celery, Sidekiq-style and plain AMQP consumers exist for every language), and its publisher confirms tell
the relay exactly when the broker owns a message.

Delivery is at least once, and never silently twice: a batch is published (each publish awaits the broker's
confirm) and then deleted from the outbox in the same transaction that locked it. If the broker is down, the
transaction rolls back and the rows wait. If the relay dies between the confirm and the commit, the rows are
published again under the same message_id (the dead letter's id; x-deadletter-attempt tells a forced resend
from a duplicate), so consumers can detect and drop the duplicate. The message carries the decrypted payload:
use amqps:// outside a trusted network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
import aio_pika.abc

from server.auth import Role
from server.errors import DeadLetterError
from server.store import QueuedRow, Store
from server.vault import Vault

log = logging.getLogger("deadletter.relay")

SUBJECT = "rabbitmq-relay"


class RabbitRelay:
    def __init__(
        self,
        store: Store,
        vault: Vault,
        url: str,
        queue: str,
        *,
        batch_size: int = 100,
        idle_seconds: float = 0.5,
        retry_seconds: float = 2.0,
    ) -> None:
        self._store = store
        self._vault = vault
        self._url = url
        self._queue = queue
        self._batch_size = batch_size
        self._idle = idle_seconds
        self._retry = retry_seconds
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rabbitmq-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()

    async def publish_batch(self) -> int:
        """Publish up to one batch of queued webhooks and remove them from the outbox; return how many."""
        channel = await self._connect()
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            rows = await tx.relay_batch(self._batch_size)
            published = [row.id for row in rows if await self._publish(channel, row)]
            if published:
                await tx.delete_queued(published)
        return len(published)

    async def _run(self) -> None:
        while True:
            try:
                if await self.publish_batch() == 0:
                    await asyncio.sleep(self._idle)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the broker or the database is away: the outbox keeps everything
                log.warning("relay paused; will retry", extra={"error": type(error).__name__})
                await self._disconnect()
                await asyncio.sleep(self._retry)

    async def _publish(self, channel: aio_pika.abc.AbstractChannel, row: QueuedRow) -> bool:
        try:
            webhook = self._vault.open_queued(row)
        except DeadLetterError as error:
            # A sealed value that fails to open must not block the rest; it stays queued and is reported.
            log.error("queued webhook cannot be opened", extra={"queue_message_id": str(row.id), "code": error.code})
            return False
        message = aio_pika.Message(
            body=webhook.payload,
            message_id=str(row.dead_letter_id),
            correlation_id=row.correlation_id,
            content_type=webhook.headers.get("content-type"),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={
                **webhook.headers,
                "x-deadletter-attempt": row.attempt,
                "x-deadletter-provider": row.provider.value,
                "x-deadletter-event-id": row.event_id,
                "x-deadletter-queue-message-id": str(row.id),
            },
        )
        await channel.default_exchange.publish(message, routing_key=self._queue, mandatory=True)
        return True

    async def _connect(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._connection = await aio_pika.connect(self._url, timeout=5)
            self._channel = await self._connection.channel(publisher_confirms=True)
            await self._channel.declare_queue(self._queue, durable=True)
        return self._channel

    async def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
