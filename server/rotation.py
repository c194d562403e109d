"""Key rotation: re-encrypt every sealed value under the keyring's primary (newest) key, while the service runs.

``python -m server rotate-keys`` with DEADLETTER_ENCRYPTION_KEYS listing the new key first and the old ones after
it. Both tables that hold sealed values are rotated: dead_letter_queue (associated data: its own id) and
webhook_queue (associated data: the dead letter's id, not the queue row's).

- **Batches.** Each batch is one transaction as the service database role: it locks up to ``batch_size`` rows
  still sealed under another key, in id order, with ``FOR UPDATE SKIP LOCKED`` (so it never waits for, nor
  blocks, Store, Reprocess, ClaimQueued or the relay), opens each value with the key it names, seals it under the
  primary key, and writes it back only if it is still the value that was read. It commits per batch.
- **Resumable.** Rows are chosen by the key id in their sealed values, so a run stopped at any point (Ctrl-C, a
  database outage, ``max_batches``) is continued by running the command again; nothing is recorded elsewhere.
- **Rows it cannot rotate** are never rewritten: values that fail authentication (RecordCorrupted: they already
  answer DATA_LOSS) and values under a key missing from the keyring. They are counted and reported by id.
- **Done** means nothing is left under a non-primary key in either table; only then may the old keys be removed.
  Rows skipped because a request held them locked are picked up by another pass over the table.

Never print or log payloads, headers or keys: output names tables, record ids, counts and key ids (public HMACs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from server.app import database_and_secrets, prepare_database
from server.auth import Role
from server.config import ConfigError, Settings
from server.crypto import Keyring
from server.errors import DatabaseUnavailable, KeyUnavailable, RecordCorrupted
from server.migrate import MigrationError, check_login_role
from server.store import Store, Transaction, create_pool
from server.vault import HEADERS_FIELD, PAYLOAD_FIELD

log = logging.getLogger("deadletter.rotation")

DEFAULT_BATCH_SIZE = 100
SUBJECT = "key-rotation"  # app.actor of the rotation's transactions
# Passes over both tables before giving up on rows other transactions keep locked (the rerun continues).
MAX_PASSES = 20
RETRY_SECONDS = 0.5
# The keyset cursor's start. Ids are random (version 4) UUIDs, so none equals the nil UUID.
_START = uuid.UUID(int=0)
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_LISTED_IDS = 100  # record ids listed per table and kind in the summary; the counts are always complete

TABLES = ("dead_letter_queue", "webhook_queue")


@dataclass
class TableReport:
    """What a run did to one table, and what is left in it under an older key."""

    table: str
    rotated: int = 0
    corrupted: list[str] = field(default_factory=list)  # row ids whose values fail authentication
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (row id, key id) for keys not in the keyring
    remaining: dict[str, int] = field(default_factory=dict)  # key id -> rows still sealed under it

    @property
    def skipped_ids(self) -> list[str]:
        return self.corrupted + [row_id for row_id, _ in self.unavailable]


@dataclass
class RotationReport:
    primary_id: str
    tables: list[TableReport]
    batches: int = 0
    stopped_early: bool = False  # max_batches reached

    @property
    def remaining(self) -> int:
        return sum(sum(t.remaining.values()) for t in self.tables)

    @property
    def complete(self) -> bool:
        """Nothing is sealed under a key other than the primary: the older keys may be removed."""
        return self.remaining == 0

    def table(self, name: str) -> TableReport:
        return next(t for t in self.tables if t.table == name)

    def summary(self) -> str:
        """A human summary: tables, counts, record ids and key ids only."""
        lines = [f"Key rotation to key {self.primary_id}: {self.batches} batch(es) committed."]
        for t in self.tables:
            lines.append(
                f"  {t.table}: {t.rotated} re-encrypted, {len(t.corrupted)} corrupted (skipped), "
                f"{len(t.unavailable)} under a key not in the keyring (skipped); "
                f"still under an older key: {_by_key(t.remaining)}"
            )
        for t in self.tables:
            if t.corrupted:
                lines.append(
                    f"  {t.table}: failed their integrity check (answer DATA_LOSS; never rewritten): "
                    + _listed(t.corrupted)
                )
            if t.unavailable:
                lines.append(
                    f"  {t.table}: sealed under a key missing from DEADLETTER_ENCRYPTION_KEYS (add it back and "
                    "rerun): " + _listed([f"{row_id} (key {kid})" for row_id, kid in t.unavailable])
                )
        if self.complete:
            lines.append(
                f"Done: every record is sealed under {self.primary_id}; "
                "older keys may now be removed from DEADLETTER_ENCRYPTION_KEYS."
            )
        else:
            why = "stopped after the batch limit; " if self.stopped_early else ""
            lines.append(
                f"Not done: {self.remaining} record(s) still sealed under an older key ({why}rerun to continue). "
                "Keep the older keys in DEADLETTER_ENCRYPTION_KEYS."
            )
        return "\n".join(lines)


async def rotate(
    store: Store,
    keyring: Keyring,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
    max_passes: int = MAX_PASSES,
    retry_seconds: float = RETRY_SECONDS,
) -> RotationReport:
    """Re-encrypt under keyring's primary key; return what was done and what remains."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return await _Rotation(store, keyring, batch_size, max_batches).run(max_passes, retry_seconds)


async def rotate_database(
    settings: Settings, *, batch_size: int = DEFAULT_BATCH_SIZE, max_batches: int | None = None
) -> RotationReport:
    """Rotate the database and keys the settings name, through the server's own login role and a small pool.

    Raises ConfigError, MigrationError (a privileged or unprovisioned login role) or DatabaseUnavailable.
    """
    secrets = await database_and_secrets(settings)
    try:
        keyring = Keyring.parse(secrets.encryption_keys)
        await prepare_database(settings, secrets)  # an embedded data folder may never have been served
        pool = await create_pool(dataclasses.replace(settings, db_pool_min_size=1, db_pool_max_size=2), secrets.dsn)
        try:
            async with pool.acquire() as conn:
                await check_login_role(conn)
            store = Store(pool, settings.db_acquire_timeout_seconds)
            return await rotate(store, keyring, batch_size=batch_size, max_batches=max_batches)
        finally:
            await pool.close()
    finally:
        if secrets.embedded_postgres is not None:
            await asyncio.to_thread(secrets.embedded_postgres.cleanup)


async def run(settings: Settings, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """``python -m server rotate-keys``: 0 when nothing is left under an older key, 1 when something is, 2 on bad
    configuration. Prints the summary on stdout; progress goes to the log."""
    if batch_size < 1:
        print("deadletter: rotate-keys: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        report = await rotate_database(settings, batch_size=batch_size)
    except (ConfigError, MigrationError) as error:
        print(f"deadletter: rotate-keys: {error}", file=sys.stderr)
        return 2
    except DatabaseUnavailable:
        log.exception("key rotation interrupted: the database is unreachable; rerun to continue")
        return 1
    except asyncpg.PostgresError:
        # By type and stack only: driver messages can quote query values (see server/logs.py).
        log.exception("key rotation failed; batches committed so far stay rotated, rerun to continue")
        return 1
    print(report.summary(), flush=True)
    return 0 if report.complete else 1


@dataclass(frozen=True)
class _Resealed:
    id: uuid.UUID
    old_payload: str
    old_headers: str
    payload: str
    headers: str


class _Rotation:
    def __init__(self, store: Store, keyring: Keyring, batch_size: int, max_batches: int | None) -> None:
        self._store = store
        self._keyring = keyring
        self._batch_size = batch_size
        self._max_batches = max_batches
        self._report = RotationReport(keyring.primary_id, [TableReport(name) for name in TABLES])

    async def run(self, max_passes: int, retry_seconds: float) -> RotationReport:
        report = self._report
        for number in range(max(max_passes, 1)):
            rotated_before = sum(t.rotated for t in report.tables)
            for table in report.tables:
                if not await self._pass(table):
                    report.stopped_early = True
                    break
            if report.stopped_early or await self._pending() == 0:
                break
            # Rows remain that this pass did not reach: locked by requests in flight, or written under an older key
            # meanwhile (a replica not yet restarted with the new keyring). Pass again; pause if nothing moved.
            if sum(t.rotated for t in report.tables) == rotated_before and number + 1 < max_passes:
                await asyncio.sleep(retry_seconds)
        await self._count_remaining()
        return report

    async def _pass(self, table: TableReport) -> bool:
        """One keyset pass over a table; False if the batch limit stopped it."""
        after = _START
        while True:
            if self._max_batches is not None and self._report.batches >= self._max_batches:
                return False
            last, full = await self._batch(table, after)
            if last is None:
                return True
            self._report.batches += 1
            if not full:
                return True
            after = last

    async def _batch(self, table: TableReport, after: uuid.UUID) -> tuple[uuid.UUID | None, bool]:
        """Rotate one batch in one transaction; return the last id it locked (None: none) and whether it was full."""
        primary = self._keyring.primary_id
        corrupted: list[str] = []
        unavailable: list[tuple[str, str]] = []
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            rows = await tx.fetch_named(
                f"rotation_batch_{table.table}",
                primary,
                after,
                [uuid.UUID(i) for i in table.skipped_ids],
                self._batch_size,
            )
            resealed: list[_Resealed] = []
            for row in rows:
                try:
                    resealed.append(self._reseal(row))
                except RecordCorrupted:
                    corrupted.append(str(row["id"]))
                except KeyUnavailable as error:
                    unavailable.append((str(row["id"]), error.key_id))
            written = await _write(tx, table.table, resealed) if resealed else 0
        # Counted only once the batch has committed.
        table.rotated += written
        table.corrupted += corrupted
        table.unavailable += unavailable
        if rows:
            log.info(
                "key rotation batch committed",
                extra={
                    "table": table.table,
                    "rotated": written,
                    "skipped": len(corrupted) + len(unavailable),
                    "rotated_total": table.rotated,
                },
            )
        return (rows[-1]["id"] if rows else None), len(rows) == self._batch_size

    def _reseal(self, row: asyncpg.Record) -> _Resealed:
        record_id = str(row["record_id"])
        old_payload: str = row["payload_encrypted"]
        old_headers: str = row["headers_encrypted"]
        # Both values are opened before either is resealed: a record with one bad value is skipped whole.
        payload = self._open_if_behind(old_payload, record_id, PAYLOAD_FIELD)
        headers = self._open_if_behind(old_headers, record_id, HEADERS_FIELD)
        return _Resealed(
            row["id"],
            old_payload,
            old_headers,
            old_payload if payload is None else self._keyring.seal(payload, record_id, PAYLOAD_FIELD),
            old_headers if headers is None else self._keyring.seal(headers, record_id, HEADERS_FIELD),
        )

    def _open_if_behind(self, value: str, record_id: str, field_name: str) -> bytes | None:
        """The plaintext of a value sealed under an older key; None if it is already under the primary key."""
        if _key_id_of(value) == self._keyring.primary_id:
            return None
        return self._keyring.open(value, record_id, field_name)

    async def _pending(self) -> int:
        total = 0
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            for table in self._report.tables:
                skipped = [uuid.UUID(i) for i in table.skipped_ids]
                rows = await tx.fetch_named(f"rotation_pending_{table.table}", self._keyring.primary_id, skipped)
                total += int(rows[0][0])
        return total

    async def _count_remaining(self) -> None:
        async with self._store.transaction(Role.SERVICE, SUBJECT) as tx:
            for table in self._report.tables:
                rows = await tx.fetch_named(f"rotation_remaining_{table.table}", self._keyring.primary_id)
                remaining: dict[str, int] = {}
                for row in rows:
                    # A malformed value's "key id" is whatever it holds: never print that.
                    kid = row["key_id"] if _KEY_ID.match(row["key_id"]) else "(malformed)"
                    remaining[kid] = remaining.get(kid, 0) + row["records"]
                table.remaining = remaining


async def _write(tx: Transaction, table: str, resealed: Sequence[_Resealed]) -> int:
    updated = await tx.fetch_named(
        f"rotation_reseal_{table}",
        [r.id for r in resealed],
        [r.old_payload for r in resealed],
        [r.old_headers for r in resealed],
        [r.payload for r in resealed],
        [r.headers for r in resealed],
    )
    return len(updated)


def _key_id_of(value: str) -> str:
    """The key id field of a sealed value, as SQL's split_part(value, '.', 2) reads it."""
    parts = value.split(".", 2)
    return parts[1] if len(parts) > 1 else ""


def _by_key(remaining: dict[str, int]) -> str:
    return ", ".join(f"{count} under {kid}" for kid, count in sorted(remaining.items())) or "none"


def _listed(ids: list[str]) -> str:
    shown = ", ".join(ids[:_LISTED_IDS])
    return shown + (f" and {len(ids) - _LISTED_IDS} more" if len(ids) > _LISTED_IDS else "")
