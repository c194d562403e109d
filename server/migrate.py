"""Schema migrations: ordered plain .sql files, each applied once in its own transaction, recorded by version.

Run under a PostgreSQL advisory lock, so replicas starting together apply each migration once; safe to run any
number of times. A recorded migration whose file has since changed stops everything: edit history with a new
file, never by rewriting an applied one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from server.store import translate_errors

log = logging.getLogger("deadletter.migrate")

# Any fixed 64-bit number works; this one is the first 8 bytes of sha256("deadletter migrations").
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"deadletter migrations").digest()[:8], "big", signed=True)
_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS deadletter_schema_migrations (
    version    TEXT        PRIMARY KEY,
    name       TEXT        NOT NULL,
    checksum   TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migrations folder or the recorded history is inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def load(folder: Path) -> list[Migration]:
    """Read NNNN_name.sql files in version order; other files are an error, not silently skipped."""
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        migrations.append(Migration(match.group(1), path.name, path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations in {folder} share a version number")
    if not migrations:
        raise MigrationError(f"no migrations found in {folder}")
    return migrations


async def migrate(dsn: str, folder: Path) -> list[str]:
    """Apply pending migrations; return the names of those applied now."""
    migrations = load(folder)
    with translate_errors():
        conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_pending(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(_CREATE_TABLE)
    recorded = {
        row["version"]: row["checksum"]
        for row in await conn.fetch("SELECT version, checksum FROM deadletter_schema_migrations")
    }
    applied = []
    for migration in migrations:
        if migration.version in recorded:
            if recorded[migration.version] != migration.checksum:
                raise MigrationError(f"{migration.name} changed after it was applied; add a new migration instead")
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO deadletter_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("migration applied", extra={"migration": migration.name})
        applied.append(migration.name)
    return applied


_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def provision_login_role(owner_dsn: str, name: str) -> None:
    """Create (if needed) the server's login role: LOGIN, NOINHERIT, member of both access roles, nothing else.

    Production databases do the same by hand (see the README); the embedded mode and the tests call this.
    """
    if not _ROLE_NAME.match(name):
        raise MigrationError(f"login role name {name!r} must be a lowercase SQL identifier")
    with translate_errors():
        conn = await asyncpg.connect(owner_dsn)
    try:
        # Identifiers cannot be bound as parameters; the name was checked against _ROLE_NAME above.
        await conn.execute(
            f"""
            DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
                    CREATE ROLE {name} LOGIN NOINHERIT;
                END IF;
            END $$;
            ALTER ROLE {name} NOINHERIT NOSUPERUSER NOBYPASSRLS;
            GRANT deadletter_service, deadletter_admin TO {name};
            """
        )
    finally:
        await conn.close()


async def check_login_role(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Refuse a login role that could bypass row-level security or the grants, or cannot act as both roles.

    Not merely "is it a superuser": membership counts too (of a superuser or BYPASSRLS role, of a table's owner),
    and so does any table privilege the login role can use without SET ROLE.
    """
    name: str = await conn.fetchval("SELECT current_user")
    if not await conn.fetchval("SELECT to_regclass('dead_letter_queue') IS NOT NULL"):
        raise MigrationError("dead_letter_queue does not exist: run `python -m server migrate` as the owner first")
    row = await conn.fetchrow(
        """
        SELECT EXISTS (SELECT 1 FROM pg_roles s
                       WHERE (s.rolsuper OR s.rolbypassrls) AND pg_has_role(current_user, s.oid, 'MEMBER'))
                   AS privileged,
               EXISTS (SELECT 1 FROM pg_class c
                       WHERE c.oid IN ('dead_letter_queue'::regclass, 'audit_log'::regclass,
                                       'webhook_queue'::regclass)
                         AND pg_has_role(current_user, c.relowner, 'MEMBER'))
                   AS owner,
               has_table_privilege(current_user, 'dead_letter_queue', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
               OR has_table_privilege(current_user, 'audit_log', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
                   AS holds_privileges,
               pg_has_role(current_user, 'deadletter_service', 'MEMBER')
               AND pg_has_role(current_user, 'deadletter_admin', 'MEMBER') AS member
        """
    )
    assert row is not None
    if row["privileged"] or row["owner"] or row["holds_privileges"]:
        raise MigrationError(
            f"DATABASE_URL logs in as {name}, which is (or is a member of) a superuser, a BYPASSRLS role or the "
            "tables' owner, or holds table privileges without SET ROLE; connect as a login role made for the "
            "server (see the README, 'Database roles')"
        )
    if not row["member"]:
        raise MigrationError(f"login role {name} must be granted deadletter_service and deadletter_admin")
