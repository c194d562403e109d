"""Operating the server: graceful shutdown, kill -9, a database restart, two replicas, and its metrics.

Each test runs the server as its own OS process (python -m server), the way it runs in production.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import urllib.request
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server.config import PROJECT_ROOT
from server.embedded import with_user
from server.migrate import migrate, provision_login_role
from tests.conftest import APP_ROLE, JWT_SECRET, SAMPLES, channel_to, eventually, token
from tests.processes import ServerProcess, free_port

SAMPLE = next(s for s in SAMPLES if s.provider == "whatsapp")


def _env(database_url: str, encryption_key: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "DEADLETTER_ENCRYPTION_KEYS": encryption_key,
        "DEADLETTER_JWT_SECRET": JWT_SECRET,
        "DEADLETTER_LISTEN": f"127.0.0.1:{free_port()}",
    } | extra


def _address(env: dict[str, str]) -> str:
    return env["DEADLETTER_LISTEN"]


async def _writers(address: str, count: int, stop: asyncio.Event) -> tuple[list[str], list[grpc.StatusCode]]:
    """Store continuously from count tasks until stop; return acknowledged ids and error codes."""
    acked: list[str] = []
    errors: list[grpc.StatusCode] = []

    async def write() -> None:
        async with channel_to(address, token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            while not stop.is_set():
                try:
                    acked.append((await stub.Store(SAMPLE.store_request(), timeout=5)).id)
                except grpc.aio.AioRpcError as error:
                    errors.append(error.code())
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(write() for _ in range(count)))
    return acked, errors


async def _all_readable(address: str, ids: list[str]) -> None:
    async with channel_to(address, token()) as channel:
        stub = pb_grpc.DeadLetterServiceStub(channel)
        for record_id in ids:
            assert (await stub.Get(pb.GetRequest(id=record_id), timeout=10)).payload == SAMPLE.body


async def test_sigterm_refuses_new_calls_finishes_in_flight_ones_and_exits_0(
    database_url: str, encryption_key: str, db: asyncpg.Connection
) -> None:
    env = _env(database_url, encryption_key, DEADLETTER_SHUTDOWN_GRACE_SECONDS="20")
    async with ServerProcess(env) as server:
        async with channel_to(_address(env), token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            # Hold the audit trail's lock so every Store stays in flight until the test lets go.
            async with db.transaction():
                await db.execute("LOCK TABLE audit_log IN EXCLUSIVE MODE")
                in_flight = [asyncio.ensure_future(stub.Store(SAMPLE.store_request(), timeout=30)) for _ in range(8)]
                await asyncio.sleep(1)
                assert server.process is not None
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Store(SAMPLE.store_request(), timeout=5)
                assert await db.fetchval("SELECT count(*) FROM dead_letter_queue") == 0
            # The lock is released: the in-flight Stores commit and are answered.
            answers = await asyncio.gather(*in_flight)
        code = await server.stop()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert code == 0
    assert len({a.id for a in answers}) == 8
    assert await db.fetchval("SELECT count(*) FROM dead_letter_queue") == 8
    assert '"message": "stopped"' in server.logs()


async def test_after_kill_9_every_acknowledged_store_is_there_and_decrypts(
    database_url: str, encryption_key: str
) -> None:
    env = _env(database_url, encryption_key)
    stop = asyncio.Event()
    async with ServerProcess(env) as server:
        writers = asyncio.create_task(_writers(_address(env), 6, stop))
        await asyncio.sleep(2)
        assert server.process is not None
        server.process.kill()  # SIGKILL: no shutdown at all
        await server.process.wait()
        await asyncio.sleep(0.5)
        stop.set()
        acked, errors = await writers
    assert len(acked) > 20
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE}
    async with ServerProcess(env):
        await _all_readable(_address(env), acked)


@pytest.fixture
async def private_postgres() -> AsyncIterator[tuple[Any, Path]]:
    """A PostgreSQL this test may stop and start again (never the shared one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        with tempfile.TemporaryDirectory(prefix="deadletter-restart-") as folder:
            pgserver.get_server(folder, cleanup_mode="stop")
            try:
                yield pgserver, Path(folder)
            finally:
                pgserver.get_server(folder, cleanup_mode="stop").cleanup()  # the handle now running


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
    status: int = response.status
    return status


async def test_a_database_restart_under_load_fails_calls_as_unavailable_and_heals_by_itself(
    private_postgres: tuple[Any, Path], encryption_key: str
) -> None:
    pgserver, folder = private_postgres
    owner = pgserver.get_server(folder).get_uri("postgres")
    await migrate(owner, PROJECT_ROOT / "migrations")
    await provision_login_role(owner, APP_ROLE)
    env = _env(
        with_user(owner, APP_ROLE),
        encryption_key,
        DEADLETTER_HEALTH_CHECK_SECONDS="0.5",
        DEADLETTER_DB_ACQUIRE_TIMEOUT_SECONDS="1",
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    stop = asyncio.Event()
    async with ServerProcess(env) as server:
        address = _address(env)
        writers = asyncio.create_task(_writers(address, 4, stop))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pgserver.get_server(folder).cleanup)  # PostgreSQL stops
        went_down = await eventually(lambda: _is(address, not_serving), within=15)
        await asyncio.sleep(1)
        await asyncio.to_thread(pgserver.get_server, folder, cleanup_mode="stop")  # and starts again
        came_back = await eventually(lambda: _is(address, serving), within=30)
        await asyncio.sleep(2)
        stop.set()
        acked, errors = await writers
        await _all_readable(address, acked)
    assert went_down, "health reported NOT_SERVING while the database was down"
    assert came_back, "health reported SERVING again without a restart"
    assert grpc.StatusCode.UNAVAILABLE in errors
    unexpected = [line for line in server.logs().splitlines() if "unhandled" in line]
    assert set(errors) == {grpc.StatusCode.UNAVAILABLE}, unexpected
    conn = await asyncpg.connect(owner)
    try:
        stored = {str(r["id"]) for r in await conn.fetch("SELECT id FROM dead_letter_queue")}
    finally:
        await conn.close()
    assert set(acked) <= stored, "an acknowledged Store was lost"


async def _is(address: str, status: int) -> bool:
    return await _health(address) == status


async def test_two_replicas_starting_together_migrate_once_and_both_serve(
    empty_database_url: str, template_database: str, encryption_key: str
) -> None:
    # template_database provisioned the login role; each server migrates with the owner's DSN at start.
    app_dsn = with_user(empty_database_url, APP_ROLE)
    extra = {"DEADLETTER_MIGRATIONS_DATABASE_URL": empty_database_url}
    first, second = _env(app_dsn, encryption_key, **extra), _env(app_dsn, encryption_key, **extra)
    async with ServerProcess(first), ServerProcess(second):
        for env in (first, second):
            async with channel_to(_address(env), token()) as channel:
                assert (await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLE.store_request())).id
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM deadletter_schema_migrations")]
    finally:
        await conn.close()
    assert sorted(versions) == sorted({p.name[:4] for p in (PROJECT_ROOT / "migrations").glob("*.sql")})


async def test_metrics_show_rpcs_totals_and_pending_depth(database_url: str, encryption_key: str) -> None:
    port = free_port()
    env = _env(
        database_url,
        encryption_key,
        DEADLETTER_METRICS_LISTEN=f"127.0.0.1:{port}",
        DEADLETTER_METRICS_REFRESH_SECONDS="0.5",
        DEADLETTER_HEALTH_CHECK_SECONDS="0.5",
    )
    async with ServerProcess(env):
        async with channel_to(_address(env), token()) as channel:
            stub = pb_grpc.DeadLetterServiceStub(channel)
            for _ in range(3):
                await stub.Store(SAMPLE.store_request())
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Get(pb.GetRequest(id=str(uuid.uuid4())))

        async def scraped() -> bool:
            return 'deadletter_pending{provider="whatsapp"} 3.0' in await _scrape(port)

        assert await eventually(scraped, within=10)
        text = await _scrape(port)
    assert 'deadletter_rpc_requests_total{code="OK",method="Store"} 3.0' in text
    assert 'deadletter_rpc_requests_total{code="NOT_FOUND",method="Get"} 1.0' in text
    assert 'deadletter_rpc_duration_seconds_count{method="Store"} 3.0' in text
    assert 'deadletter_stored_total{provider="whatsapp"} 3.0' in text
    assert "deadletter_database_up 1.0" in text
    assert 'deadletter_oldest_pending_age_seconds{provider="whatsapp"}' in text
    assert SAMPLE.body.decode()[:40] not in text


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    return await asyncio.to_thread(get)
