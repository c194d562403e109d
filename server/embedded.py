"""The zero-configuration mode: a private PostgreSQL (pgserver) and generated secrets in a local data folder.

Only for development and trying the service out. Secrets generated here sit next to the data they protect, so
a production deployment sets DATABASE_URL and DEADLETTER_ENCRYPTION_KEYS instead (config refuses to start
otherwise).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.config import ConfigError

log = logging.getLogger("deadletter.embedded")

DATABASE = "deadletter"
# The embedded mode's server logs in as this role, never as the superuser that owns the tables.
LOGIN_ROLE = "deadletter_app"


def start_postgres(data_dir: Path) -> Any:
    """Start (or reuse) the private PostgreSQL under data_dir/postgres; it stops when this process exits."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes without it.
        warnings.simplefilter("ignore")
        import pgserver  # here, not at the top: only the embedded mode needs it

        return pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")


async def owner_database_url(server: Any) -> str:
    """Create the service's database in the embedded server if needed and return the owner's DSN."""
    conn = await asyncpg.connect(server.get_uri("postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    uri: str = server.get_uri(DATABASE)
    return uri


def with_user(dsn: str, user: str) -> str:
    """The same DSN logging in as another user (no password: the embedded server trusts local sockets)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


def secret(data_dir: Path, name: str, generate: Callable[[], str]) -> str:
    """Read data_dir/name, or create it (mode 0600) with generate() and warn that it was generated."""
    path = data_dir / name
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        value = path.read_text(encoding="ascii").strip()
        if not value:
            raise ConfigError(f"{path} is empty: delete it to generate a new secret (data sealed with it is lost)")
        return value
    value = generate()
    # Written whole to a temporary file, then linked into place: a crash never leaves a half-written secret,
    # and two processes starting at once agree on one (the loser of the link reads the winner's).
    temporary = data_dir / f".{name}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(value + "\n")
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    finally:
        temporary.unlink()
    log.warning(
        "generated a new secret for the embedded mode; production must configure its own",
        extra={"file": str(path)},
    )
    return value
