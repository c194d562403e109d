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

from deadletter.v1 import deadletter_pb2_grpc
from server import embedded, metrics
from server.access import SERVICE_NAME, AccessInterceptor
from server.auth import TokenVerifier, generate_jwt_secret, read_public_key
from server.config import ConfigError, Settings, app_secrets
from server.crypto import Keyring, generate_key
from server.domain import REQUEST_OVERHEAD_BYTES
from server.migrate import check_login_role, migrate, provision_login_role
from server.monitor import Monitor
from server.relay import RabbitRelay
from server.retention import Retention
from server.servicer import DeadLetterServicer
from server.status import StatusInterceptor
from server.store import Store, create_pool
from server.vault import RecoveryPolicy, Vault

log = logging.getLogger("deadletter")


@dataclass
class Application:
    """A started server and what it owns."""

    settings: Settings
    server: grpc.aio.Server
    health: HealthServicer
    pool: asyncpg.Pool
    port: int
    retention: Retention | None = None
    relay: RabbitRelay | None = None
    monitor: Monitor | None = None
    metrics_port: int | None = None
    embedded_postgres: Any = None

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, stop the jobs, let in-flight calls finish within grace, then close the pool."""
        if self.monitor is not None:
            await self.monitor.stop()  # first, so it cannot turn health back to SERVING
        await self.health.enter_graceful_shutdown()
        if self.retention is not None:
            self.retention.shutdown()
        if self.relay is not None:
            await self.relay.stop()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self.pool.close()
        if self.embedded_postgres is not None:
            await asyncio.to_thread(self.embedded_postgres.cleanup)


async def start(settings: Settings) -> Application:
    """Connect, migrate, and start serving; raises ConfigError, MigrationError or DatabaseUnavailable."""
    secrets = await database_and_secrets(settings)
    keyring = Keyring.parse(secrets.encryption_keys)
    verifier = TokenVerifier(
        secret=secrets.jwt_secret,
        public_key_pem=read_public_key(settings.jwt_public_key_file),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
    )
    credentials = _server_credentials(settings)
    await prepare_database(settings, secrets)
    pool = await create_pool(settings, secrets.dsn)
    try:
        async with pool.acquire() as conn:
            await check_login_role(conn)
        store = Store(pool, settings.db_acquire_timeout_seconds)
        policy = RecoveryPolicy(
            app_secrets=app_secrets(settings),
            redrive_max_per_second=settings.redrive_max_per_second,
            redrive_max_batch=settings.redrive_max_batch,
            purge_batch_size=settings.purge_batch_size,
            purge_rest_percent=settings.purge_rest_percent,
        )
        vault = Vault(store, keyring, policy)
        server, health_servicer = _grpc_server(settings, vault, AccessInterceptor(verifier, store))
        port = (
            server.add_secure_port(settings.listen, credentials)
            if credentials
            else server.add_insecure_port(settings.listen)
        )
        await server.start()
    except BaseException:
        await pool.close()
        raise
    application = Application(
        settings, server, health_servicer, pool, port, embedded_postgres=secrets.embedded_postgres
    )
    if settings.retention_enabled:
        application.retention = Retention(vault, store, settings.retention_days, settings.retention_cron)
        application.retention.start()
    if settings.rabbitmq_url:
        application.relay = RabbitRelay(store, vault, settings.rabbitmq_url, settings.rabbitmq_queue)
        application.relay.start()
    application.monitor = Monitor(
        store,
        health_servicer,
        ("", SERVICE_NAME),
        check_seconds=settings.health_check_seconds,
        refresh_seconds=settings.metrics_refresh_seconds,
    )
    application.monitor.start()
    if settings.metrics_listen is not None:
        application.metrics_port = metrics.serve(settings.metrics_listen)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return application


@dataclass(frozen=True)
class Secrets:
    dsn: str
    migrations_dsn: str | None
    encryption_keys: str
    jwt_secret: str | None
    provision_login_role: str | None = None
    embedded_postgres: Any = None


async def prepare_database(settings: Settings, secrets: Secrets) -> None:
    """Apply pending migrations (when a migrations DSN is known) and, in the embedded mode, the login role."""
    if settings.migrate_on_start and secrets.migrations_dsn is not None:
        await migrate(secrets.migrations_dsn, settings.migrations_dir)
        if secrets.provision_login_role is not None:
            await provision_login_role(secrets.migrations_dsn, secrets.provision_login_role)


async def database_and_secrets(settings: Settings) -> Secrets:
    if settings.database_url is not None:
        assert settings.encryption_keys is not None  # config.from_env enforces this
        return Secrets(
            settings.database_url, settings.migrations_database_url, settings.encryption_keys, settings.jwt_secret
        )
    server = await asyncio.to_thread(embedded.start_postgres, settings.data_dir)
    owner = await embedded.owner_database_url(server)
    return Secrets(
        dsn=embedded.with_user(owner, embedded.LOGIN_ROLE),
        migrations_dsn=owner,
        encryption_keys=settings.encryption_keys or embedded.secret(settings.data_dir, "encryption.key", generate_key),
        jwt_secret=settings.jwt_secret or embedded.secret(settings.data_dir, "jwt.secret", generate_jwt_secret),
        provision_login_role=embedded.LOGIN_ROLE,
        embedded_postgres=server,
    )


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise ConfigError(
                "DEADLETTER_TLS_CLIENT_CA_FILE needs DEADLETTER_TLS_CERT_FILE and DEADLETTER_TLS_KEY_FILE"
            )
        return None
    try:
        chain = settings.tls_cert_file.read_bytes()
        key = settings.tls_key_file.read_bytes()
        client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    except OSError as error:
        raise ConfigError(f"cannot read a TLS file: {error.filename}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _grpc_server(
    settings: Settings, vault: Vault, access_interceptor: AccessInterceptor
) -> tuple[grpc.aio.Server, HealthServicer]:
    receive_limit = settings.max_payload_bytes + REQUEST_OVERHEAD_BYTES
    server = grpc.aio.server(
        # The status interceptor is outermost, so refusals are mapped and logged like every other outcome.
        interceptors=[StatusInterceptor((f"/{SERVICE_NAME}/",)), access_interceptor],
        # Only the receive side is capped: a List page of 1,000 rows may legitimately be larger than a Store.
        options=[("grpc.max_receive_message_length", receive_limit)],
    )
    deadletter_pb2_grpc.add_DeadLetterServiceServicer_to_server(
        DeadLetterServicer(vault, settings.max_payload_bytes, settings.retention_days, settings.purge_min_age_days),
        server,
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer
