"""Who may call what, enforced twice (gRPC interceptor and PostgreSQL row-level security), and audited."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.auth import Role
from server.embedded import with_user
from server.logs import JsonFormatter
from server.migrate import MigrationError
from server.sql import QUERIES
from tests.conftest import APP_ROLE, JWT_SECRET, SAMPLES, channel_to, row_count, settings_for, token

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

SAMPLE = SAMPLES[0]
UNKNOWN_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "someone", "iat": now, "exp": now + 300} | extra


def _hs256(claims: dict[str, Any], secret: str = JWT_SECRET, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


def _unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


# Every kind of caller: the token it sends (None: no metadata at all) and the role it ends up with.
CALLERS: dict[str, tuple[str | None, str]] = {
    "service": (_hs256(_claims(role="service_role")), "service"),
    "admin": (_hs256(_claims(role="authenticated", app_metadata={"role": "admin"})), "admin"),
    "authenticated user": (_hs256(_claims(role="authenticated")), "denied"),
    "user_metadata admin": (_hs256(_claims(role="authenticated", user_metadata={"role": "admin"})), "denied"),
    "anon": (_hs256(_claims(role="anon")), "denied"),
    "no token": (None, "unauthenticated"),
    "malformed": ("not.a.jwt", "unauthenticated"),
    "wrong secret": (
        _hs256(_claims(role="service_role"), "another-secret-that-is-long-enough-0000"),
        "unauthenticated",
    ),
    "expired": (_hs256(_claims(role="service_role", exp=int(time.time()) - 3600)), "unauthenticated"),
    "no exp": (_hs256({"sub": "x", "role": "service_role"}), "unauthenticated"),
    "not yet valid": (_hs256(_claims(role="service_role", nbf=int(time.time()) + 3600)), "unauthenticated"),
    "alg none": (_unsigned(_claims(role="service_role")), "unauthenticated"),
}

REQUESTS: dict[str, Any] = {
    "Store": lambda: SAMPLE.store_request(),
    "Get": lambda: pb.GetRequest(id=UNKNOWN_ID),
    "List": lambda: pb.ListRequest(),
    "Reprocess": lambda: pb.ReprocessRequest(id=UNKNOWN_ID),
    "Redrive": lambda: pb.RedriveRequest(dry_run=True),
    "ClaimQueued": lambda: pb.ClaimQueuedRequest(),
    "AcknowledgeQueued": lambda: pb.AcknowledgeQueuedRequest(message_id=UNKNOWN_ID),
    "Purge": lambda: pb.PurgeRequest(dry_run=True),
}
ALLOWED = {"service": set(REQUESTS), "admin": {"Get", "List"}}
# What an allowed call answers with these requests (the ids do not exist).
ALLOWED_OUTCOME = {
    "Store": grpc.StatusCode.OK,
    "Get": grpc.StatusCode.NOT_FOUND,
    "List": grpc.StatusCode.OK,
    "Reprocess": grpc.StatusCode.NOT_FOUND,
    "Redrive": grpc.StatusCode.OK,
    "ClaimQueued": grpc.StatusCode.OK,
    "AcknowledgeQueued": grpc.StatusCode.NOT_FOUND,
    "Purge": grpc.StatusCode.OK,
}


async def _call(address: str, bearer: str | None, method: str) -> tuple[grpc.StatusCode, str]:
    async with channel_to(address, bearer) as channel:
        try:
            await getattr(pb_grpc.DeadLetterServiceStub(channel), method)(REQUESTS[method](), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", list(REQUESTS))
@pytest.mark.parametrize("caller", list(CALLERS))
async def test_role_matrix(server: app.Application, db: asyncpg.Connection, caller: str, method: str) -> None:
    bearer, kind = CALLERS[caller]
    code, details = await _call(server.address, bearer, method)
    assert bearer is None or bearer not in details

    if method in ALLOWED.get(kind, set()):
        assert code == ALLOWED_OUTCOME[method]
        return
    expected = grpc.StatusCode.UNAUTHENTICATED if kind == "unauthenticated" else grpc.StatusCode.PERMISSION_DENIED
    assert code == expected
    assert await row_count(db) == 0
    denied = await db.fetch("SELECT actor, role, outcome, method, peer FROM audit_log WHERE action = 'denied'")
    assert [(r["outcome"], r["method"]) for r in denied] == [
        (expected.name, f"/deadletter.v1.DeadLetterService/{method}")
    ]
    assert denied[0]["peer"]


async def test_two_authorization_entries_are_refused(server: app.Application, db: asyncpg.Connection) -> None:
    metadata = (("authorization", f"Bearer {token(Role.ADMIN)}"), ("authorization", f"Bearer {token()}"))
    async with channel_to(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLE.store_request(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await row_count(db) == 0


async def test_a_client_chosen_method_name_is_not_written_to_the_audit_trail(
    server: app.Application, db: asyncpg.Connection
) -> None:
    async with channel_to(server.address) as channel:
        call = channel.unary_unary("/deadletter.v1.DeadLetterService/" + "X" * 5000, None, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await db.fetchval("SELECT method FROM audit_log") == "/deadletter.v1.DeadLetterService/<unknown>"


async def test_failed_reads_and_conflicting_stores_are_audited(
    stub: Stub, admin_stub: Stub, db: asyncpg.Connection
) -> None:
    request = SAMPLE.store_request(idempotency_key="conflict-key")
    await stub.Store(request)
    failures: list[Any] = [
        stub.Store(SAMPLE.store_request(idempotency_key="conflict-key")),  # other content
        admin_stub.Get(pb.GetRequest(id="not-a-uuid")),
        admin_stub.List(pb.ListRequest(page_token="forged")),
        stub.Reprocess(pb.ReprocessRequest(id="nope")),
    ]
    for call in failures:  # grpc.aio starts each call when it is created: they run concurrently
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    rows = await db.fetch("SELECT action, outcome FROM audit_log")
    assert sorted((r["action"], r["outcome"]) for r in rows) == sorted(
        [
            ("stored", "OK"),
            ("stored", "ALREADY_EXISTS"),
            ("viewed", "INVALID_ARGUMENT"),
            ("listed", "INVALID_ARGUMENT"),
            ("reprocessed", "INVALID_ARGUMENT"),
        ]
    )


async def test_the_database_stamps_audit_time_and_actor(stub: Stub, db: asyncpg.Connection, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(QUERIES["act_as"], "deadletter_admin", "real-subject")
            await conn.execute(
                "INSERT INTO audit_log (occurred_at, actor, role, peer, method, action, outcome)"
                " VALUES ('2001-01-01', 'forged-subject', 'admin', 'p', 'm', 'viewed', 'OK')"
            )
    finally:
        await conn.close()
    row = await db.fetchrow("SELECT occurred_at, actor FROM audit_log")
    assert row is not None
    assert row["actor"] == "real-subject"
    assert row["occurred_at"].year >= 2026


async def test_health_and_reflection_need_no_token(server: app.Application) -> None:
    async with channel_to(server.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "deadletter.v1.DeadLetterService" in names


async def test_audit_trail_records_who_did_what(
    server: app.Application, stub: Stub, admin_stub: Stub, db: asyncpg.Connection
) -> None:
    request = SAMPLE.store_request(idempotency_key="k-1")
    stored = await stub.Store(request)
    await stub.Store(request)
    await admin_stub.Get(pb.GetRequest(id=stored.id))
    await admin_stub.List(pb.ListRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await admin_stub.Get(pb.GetRequest(id=UNKNOWN_ID))

    rows = await db.fetch("SELECT * FROM audit_log ORDER BY id")
    summary = [(r["action"], r["actor"], r["role"], r["outcome"], [str(i) for i in r["dead_letter_ids"]]) for r in rows]
    admin = "compliance-officer@clinic.example"
    assert summary == [
        ("stored", "test-worker", "service", "OK", [stored.id]),
        ("stored", "test-worker", "service", "OK", [stored.id]),
        ("viewed", admin, "admin", "OK", [stored.id]),
        ("listed", admin, "admin", "OK", [stored.id]),
        ("viewed", admin, "admin", "NOT_FOUND", [UNKNOWN_ID]),
    ]
    assert json.loads(rows[1]["metadata"]) == {"deduplicated": True}
    assert rows[0]["event_id"] == f"evt-{SAMPLE.file}"
    assert rows[0]["provider"] == SAMPLE.provider
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in rows)


async def test_a_store_whose_audit_row_cannot_be_written_is_not_acknowledged(
    stub: Stub, db: asyncpg.Connection
) -> None:
    await db.execute("REVOKE INSERT ON audit_log FROM deadletter_service")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Store(SAMPLE.store_request())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert await row_count(db) == 0


async def test_the_audit_trail_is_append_only(stub: Stub, db: asyncpg.Connection, database_url: str) -> None:
    await stub.Store(SAMPLE.store_request())
    for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await db.execute(statement)  # even the owner
    app_conn = await asyncpg.connect(database_url)
    try:
        for role in ("deadletter_service", "deadletter_admin"):
            async with app_conn.transaction():
                await app_conn.execute(f"SET LOCAL ROLE {role}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app_conn.execute("DELETE FROM audit_log")
    finally:
        await app_conn.close()
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_postgresql_refuses_admin_writes_on_its_own(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    stored = await stub.Store(SAMPLE.store_request())
    conn = await asyncpg.connect(database_url)
    try:
        statements = [
            "INSERT INTO dead_letter_queue (event_id, provider, received_at, correlation_id, payload_encrypted,"
            " headers_encrypted, payload_size_bytes, error_message, retry_count)"
            " VALUES ('e', 'whatsapp', now(), 'c', 'x', 'x', 1, 'err', 0)",
            f"UPDATE dead_letter_queue SET retry_count = 9 WHERE id = '{stored.id}'",
            f"DELETE FROM dead_letter_queue WHERE id = '{stored.id}'",
        ]
        for statement in statements:
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE deadletter_admin")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(statement)
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE deadletter_admin")
            assert await conn.fetchval("SELECT count(*) FROM dead_letter_queue") == 1
        # The login role itself holds nothing: without SET ROLE it cannot even read.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM dead_letter_queue")
        assert (
            await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user") is False
        )
    finally:
        await conn.close()
    assert await db.fetchval("SELECT retry_count FROM dead_letter_queue") == SAMPLE.store_request().retry_count


async def test_the_next_borrower_of_a_connection_sees_neither_role_nor_actor(
    database_url: str, encryption_key: str
) -> None:
    application = await app.start(settings_for(database_url, encryption_key, db_pool_min_size=1, db_pool_max_size=1))
    try:
        async with channel_to(application.address, token(Role.SERVICE, "borrower-1")) as channel:
            await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLE.store_request())
        async with application.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT current_user AS who, current_setting('app.actor', true) AS actor")
    finally:
        await application.stop(0)
    assert row is not None
    assert row["who"] == APP_ROLE
    assert row["actor"] in (None, "")


async def test_act_as_is_transaction_local_even_without_the_pool_reset(database_url: str) -> None:
    """The pool's RESET ALL would hide a session-level set_config; a bare connection shows the real scope."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(QUERIES["act_as"], "deadletter_service", "someone")
            assert await conn.fetchval("SELECT current_user") == "deadletter_service"
        row = await conn.fetchrow("SELECT current_user AS who, current_setting('app.actor', true) AS actor")
    finally:
        await conn.close()
    assert row is not None
    assert row["who"] == APP_ROLE
    assert row["actor"] in (None, "")


async def test_row_level_security_is_forced_with_one_policy_per_role(db: asyncpg.Connection) -> None:
    flags = await db.fetchrow(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = 'dead_letter_queue'::regclass"
    )
    assert flags is not None
    assert tuple(flags) == (True, True)
    policies = {
        (r["policyname"], r["cmd"], tuple(r["roles"]))
        for r in await db.fetch("SELECT policyname, cmd, roles FROM pg_policies WHERE tablename = 'dead_letter_queue'")
    }
    assert policies == {
        ("dead_letter_queue_service_all", "ALL", ("deadletter_service",)),
        ("dead_letter_queue_admin_read", "SELECT", ("deadletter_admin",)),
    }


async def test_row_level_security_holds_even_if_admins_were_granted_writes(
    stub: Stub, db: asyncpg.Connection, database_url: str
) -> None:
    """The second layer on its own: with the grants opened by mistake, the policies still refuse."""
    stored = await stub.Store(SAMPLE.store_request())
    await db.execute("GRANT INSERT, UPDATE, DELETE ON dead_letter_queue TO deadletter_admin")
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE deadletter_admin")
            assert await conn.execute("UPDATE dead_letter_queue SET retry_count = 9") == "UPDATE 0"
            assert await conn.execute("DELETE FROM dead_letter_queue") == "DELETE 0"
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE deadletter_admin")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute(
                    "INSERT INTO dead_letter_queue (event_id, provider, received_at, correlation_id,"
                    " payload_encrypted, headers_encrypted, payload_size_bytes, error_message, retry_count)"
                    " VALUES ('e', 'whatsapp', now(), 'c', 'x', 'x', 1, 'err', 0)"
                )
    finally:
        await conn.close()
    assert await db.fetchval("SELECT retry_count FROM dead_letter_queue WHERE id = $1::uuid", stored.id) == 3


@pytest.mark.parametrize(
    "setup",
    [
        "CREATE ROLE {r} LOGIN INHERIT; GRANT deadletter_service, deadletter_admin TO {r}",
        "CREATE ROLE {r} LOGIN NOINHERIT BYPASSRLS; GRANT deadletter_service, deadletter_admin TO {r}",
        "CREATE ROLE {r}_owner NOLOGIN; ALTER TABLE audit_log OWNER TO {r}_owner;"
        " CREATE ROLE {r} LOGIN NOINHERIT; GRANT {r}_owner, deadletter_service, deadletter_admin TO {r}",
        "CREATE ROLE {r} LOGIN NOINHERIT; GRANT SELECT ON dead_letter_queue TO {r};"
        " GRANT deadletter_service, deadletter_admin TO {r}",
    ],
    ids=["inherits-the-access-roles", "bypassrls", "member-of-an-owner", "holds-a-grant"],
)
async def test_server_refuses_a_login_role_that_could_sidestep_rls(
    owner_database_url: str, encryption_key: str, db: asyncpg.Connection, setup: str
) -> None:
    role = f"deadletter_probe_{uuid.uuid4().hex[:8]}"
    await db.execute(setup.format(r=role))
    try:
        with pytest.raises(MigrationError, match="superuser, a BYPASSRLS role or the tables' owner"):
            await app.start(settings_for(with_user(owner_database_url, role), encryption_key))
    finally:
        await db.execute(f"ALTER TABLE audit_log OWNER TO current_user; DROP OWNED BY {role}; DROP ROLE {role}")
        await db.execute(f"DROP ROLE IF EXISTS {role}_owner")


async def test_server_refuses_to_log_in_as_a_superuser(owner_database_url: str, encryption_key: str) -> None:
    with pytest.raises(MigrationError, match="superuser"):
        await app.start(settings_for(owner_database_url, encryption_key))


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    capture = _Capture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(previous)


async def test_no_phi_or_token_in_logs_errors_or_audit_rows(
    server: app.Application, db: asyncpg.Connection, captured_logs: _Capture
) -> None:
    canary = "canary-c0ffee-PHI"
    bearer = token(Role.SERVICE, "canary-worker")
    admin = token(Role.ADMIN, "canary-admin")
    body = SAMPLE.body.replace(b"}", f',"note":"{canary}"}}'.encode(), 1)
    headers = {"content-type": "application/json", "x-canary": canary}
    details: list[str] = []

    async def attempt(bearer_token: str | None, method: str, request: Any) -> Any:
        async with channel_to(server.address, bearer_token) as channel:
            try:
                return await getattr(pb_grpc.DeadLetterServiceStub(channel), method)(request)
            except grpc.aio.AioRpcError as error:
                details.append(error.details() or "")
                return None

    first = SAMPLE.store_request(payload=body, headers=headers, idempotency_key="c1")
    stored = await attempt(bearer, "Store", first)
    await attempt(bearer, "Get", pb.GetRequest(id=stored.id))
    await attempt(bearer, "List", pb.ListRequest())
    error_paths = [
        (bearer, "Store", SAMPLE.store_request(payload=body, headers=headers, idempotency_key="c1")),
        (bearer, "Store", SAMPLE.store_request(payload=body, headers=headers, provider=pb.PROVIDER_UNSPECIFIED)),
        (bearer, "Store", SAMPLE.store_request(payload=body + b" " * (1 << 20), headers=headers)),
        (bearer, "Get", pb.GetRequest(id=canary)),
        (bearer, "Get", pb.GetRequest(id=UNKNOWN_ID)),
        (bearer, "List", pb.ListRequest(page_token=canary)),
        (admin, "Store", SAMPLE.store_request(payload=body, headers=headers)),
        (None, "Store", SAMPLE.store_request(payload=body, headers=headers)),
        (canary, "Get", pb.GetRequest(id=stored.id)),
    ]
    for caller, method, request in error_paths:
        await attempt(caller, method, request)
    await db.execute("UPDATE dead_letter_queue SET payload_encrypted = headers_encrypted")
    await attempt(bearer, "Get", pb.GetRequest(id=stored.id))

    assert len(details) == len(error_paths) + 1
    audit = " ".join(str(dict(r)) for r in await db.fetch("SELECT * FROM audit_log"))
    logs = "\n".join(captured_logs.lines)
    assert "correlation_id" in logs
    assert '"method": "/deadletter.v1.DeadLetterService/Store"' in logs
    for haystack in (logs, "\n".join(details), audit):
        for secret in (canary, bearer, admin, "x-canary"):
            assert secret not in haystack
