"""Wiring: builds the concrete parts from Settings, starts the gRPC server, and stops it all in order."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from deadletter.v1 import deadletter_pb2, deadletter_pb2_grpc
from server import embedded
from server.config import Settings
from server.crypto import Keyring, generate_key
from server.domain import REQUEST_OVERHEAD_BYTES
from server.migrate import migrate
from server.servicer import DeadLetterServicer
from server.status import StatusInterceptor
from server.store import Store, create_pool
from server.vault import Vault

log = logging.getLogger("deadletter")

SERVICE_NAME = deadletter_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name


@dataclass
class Application:
    """A started server and what it owns."""

    settings: Settings
    server: grpc.aio.Server
    health: HealthServicer
    pool: asyncpg.Pool
    port: int
    embedded_postgres: Any = None

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within grace, then close the pool."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self.pool.close()
        if self.embedded_postgres is not None:
            await asyncio.to_thread(self.embedded_postgres.cleanup)


async def start(settings: Settings) -> Application:
    """Connect, migrate, and start serving; raises ConfigError or DatabaseUnavailable if it cannot."""
    dsn, keys, embedded_postgres = await _database_and_keys(settings)
    keyring = Keyring.parse(keys)
    if settings.migrate_on_start:
        await migrate(dsn, settings.migrations_dir)
    pool = await create_pool(settings, dsn)
    try:
        server, health_servicer = _grpc_server(
            settings, Vault(Store(pool, settings.db_acquire_timeout_seconds), keyring)
        )
        port = server.add_insecure_port(settings.listen)
        await server.start()
    except BaseException:
        await pool.close()
        raise
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return Application(settings, server, health_servicer, pool, port, embedded_postgres)


async def _database_and_keys(settings: Settings) -> tuple[str, str, Any]:
    if settings.database_url is not None:
        assert settings.encryption_keys is not None  # config.from_env enforces this
        return settings.database_url, settings.encryption_keys, None
    server = await asyncio.to_thread(embedded.start_postgres, settings.data_dir)
    dsn = await embedded.database_url(server)
    keys = settings.encryption_keys or embedded.secret(settings.data_dir, "encryption.key", generate_key)
    return dsn, keys, server


def _grpc_server(settings: Settings, vault: Vault) -> tuple[grpc.aio.Server, HealthServicer]:
    receive_limit = settings.max_payload_bytes + REQUEST_OVERHEAD_BYTES
    server = grpc.aio.server(
        interceptors=[StatusInterceptor((f"/{SERVICE_NAME}/",))],
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", receive_limit),
        ],
    )
    deadletter_pb2_grpc.add_DeadLetterServiceServicer_to_server(
        DeadLetterServicer(vault, settings.max_payload_bytes), server
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer
