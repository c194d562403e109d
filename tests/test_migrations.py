"""Migrations: the spec's table, applied once under a lock, safe to rerun, refusing edited history."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from server.config import PROJECT_ROOT
from server.migrate import MigrationError, migrate

MIGRATIONS = PROJECT_ROOT / "migrations"

SPEC_COLUMNS = {
    "id": "uuid",
    "event_id": "text",
    "provider": "text",
    "received_at": "timestamp with time zone",
    "correlation_id": "text",
    "payload_encrypted": "text",
    "error_message": "text",
    "retry_count": "integer",
    "failed_at": "timestamp with time zone",
}


async def test_migrate_twice_applies_once(empty_database_url: str) -> None:
    first = await migrate(empty_database_url, MIGRATIONS)
    second = await migrate(empty_database_url, MIGRATIONS)
    assert first == sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    assert second == []


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*[migrate(empty_database_url, MIGRATIONS) for _ in range(4)])
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(p.name for p in MIGRATIONS.glob("*.sql"))
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM deadletter_schema_migrations") == len(applied)
    finally:
        await conn.close()


async def test_spec_columns_exist_with_their_types_all_not_null(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_name = 'dead_letter_queue'"
    )
    columns = {r["column_name"]: r for r in rows}
    for name, data_type in SPEC_COLUMNS.items():
        assert columns[name]["data_type"] == data_type, name
        assert columns[name]["is_nullable"] == "NO", name
    assert columns["id"]["column_default"] == "gen_random_uuid()"


async def test_spec_constraints_are_enforced_by_the_database(db: asyncpg.Connection) -> None:
    insert = (
        "INSERT INTO dead_letter_queue (event_id, provider, received_at, correlation_id, payload_encrypted,"
        " headers_encrypted, payload_size_bytes, error_message, retry_count)"
        " VALUES ('e', $1, now(), 'c', 'v1.x.y', 'v1.x.y', 1, 'err', $2)"
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "telegram", 0)
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, "whatsapp", -1)
    await db.execute(insert, "whatsapp", 0)


async def test_indexes_cover_provider_failed_at_and_event_id(db: asyncpg.Connection) -> None:
    definitions = [
        r["indexdef"] for r in await db.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'dead_letter_queue'")
    ]
    leading = {d.split("(", 1)[1].split(")")[0].split(",")[0].split()[0] for d in definitions}
    assert {"provider", "failed_at", "event_id", "id"} <= leading


async def test_edited_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    await migrate(empty_database_url, folder)
    first = sorted(folder.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(empty_database_url, folder)


async def test_badly_named_file_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    (tmp_path / "create_things.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_lowercase_name\.sql"):
        await migrate(empty_database_url, tmp_path)


async def test_a_failing_migration_leaves_nothing_behind(empty_database_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE good (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int); SELECT no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(empty_database_url, tmp_path)
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('good') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
        assert await conn.fetchval("SELECT array_agg(version) FROM deadletter_schema_migrations") == ["0001"]
    finally:
        await conn.close()


async def test_the_audit_id_index_has_no_pending_list(db: asyncpg.Connection) -> None:
    # With GIN's pending list, one insert every few thousand paid ~0.5 s to merge it (migrations/0007).
    options = await db.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'audit_log_dead_letter_ids_idx'")
    assert options == ["fastupdate=off"]
