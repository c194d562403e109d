"""Shared fixtures: a real PostgreSQL, a fresh database per test, and the real server on a real gRPC channel.

PostgreSQL is DATABASE_URL when set (the role must be able to create databases), otherwise a private pgserver
instance for the session. Migrations run once into a template database; each test gets its own copy of it.
"""

from __future__ import annotations

import os

# Before grpc is imported: its fork handlers run in every child these tests fork (pgserver's pg_ctl, servers,
# grpcurl) while gRPC threads are busy, and have crashed a pg_ctl child with SIGSEGV. No test needs them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
import pytest

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.auth import Role, generate_jwt_secret, mint_token
from server.config import PROJECT_ROOT, Settings
from server.crypto import generate_key
from server.embedded import with_user
from server.migrate import migrate, provision_login_role

# The server's login role in tests: LOGIN NOINHERIT, no privilege but membership of the two access roles.
APP_ROLE = "deadletter_test_app"

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub
else:
    Stub = Any

SAMPLES_DIR = Path(__file__).parent / "samples" / "webhooks"
PROVIDERS = {
    "facebook": pb.PROVIDER_FACEBOOK,
    "instagram": pb.PROVIDER_INSTAGRAM,
    "whatsapp": pb.PROVIDER_WHATSAPP,
}


@dataclass(frozen=True)
class Sample:
    file: str
    provider: str
    headers: dict[str, str]
    body: bytes
    signature_valid: bool

    def store_request(self, **overrides: Any) -> pb.StoreRequest:
        request = pb.StoreRequest(
            event_id=f"evt-{self.file}",
            provider=PROVIDERS[self.provider],
            payload=self.body,
            headers=self.headers,
            error_message="downstream CRM answered 503 after 3 attempts",
            retry_count=3,
            correlation_id=f"corr-{uuid.uuid4()}",
            idempotency_key="",
        )
        request.received_at.FromJsonString("2026-12-01T09:30:00.123456Z")
        for name, value in overrides.items():
            if name == "headers":
                request.headers.clear()
                request.headers.update(value)
            elif name == "received_at":
                request.ClearField("received_at")
                if value is not None:
                    request.received_at.CopyFrom(value)
            else:
                setattr(request, name, value)
        return request


def load_samples() -> list[Sample]:
    manifest = json.loads((SAMPLES_DIR / "manifest.json").read_text(encoding="utf-8"))
    return [
        Sample(s["file"], s["provider"], s["headers"], (SAMPLES_DIR / s["file"]).read_bytes(), s["signature_valid"])
        for s in manifest["samples"]
    ]


SAMPLES = load_samples()


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN with the right to create databases: DATABASE_URL, or a private PostgreSQL for this session."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        with tempfile.TemporaryDirectory(prefix="deadletter-test-pg-") as folder:
            server = pgserver.get_server(folder, cleanup_mode="stop")
            try:
                yield server.get_uri("postgres")
            finally:
                server.cleanup()


@pytest.fixture(scope="session")
async def template_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"deadletter_template_{uuid.uuid4().hex[:12]}"
    await _admin(admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        await migrate(with_database(admin_dsn, name), PROJECT_ROOT / "migrations")
        await provision_login_role(admin_dsn, APP_ROLE)
        yield name
    finally:
        await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def _fresh_database(admin_dsn: str, prefix: str, template: str | None = None) -> AsyncIterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _admin(admin_dsn, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield with_database(admin_dsn, name)
    finally:
        await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def owner_database_url(admin_dsn: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, as its owner (the DSN migrations use)."""
    async with _fresh_database(admin_dsn, "deadletter_test", template_database) as dsn:
        yield dsn


@pytest.fixture
def database_url(owner_database_url: str) -> str:
    """The test's database as the server sees it: through its unprivileged login role."""
    return with_user(owner_database_url, APP_ROLE)


@pytest.fixture
async def empty_database_url(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    async with _fresh_database(admin_dsn, "deadletter_empty") as dsn:
        yield dsn


@pytest.fixture
async def db(owner_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database as its owner, for checking what was (not) written."""
    conn = await asyncpg.connect(owner_database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def encryption_key() -> str:
    return generate_key()


JWT_SECRET = generate_jwt_secret()


def token(role: Role = Role.SERVICE, subject: str = "test-worker", ttl: int = 600) -> str:
    return mint_token(JWT_SECRET, role, subject, ttl)


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds 'authorization: Bearer <token>' to every call on a channel."""

    def __init__(self, bearer: str) -> None:
        self._metadata = (("authorization", f"Bearer {bearer}"),)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self._metadata)
        return await continuation(details, request)


def channel_to(address: str, bearer: str | None = None, **kwargs: Any) -> grpc.aio.Channel:
    interceptors: Any = [BearerToken(bearer)] if bearer else None
    options = [("grpc.max_send_message_length", 64 << 20)]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors, **kwargs)


def settings_for(database_url: str, encryption_keys: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "encryption_keys": encryption_keys,
        "jwt_secret": JWT_SECRET,
        "listen": "127.0.0.1:0",
        "migrate_on_start": False,
        "db_acquire_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 1.0,
        "metrics_listen": None,  # many servers share this process; tests/test_operations.py scrapes its own
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def serving(database_url: str, encryption_keys: str, **overrides: Any) -> AsyncIterator[Stub]:
    """A server started with these settings, and a service-role stub to it; stopped on exit."""
    application = await app.start(settings_for(database_url, encryption_keys, **overrides))
    try:
        async with channel_to(application.address, token()) as channel:
            yield pb_grpc.DeadLetterServiceStub(channel)
    finally:
        await application.stop(0)


@pytest.fixture
async def server(database_url: str, encryption_key: str) -> AsyncIterator[app.Application]:
    application = await app.start(settings_for(database_url, encryption_key))
    try:
        yield application
    finally:
        await application.stop(0)


@pytest.fixture
async def channel(server: app.Application) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that calls as the service role."""
    async with channel_to(server.address, token(Role.SERVICE)) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return pb_grpc.DeadLetterServiceStub(channel)


@pytest.fixture
async def admin_stub(server: app.Application) -> AsyncIterator[Stub]:
    async with channel_to(server.address, token(Role.ADMIN, "compliance-officer@clinic.example")) as channel:
        yield pb_grpc.DeadLetterServiceStub(channel)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, every: float = 0.2) -> bool:
    """Poll check until it holds or within seconds pass; return its last answer."""
    for _ in range(max(1, int(within / every))):
        if await check():
            return True
        await asyncio.sleep(every)
    return await check()


async def row_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM dead_letter_queue")
    return count


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
