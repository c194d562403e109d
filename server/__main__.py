"""Command line: ``python -m server [serve|migrate|mint-token|healthcheck|generate-key|settings|rotate-keys]``.

serve (the default) runs the gRPC server until SIGTERM or SIGINT, then shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

# gRPC core writes its own unstructured lines to stderr; keep only its errors beside our JSON logs.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# The embedded mode forks pg_ctl while gRPC threads run; gRPC's fork handlers are not needed for fork+exec.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import app, config, embedded, logs, rotation
from server.auth import Role, generate_jwt_secret, mint_token
from server.crypto import generate_key
from server.errors import DatabaseUnavailable
from server.migrate import MigrationError, migrate

log = logging.getLogger("deadletter")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deadletter", description=__doc__)
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "migrate", "mint-token", "healthcheck", "generate-key", "settings", "rotate-keys"),
        help="serve: run the server (default); migrate: apply pending migrations and exit; "
        "mint-token: print a bearer token for local use (HS256, from the configured or embedded secret); "
        "healthcheck: exit 0 if the local server reports SERVING (for container health checks); "
        "generate-key: print a new base64 AES-256 key; settings: print the settings table; "
        "rotate-keys: re-encrypt every record under the first key of DEADLETTER_ENCRYPTION_KEYS (safe while serving, "
        "resumable; exit 0 once no record is left under an older key)",
    )
    parser.add_argument("--role", choices=[r.value for r in Role], default=Role.SERVICE.value, help="mint-token")
    parser.add_argument("--subject", default="local-worker", help="mint-token: the sub claim")
    parser.add_argument("--ttl", type=int, default=3600, help="mint-token: seconds until it expires")
    parser.add_argument(
        "--batch-size", type=int, default=rotation.DEFAULT_BATCH_SIZE, help="rotate-keys: records per transaction"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command
    if command == "generate-key":
        print(generate_key())
        return 0
    if command == "settings":
        print(settings_table())
        return 0
    try:
        settings = config.from_env()
    except config.ConfigError as error:
        print(f"deadletter: configuration error: {error}", file=sys.stderr)
        return 2
    if command in ("healthcheck", "mint-token", "rotate-keys"):
        return _run_tool(command, settings, args)
    logs.configure(settings.log_level)
    try:
        asyncio.run(_serve(settings) if command == "serve" else _migrate(settings))
    except (config.ConfigError, MigrationError) as error:
        log.error("cannot start: %s", error)
        return 2
    except DatabaseUnavailable:
        log.exception("cannot start: the database is unreachable")
        return 1
    return 0


def _run_tool(command: str, settings: config.Settings, args: argparse.Namespace) -> int:
    """The commands that do one job with the settings and exit."""
    if command == "healthcheck":
        return asyncio.run(_healthcheck(settings))
    if command == "mint-token":
        return _mint_token(settings, args)
    logs.configure(settings.log_level)
    return asyncio.run(rotation.run(settings, args.batch_size))


def _mint_token(settings: config.Settings, args: argparse.Namespace) -> int:
    secret = settings.jwt_secret
    if secret is None and settings.embedded:
        secret = embedded.secret(settings.data_dir, "jwt.secret", generate_jwt_secret)
    if secret is None:
        print("deadletter: mint-token needs DEADLETTER_JWT_SECRET", file=sys.stderr)
        return 2
    print(mint_token(secret, Role(args.role), args.subject, args.ttl, settings.jwt_issuer, settings.jwt_audience))
    return 0


async def _migrate(settings: config.Settings) -> None:
    dsn = settings.migrations_database_url or settings.database_url
    if dsn is None:
        raise config.ConfigError("migrate needs DEADLETTER_MIGRATIONS_DATABASE_URL or DATABASE_URL")
    applied = await migrate(dsn, settings.migrations_dir)
    log.info("migrations done", extra={"applied": applied})


async def _serve(settings: config.Settings) -> None:
    application = await app.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    mode = "embedded PostgreSQL in " + str(settings.data_dir) if settings.embedded else "DATABASE_URL"
    transport = "TLS" if settings.tls else "plaintext"
    log.info("serving", extra={"address": application.address, "database": mode, "transport": transport})
    grpcurl = "grpcurl -cacert CA.pem" if settings.tls else "grpcurl -plaintext"
    token = "python -m server mint-token --role service|admin" + (" (embedded secret)" if settings.embedded else "")
    print(
        f"deadletter is listening on {application.address} ({transport} gRPC; database: {mode}).\n"
        f"  Try: {grpcurl} {application.address} list\n"
        f"       {grpcurl} {application.address} describe deadletter.v1.DeadLetterService\n"
        f"  Calls need 'authorization: Bearer <token>'; a local token: {token}\n"
        "  Stop with Ctrl-C.",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await application.stop()
    log.info("stopped")


async def _healthcheck(settings: config.Settings) -> int:
    host, _, port = settings.listen.rpartition(":")
    host = "localhost" if host in ("0.0.0.0", "[::]", "::") else host  # noqa: S104 -- mapping, not binding
    try:
        channel = _health_channel(settings, f"{host}:{port}")
    except (OSError, config.ConfigError) as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 2
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            print(f"unhealthy: {error.code().name}", file=sys.stderr)
            return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


def _health_channel(settings: config.Settings, target: str) -> grpc.aio.Channel:
    if not settings.tls:
        return grpc.aio.insecure_channel(target)
    if settings.healthcheck_ca_file is None:
        raise config.ConfigError("with TLS, set DEADLETTER_HEALTHCHECK_CA_FILE (and CERT/KEY_FILE for mTLS)")
    identity = (settings.healthcheck_cert_file, settings.healthcheck_key_file)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.healthcheck_ca_file.read_bytes(),
        private_key=identity[1].read_bytes() if identity[1] else None,
        certificate_chain=identity[0].read_bytes() if identity[0] else None,
    )
    return grpc.aio.secure_channel(target, credentials)


def settings_table() -> str:
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    rows += [f"| `{v.name}` | `{v.default}` | {v.help} |" for v in config.VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
