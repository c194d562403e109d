"""Starting the server: the embedded mode from nothing, and refusal with a clear message on bad settings."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server.auth import Role, mint_token
from server.config import VARIABLES, ConfigError, Settings, _Var, from_env
from server.crypto import Keyring, generate_key
from tests.conftest import JWT_SECRET, SAMPLES, channel_to
from tests.processes import ServerProcess, free_port, run_server_command


async def test_embedded_mode_starts_from_nothing_and_keeps_data_and_key_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"DEADLETTER_DATA_DIR": str(data_dir), "DEADLETTER_LISTEN": f"127.0.0.1:{free_port()}"}

    async with ServerProcess(env) as first:
        assert "embedded PostgreSQL" in first.banner
        assert "grpcurl -plaintext" in first.banner
        address = env["DEADLETTER_LISTEN"]
        bearer = mint_token((data_dir / "jwt.secret").read_text().strip(), Role.SERVICE, "embedded-test", 60)
        async with channel_to(address, bearer) as channel:
            stored = await pb_grpc.DeadLetterServiceStub(channel).Store(SAMPLES[0].store_request())
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert await run_server_command(env, command="healthcheck") == (0, "SERVING\n")
    assert first.returncode == 0
    code, _ = await run_server_command(env, command="healthcheck")
    assert code == 1
    assert "generated a new secret" in first.logs()

    key_file = data_dir / "encryption.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    Keyring.parse(key)  # a valid 32-byte key

    async with ServerProcess(env) as second:
        async with channel_to(address, bearer) as channel:
            got = await pb_grpc.DeadLetterServiceStub(channel).Get(pb.GetRequest(id=stored.id))
        assert got.payload == SAMPLES[0].body
    assert second.returncode == 0
    assert "generated a new secret" not in second.logs()
    assert key_file.read_text().strip() == key
    assert key not in first.logs() + second.logs()


async def test_database_url_without_a_key_refuses_to_start(database_url: str) -> None:
    code, output = await run_server_command({"DATABASE_URL": database_url, "DEADLETTER_JWT_SECRET": JWT_SECRET})
    assert code == 2
    assert "DEADLETTER_ENCRYPTION_KEYS" in output


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"k" * 16).decode(), "16 bytes"),
        (base64.b64encode(b"k" * 33).decode(), "33 bytes"),
        (f"{generate_key()},short", "key #2"),
    ],
    ids=["garbage", "short", "long", "second-bad"],
)
async def test_malformed_key_refuses_to_start_naming_the_setting(database_url: str, keys: str, problem: str) -> None:
    code, output = await run_server_command(
        {"DATABASE_URL": database_url, "DEADLETTER_ENCRYPTION_KEYS": keys, "DEADLETTER_JWT_SECRET": JWT_SECRET}
    )
    assert code == 2
    assert "DEADLETTER_ENCRYPTION_KEYS" in output
    assert problem in output
    for part in keys.split(","):
        assert part not in output


async def test_unreachable_database_refuses_to_start(encryption_key: str) -> None:
    code, output = await run_server_command(
        {
            "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/nothing",
            "DEADLETTER_ENCRYPTION_KEYS": encryption_key,
            "DEADLETTER_JWT_SECRET": JWT_SECRET,
        }
    )
    assert code == 1
    assert "database is unreachable" in output


def test_same_key_twice_is_refused() -> None:
    key = generate_key()
    with pytest.raises(ConfigError, match="same key twice"):
        Keyring.parse(f"{key},{key}")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DEADLETTER_LISTEN": "nowhere"}, "DEADLETTER_LISTEN"),
        ({"DEADLETTER_LISTEN": "127.0.0.1:99999"}, "DEADLETTER_LISTEN"),
        ({"DEADLETTER_MAX_PAYLOAD_BYTES": "-5"}, "DEADLETTER_MAX_PAYLOAD_BYTES"),
        ({"DEADLETTER_MAX_PAYLOAD_BYTES": "lots"}, "DEADLETTER_MAX_PAYLOAD_BYTES"),
        ({"DEADLETTER_MIGRATE_ON_START": "maybe"}, "DEADLETTER_MIGRATE_ON_START"),
        ({"DEADLETTER_DB_ACQUIRE_TIMEOUT_SECONDS": "0"}, "DEADLETTER_DB_ACQUIRE_TIMEOUT_SECONDS"),
        ({"DEADLETTER_DB_POOL_MIN_SIZE": "20", "DEADLETTER_DB_POOL_MAX_SIZE": "5"}, "DEADLETTER_DB_POOL_MIN_SIZE"),
        ({"DEADLETTER_LOG_LEVEL": "chatty"}, "DEADLETTER_LOG_LEVEL"),
        ({"DEADLETTER_JWT_LEEWAY_SECONDS": "121"}, "DEADLETTER_JWT_LEEWAY_SECONDS"),  # documented: at most 120
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_env(env)
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    "variable",
    [v for v in VARIABLES if not v.default.startswith(("(", "./"))],  # not the notes, nor paths relative to the root
    ids=lambda v: v.name,
)
def test_the_documented_default_is_what_an_unset_variable_gives(variable: _Var) -> None:
    assert getattr(from_env({variable.name: variable.default}), variable.field) == getattr(Settings(), variable.field)


def test_database_url_without_a_way_to_verify_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="DEADLETTER_JWT_SECRET"):
        from_env({"DATABASE_URL": "postgresql://x@h/db", "DEADLETTER_ENCRYPTION_KEYS": generate_key()})


@pytest.mark.parametrize(
    ("env", "allowed"),
    [
        ({}, True),
        ({"DEADLETTER_LISTEN": "[::1]:50051"}, True),
        ({"DEADLETTER_LISTEN": "0.0.0.0:50051"}, False),
        ({"DEADLETTER_LISTEN": "127.attacker.example:50051"}, False),
        ({"DEADLETTER_LISTEN": "0.0.0.0:50051", "DEADLETTER_ALLOW_PLAINTEXT": "true"}, True),
        ({"DATABASE_URL": "postgresql://a@h/d", "DEADLETTER_JWT_SECRET": JWT_SECRET}, False),
        (
            {
                "DATABASE_URL": "postgresql://a@h/d",
                "DEADLETTER_JWT_SECRET": JWT_SECRET,
                "DEADLETTER_ALLOW_PLAINTEXT": "1",
            },
            True,
        ),
    ],
    ids=[
        "embedded-loopback",
        "embedded-ipv6-loopback",
        "embedded-any",
        "loopback-lookalike",
        "opt-in",
        "production",
        "production-opt-in",
    ],
)
def test_plaintext_is_only_for_the_embedded_mode_on_loopback(env: dict[str, str], allowed: bool) -> None:
    env = env | ({"DEADLETTER_ENCRYPTION_KEYS": generate_key()} if "DATABASE_URL" in env else {})
    if allowed:
        assert not from_env(env).tls
    else:
        with pytest.raises(ConfigError, match="DEADLETTER_TLS_CERT_FILE"):
            from_env(env)


def test_defaults_are_the_embedded_mode_on_loopback() -> None:
    settings = from_env({})
    assert settings.embedded
    assert settings.listen == "127.0.0.1:50051"
    assert settings.max_payload_bytes == 1024 * 1024
    assert settings.migrate_on_start


def test_generate_key_prints_a_usable_key() -> None:
    key = generate_key()
    assert len(base64.b64decode(key)) == 32
    assert Keyring.parse(key).primary_id


async def test_rotate_keys_works_on_an_embedded_folder_that_was_never_served(tmp_path: Path) -> None:
    code, output = await run_server_command({"DEADLETTER_DATA_DIR": str(tmp_path / "data")}, command="rotate-keys")
    assert code == 0, output
    assert (tmp_path / "data" / "encryption.key").exists()
