"""Configuration: every setting read from the environment and validated here, once, at start.

Variables share the DEADLETTER_ prefix, except DATABASE_URL, which keeps the name every tool and platform
already uses. A bad value stops the server with a message naming the variable; values are never echoed,
because some of them are secrets.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "DEADLETTER_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Validated settings. Build with from_env(); tests construct it directly."""

    database_url: str | None = None
    # The table owner's DSN, for migrations; the server's own login role must not own the tables.
    migrations_database_url: str | None = None
    listen: str = "127.0.0.1:50051"
    # Comma-separated base64 keys, newest first; parsed into a Keyring by server.crypto.
    encryption_keys: str | None = None
    data_dir: Path = PROJECT_ROOT / ".deadletter"
    migrations_dir: Path = PROJECT_ROOT / "migrations"
    migrate_on_start: bool = True
    max_payload_bytes: int = 1024 * 1024
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    db_acquire_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    jwt_secret: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 30.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    allow_plaintext: bool = False
    # What `python -m server healthcheck` trusts and presents when the server speaks TLS.
    healthcheck_ca_file: Path | None = None
    healthcheck_cert_file: Path | None = None
    healthcheck_key_file: Path | None = None
    # Meta app secrets, comma-separated; when set, Reprocess verifies x-hub-signature-256 against them.
    meta_app_secrets: str | None = None
    redrive_max_per_second: int = 50
    redrive_max_batch: int = 10_000
    purge_batch_size: int = 5_000
    purge_rest_percent: int = 200
    purge_min_age_days: int = 1
    retention_days: int = 90
    retention_cron: str = "0 3 * * *"
    retention_enabled: bool = True
    rabbitmq_url: str | None = None
    rabbitmq_queue: str = "deadletter.reprocess"
    # host:port for Prometheus metrics (port 0 picks one); None turns them off.
    metrics_listen: str | None = "127.0.0.1:9464"
    health_check_seconds: float = 5.0
    metrics_refresh_seconds: float = 30.0

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def embedded(self) -> bool:
        """True when no database is configured and the server runs its own PostgreSQL."""
        return self.database_url is None


Read = Callable[["_Reader", str, Any], Any]  # (reader, variable name, the Settings default) -> value


def _text(reader: _Reader, name: str, default: Any) -> Any:
    return reader.text(name) or default


def _path(reader: _Reader, name: str, default: Any) -> Any:
    value = reader.text(name)
    return Path(value).expanduser().resolve() if value else default


def _boolean(reader: _Reader, name: str, default: Any) -> Any:
    return reader.boolean(name, default)


def _integer(low: int, high: int) -> Read:
    return lambda reader, name, default: reader.integer(name, default, low, high)


def _seconds(*, allow_zero: bool = False, high: float = 3600) -> Read:
    return lambda reader, name, default: reader.seconds(name, default, allow_zero=allow_zero, high=high)


def _log_level(reader: _Reader, name: str, default: Any) -> Any:
    return reader.choice(name, default, ("DEBUG", "INFO", "WARNING", "ERROR"))


def _metrics_listen(reader: _Reader, name: str, default: Any) -> Any:
    value = reader.text(name)
    if value is None:
        return default
    if value.lower() in ("off", "false", "0", "none"):
        return None
    _check_listen(value, name)
    return value


@dataclass(frozen=True)
class _Var:
    name: str
    field: str  # of Settings, whose default is the value when the variable is unset
    read: Read
    default: str  # as the README shows it
    help: str


# The single list of settings: from_env reads them from it and the README's table is written from it
# (python -m server settings).
VARIABLES: tuple[_Var, ...] = (
    _Var(
        "DATABASE_URL",
        "database_url",
        _text,
        "(unset: embedded PostgreSQL)",
        "PostgreSQL DSN, passed to asyncpg untouched.",
    ),
    _Var(PREFIX + "LISTEN", "listen", _text, "127.0.0.1:50051", "host:port the gRPC server binds."),
    _Var(
        PREFIX + "ENCRYPTION_KEYS",
        "encryption_keys",
        _text,
        "(required with DATABASE_URL)",
        "Comma-separated base64 AES-256 keys (32 bytes each), newest first; the first encrypts.",
    ),
    _Var(
        PREFIX + "MIGRATIONS_DATABASE_URL",
        "migrations_database_url",
        _text,
        "(unset: no migrations at start)",
        "DSN of the tables' owner, for migrations. The server's own DATABASE_URL role must not own them.",
    ),
    _Var(
        PREFIX + "JWT_SECRET",
        "jwt_secret",
        _text,
        "(required with DATABASE_URL, or a public key)",
        "HS256 secret (32+ bytes) that verifies callers' bearer tokens.",
    ),
    _Var(
        PREFIX + "JWT_PUBLIC_KEY_FILE",
        "jwt_public_key_file",
        _path,
        "(unset)",
        "PEM RSA or P-256 public key: RS256/ES256 tokens.",
    ),
    _Var(PREFIX + "JWT_ISSUER", "jwt_issuer", _text, "(unset: not checked)", "Required iss claim."),
    _Var(PREFIX + "JWT_AUDIENCE", "jwt_audience", _text, "(unset: not checked)", "Required aud claim."),
    _Var(
        PREFIX + "JWT_LEEWAY_SECONDS",
        "jwt_leeway_seconds",
        _seconds(allow_zero=True, high=120),
        "30",
        "Clock skew allowed on exp, nbf and iat (at most 120).",
    ),
    _Var(PREFIX + "TLS_CERT_FILE", "tls_cert_file", _path, "(unset: plaintext)", "PEM certificate chain; serve TLS."),
    _Var(PREFIX + "TLS_KEY_FILE", "tls_key_file", _path, "(unset)", "PEM private key of the certificate."),
    _Var(
        PREFIX + "TLS_CLIENT_CA_FILE",
        "tls_client_ca_file",
        _path,
        "(unset: no client certificates)",
        "PEM CA; require client certificates (mTLS).",
    ),
    _Var(
        PREFIX + "ALLOW_PLAINTEXT",
        "allow_plaintext",
        _boolean,
        "false",
        "Serve plaintext on a non-loopback address (only behind something that encrypts, e.g. a mesh).",
    ),
    _Var(
        PREFIX + "HEALTHCHECK_CA_FILE",
        "healthcheck_ca_file",
        _path,
        "(unset)",
        "With TLS: the CA `healthcheck` trusts (the server's name: localhost).",
    ),
    _Var(
        PREFIX + "HEALTHCHECK_CERT_FILE",
        "healthcheck_cert_file",
        _path,
        "(unset)",
        "With mTLS: the client certificate `healthcheck` presents.",
    ),
    _Var(PREFIX + "HEALTHCHECK_KEY_FILE", "healthcheck_key_file", _path, "(unset)", "With mTLS: its private key."),
    _Var(
        PREFIX + "META_APP_SECRETS",
        "meta_app_secrets",
        _text,
        "(unset: not checked)",
        "Comma-separated Meta app secrets; Reprocess refuses a payload whose x-hub-signature-256 matches none.",
    ),
    _Var(
        PREFIX + "REDRIVE_MAX_PER_SECOND",
        "redrive_max_per_second",
        _integer(1, 10_000),
        "50",
        "Fastest a Redrive sends (and its default).",
    ),
    _Var(
        PREFIX + "REDRIVE_MAX_BATCH",
        "redrive_max_batch",
        _integer(1, 1_000_000),
        "10000",
        "Most dead letters one Redrive call may touch.",
    ),
    _Var(
        PREFIX + "RETENTION_DAYS",
        "retention_days",
        _integer(1, 3650),
        "90",
        "Dead letters older than this are purged daily, and by a Purge naming no cut-off.",
    ),
    _Var(
        PREFIX + "RETENTION_CRON",
        "retention_cron",
        _text,
        "0 3 * * *",
        "When the daily purge runs (crontab fields, UTC).",
    ),
    _Var(
        PREFIX + "RETENTION_ENABLED",
        "retention_enabled",
        _boolean,
        "true",
        "Run the daily purge (one replica runs it each day).",
    ),
    _Var(
        PREFIX + "PURGE_MIN_AGE_DAYS",
        "purge_min_age_days",
        _integer(0, 3650),
        "1",
        "Purge refuses a cut-off more recent than this.",
    ),
    _Var(
        PREFIX + "PURGE_BATCH_SIZE",
        "purge_batch_size",
        _integer(1, 100_000),
        "5000",
        "Rows deleted per transaction by a purge.",
    ),
    _Var(
        PREFIX + "PURGE_REST_PERCENT",
        "purge_rest_percent",
        _integer(0, 1000),
        "200",
        "After each batch a purge rests this share of the time the batch took, so Stores keep theirs; 0: no rest.",
    ),
    _Var(
        PREFIX + "RABBITMQ_URL",
        "rabbitmq_url",
        _text,
        "(unset: outbox only)",
        "AMQP URL; a relay publishes reprocessed webhooks there.",
    ),
    _Var(
        PREFIX + "RABBITMQ_QUEUE",
        "rabbitmq_queue",
        _text,
        "deadletter.reprocess",
        "Durable queue the relay publishes to.",
    ),
    _Var(
        PREFIX + "METRICS_LISTEN",
        "metrics_listen",
        _metrics_listen,
        "127.0.0.1:9464",
        "host:port of the Prometheus /metrics endpoint; 'off' disables it.",
    ),
    _Var(
        PREFIX + "HEALTH_CHECK_SECONDS",
        "health_check_seconds",
        _seconds(),
        "5",
        "How often the database is checked; health is NOT_SERVING while it is unreachable.",
    ),
    _Var(
        PREFIX + "METRICS_REFRESH_SECONDS",
        "metrics_refresh_seconds",
        _seconds(),
        "30",
        "How often the pending and queued gauges are recounted.",
    ),
    _Var(
        PREFIX + "DATA_DIR",
        "data_dir",
        _path,
        "./.deadletter",
        "Embedded mode only: PostgreSQL data and generated keys.",
    ),
    _Var(PREFIX + "MIGRATIONS_DIR", "migrations_dir", _path, "./migrations", "Folder of ordered .sql migrations."),
    _Var(PREFIX + "MIGRATE_ON_START", "migrate_on_start", _boolean, "true", "Apply pending migrations at start."),
    _Var(
        PREFIX + "MAX_PAYLOAD_BYTES",
        "max_payload_bytes",
        _integer(1, 64 << 20),
        "1048576",
        "Largest payload Store accepts; sets the gRPC receive limit.",
    ),
    _Var(PREFIX + "DB_POOL_MIN_SIZE", "db_pool_min_size", _integer(0, 1000), "2", "Connections kept open."),
    _Var(PREFIX + "DB_POOL_MAX_SIZE", "db_pool_max_size", _integer(1, 1000), "10", "Most connections open at once."),
    _Var(
        PREFIX + "DB_ACQUIRE_TIMEOUT_SECONDS",
        "db_acquire_timeout_seconds",
        _seconds(),
        "5",
        "Wait for a free connection before UNAVAILABLE.",
    ),
    _Var(
        PREFIX + "DB_STATEMENT_TIMEOUT_SECONDS",
        "db_statement_timeout_seconds",
        _seconds(),
        "30",
        "Longest a single query may run.",
    ),
    _Var(
        PREFIX + "SHUTDOWN_GRACE_SECONDS",
        "shutdown_grace_seconds",
        _seconds(),
        "10",
        "On SIGTERM, how long in-flight calls may take to finish.",
    ),
    _Var(
        PREFIX + "LOG_LEVEL",
        "log_level",
        _log_level,
        "INFO",
        "DEBUG, INFO, WARNING or ERROR. Logs never contain payloads.",
    ),
)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting, raising ConfigError naming the first bad one."""
    reader = _Reader(os.environ if env is None else env)
    defaults = Settings()
    settings = Settings(**{v.field: v.read(reader, v.name, getattr(defaults, v.field)) for v in VARIABLES})
    _check_listen(settings.listen)
    if settings.db_pool_min_size > settings.db_pool_max_size:
        raise ConfigError(f"{PREFIX}DB_POOL_MIN_SIZE must not exceed {PREFIX}DB_POOL_MAX_SIZE")
    if not settings.embedded and not settings.encryption_keys:
        raise ConfigError(f"{PREFIX}ENCRYPTION_KEYS is required when DATABASE_URL is set")
    if not settings.embedded and not (settings.jwt_secret or settings.jwt_public_key_file):
        raise ConfigError(f"{PREFIX}JWT_SECRET or {PREFIX}JWT_PUBLIC_KEY_FILE is required when DATABASE_URL is set")
    _check_transport(settings)
    if settings.retention_days < settings.purge_min_age_days:
        raise ConfigError(f"{PREFIX}RETENTION_DAYS must be at least {PREFIX}PURGE_MIN_AGE_DAYS")
    if len(settings.retention_cron.split()) != 5:
        raise ConfigError(f"{PREFIX}RETENTION_CRON must have the five crontab fields, for example '0 3 * * *'")
    return settings


def app_secrets(settings: Settings) -> list[bytes]:
    """The Meta app secrets to verify signatures with (empty: not checked)."""
    value = settings.meta_app_secrets or ""
    return [part.strip().encode() for part in value.split(",") if part.strip()]


def _check_transport(settings: Settings) -> None:
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise ConfigError(f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE go together")
    if settings.tls_client_ca_file is not None and not settings.tls:
        raise ConfigError(f"{PREFIX}TLS_CLIENT_CA_FILE needs {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE")
    if settings.tls or settings.allow_plaintext:
        return
    host = settings.listen.rpartition(":")[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"  # a name is trusted only for this one
    if not (settings.embedded and loopback):
        raise ConfigError(
            f"plaintext is only for the embedded mode on loopback: configure {PREFIX}TLS_CERT_FILE and "
            f"{PREFIX}TLS_KEY_FILE, or set {PREFIX}ALLOW_PLAINTEXT=true if something else encrypts the traffic"
        )


def _check_listen(listen: str, name: str = PREFIX + "LISTEN") -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, for example 127.0.0.1:50051")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}")
        return number

    def seconds(self, name: str, default: float, *, allow_zero: bool = False, high: float = 3600) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (seconds >= 0 if allow_zero else seconds > 0) or seconds > high:
            raise ConfigError(f"{name} must be a number of seconds from {0 if allow_zero else 'above 0'} to {high:g}")
        return seconds

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.text(name) or default).upper()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}")
        return value
