"""PostgreSQL for the benchmark, found the way the tests find it, and a fresh migrated database on it.

DATABASE_URL when set (its role must be able to create databases), otherwise a private pgserver in a
temporary directory. The benchmark database is migrated like the tests' template, the server gets its own
login role (provision_login_role), and the database is dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.config import PROJECT_ROOT
from server.embedded import with_user
from server.migrate import migrate, provision_login_role

LOGIN_ROLE = "deadletter_bench_app"


@dataclass(frozen=True)
class Postgres:
    admin_dsn: str
    mode: str


@dataclass(frozen=True)
class Database:
    """The benchmark's database: as its owner (bulk loads, counts) and as the server's login role."""

    name: str
    owner_dsn: str
    server_dsn: str
    version: str
    settings: str


@contextlib.asynccontextmanager
async def postgres() -> AsyncIterator[Postgres]:
    external = os.environ.get("DATABASE_URL")
    if external:
        yield Postgres(external, f"DATABASE_URL ({_redacted(external)})")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        with tempfile.TemporaryDirectory(prefix="deadletter-bench-pg-") as folder:
            server = await asyncio.to_thread(pgserver.get_server, folder, cleanup_mode="stop")
            try:
                yield Postgres(server.get_uri("postgres"), "embedded (pgserver in a temporary directory)")
            finally:
                await asyncio.to_thread(server.cleanup)


@contextlib.asynccontextmanager
async def bench_database(pg: Postgres) -> AsyncIterator[Database]:
    name = f"deadletter_bench_{uuid.uuid4().hex[:12]}"
    await _execute(pg.admin_dsn, f'CREATE DATABASE "{name}"')
    try:
        owner_dsn = with_database(pg.admin_dsn, name)
        await migrate(owner_dsn, PROJECT_ROOT / "migrations")
        await provision_login_role(owner_dsn, LOGIN_ROLE)
        conn = await asyncpg.connect(owner_dsn)
        try:
            version: str = await conn.fetchval("SHOW server_version")
            settings = ", ".join(
                [f"{s} {await conn.fetchval(f'SHOW {s}')}" for s in ("shared_buffers", "synchronous_commit")]
            )
            # The benchmark loads and counts rows as the owner. A superuser bypasses row-level security; an
            # owner that is not one would see no rows under FORCE (no policy names it), so lift FORCE for it.
            # The server's role is not the owner: its policies apply either way.
            if not await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"):
                await conn.execute("ALTER TABLE dead_letter_queue NO FORCE ROW LEVEL SECURITY")
        finally:
            await conn.close()
        yield Database(name, owner_dsn, with_user(owner_dsn, LOGIN_ROLE), version.split()[0], settings)
    finally:
        await _execute(pg.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def row_count(owner_dsn: str) -> int:
    conn = await asyncpg.connect(owner_dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM dead_letter_queue")
        return count
    finally:
        await conn.close()


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    user, at, host = parts.netloc.rpartition("@")
    if ":" in user:
        user = user.split(":", 1)[0] + ":***"
    return urlunsplit((parts.scheme, user + at + host, parts.path, "", ""))


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
