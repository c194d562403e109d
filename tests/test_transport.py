"""Transport and token checks against the real server on real channels: TLS, mutual TLS, asymmetric JWT keys,
and the issuer and audience claims. Every refusal is checked for its exact status and for writing nothing."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import app
from server.auth import Role, mint_token
from tests.conftest import JWT_SECRET, SAMPLES, BearerToken, channel_to, row_count, settings_for, token
from tests.processes import run_server_command

if TYPE_CHECKING:
    from deadletter.v1.deadletter_pb2_grpc import DeadLetterServiceAsyncStub as Stub

CALL_TIMEOUT = 5.0
SAMPLE = SAMPLES[0]
ISSUER = "https://auth.clinic.example"
AUDIENCE = "deadletter"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Connect = Callable[[str], grpc.aio.Channel]


# --- Running the server -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    """Starts the real server on the test's database, with settings overridden per test."""

    database_url: str
    encryption_key: str

    @contextlib.asynccontextmanager
    async def stub(self, connect: Connect = channel_to, **overrides: Any) -> AsyncIterator[Stub]:
        """A stub on a channel made by connect(address) to a server started with the overrides."""
        application = await app.start(settings_for(self.database_url, self.encryption_key, **overrides))
        try:
            async with connect(application.address) as channel:
                yield pb_grpc.DeadLetterServiceStub(channel)
        finally:
            await application.stop(0)


@pytest.fixture
def servers(database_url: str, encryption_key: str) -> Servers:
    return Servers(database_url, encryption_key)


async def store(stub: Stub, bearer: str | None = None) -> pb.StoreResponse:
    """Store the sample; with a bearer, send it on this call (tls() and plaintext() channels already carry one)."""
    metadata = (("authorization", f"Bearer {bearer}"),) if bearer else None
    return await stub.Store(SAMPLE.store_request(), metadata=metadata, timeout=CALL_TIMEOUT)


async def assert_round_trip(stub: Stub, bearer: str | None = None) -> None:
    stored = await store(stub, bearer)
    metadata = (("authorization", f"Bearer {bearer}"),) if bearer else None
    got = await stub.Get(pb.GetRequest(id=stored.id), metadata=metadata, timeout=CALL_TIMEOUT)
    assert got.payload == SAMPLE.body


async def assert_refused(
    stub: Stub, db: asyncpg.Connection, code: grpc.StatusCode, bearer: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await store(stub, bearer)
    assert caught.value.code() == code
    assert await row_count(db) == 0
    return caught.value


async def assert_unauthenticated(stub: Stub, db: asyncpg.Connection, bearer: str) -> None:
    error = await assert_refused(stub, db, grpc.StatusCode.UNAUTHENTICATED, bearer)
    details = error.details() or ""
    assert bearer not in details
    for part in bearer.split("."):
        assert not part or part not in details


# --- TLS material -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("deadletter test CA")
    ca_cert = (
        _certificate(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert = (
        _certificate(_name("localhost"), ca_name, server_key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = (
        _certificate(_name("dead-letter-worker"), ca_name, client_key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(
        ca_cert=_write(folder / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        server_key=_write(folder / "server.key", _private_pem(server_key)),
        client_cert=_write(folder / "client.pem", client_cert.public_bytes(serialization.Encoding.PEM)),
        client_key=_write(folder / "client.key", _private_pem(client_key)),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_settings(pki: Pki, *, require_client_certs: bool) -> dict[str, Any]:
    client_ca = pki.ca_cert if require_client_certs else None
    return {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": client_ca}


def tls(trust: Pki, identity: Pki | None, host: str | None = None) -> Connect:
    """Connects over TLS, trusting trust's CA, presenting identity's client certificate if given, as the service.

    The target is the server's 127.0.0.1:port (verified against the IP SAN) unless host replaces 127.0.0.1.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust.ca_cert.read_bytes(),
        private_key=identity.client_key.read_bytes() if identity else None,
        certificate_chain=identity.client_cert.read_bytes() if identity else None,
    )
    interceptors: Any = [BearerToken(token(Role.SERVICE))]

    def connect(address: str) -> grpc.aio.Channel:
        target = f"{host}:{address.rpartition(':')[2]}" if host else address
        return grpc.aio.secure_channel(target, credentials, interceptors=interceptors)

    return connect


def plaintext(address: str) -> grpc.aio.Channel:
    return channel_to(address, token(Role.SERVICE))


# --- 1. TLS and mutual TLS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [None, "localhost"], ids=["by-ip", "by-dns-name"])
async def test_mtls_client_with_certificate_stores_and_gets(servers: Servers, pki: Pki, host: str | None) -> None:
    async with servers.stub(tls(pki, identity=pki, host=host), **tls_settings(pki, require_client_certs=True)) as stub:
        await assert_round_trip(stub)


async def test_mtls_refuses_client_without_certificate(servers: Servers, pki: Pki, db: asyncpg.Connection) -> None:
    async with servers.stub(tls(pki, identity=None), **tls_settings(pki, require_client_certs=True)) as stub:
        await assert_refused(stub, db, grpc.StatusCode.UNAVAILABLE)


async def test_mtls_refuses_client_certificate_from_another_ca(
    servers: Servers, pki: Pki, tmp_path: Path, db: asyncpg.Connection
) -> None:
    stranger = make_pki(tmp_path / "stranger")
    async with servers.stub(tls(pki, identity=stranger), **tls_settings(pki, require_client_certs=True)) as stub:
        await assert_refused(stub, db, grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize("require_client_certs", [True, False], ids=["mtls", "tls"])
async def test_plaintext_client_cannot_reach_tls_port(
    servers: Servers, pki: Pki, db: asyncpg.Connection, require_client_certs: bool
) -> None:
    async with servers.stub(plaintext, **tls_settings(pki, require_client_certs=require_client_certs)) as stub:
        await assert_refused(stub, db, grpc.StatusCode.UNAVAILABLE)


async def test_client_refuses_server_certificate_from_an_untrusted_ca(
    servers: Servers, pki: Pki, tmp_path: Path, db: asyncpg.Connection
) -> None:
    stranger = make_pki(tmp_path / "stranger")
    async with servers.stub(tls(stranger, identity=None), **tls_settings(pki, require_client_certs=False)) as stub:
        await assert_refused(stub, db, grpc.StatusCode.UNAVAILABLE)


async def test_tls_without_client_ca_accepts_client_without_certificate(servers: Servers, pki: Pki) -> None:
    async with servers.stub(tls(pki, identity=None), **tls_settings(pki, require_client_certs=False)) as stub:
        await assert_round_trip(stub)


# --- 2. Asymmetric JWT keys ---------------------------------------------------------------------------------

KEY_MAKERS: dict[str, Callable[[], PrivateKey]] = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
}


def service_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "transport-test", "role": "service_role", "iat": now, "exp": now + 300, **extra}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_made_token(algorithm: str, hmac_key: bytes | None) -> str:
    """A JWT built without PyJWT: HS256-signed with hmac_key, or with an empty signature when it is None."""
    header = _b64url(json.dumps({"alg": algorithm, "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64url(json.dumps(service_claims()).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def public_key_file(tmp_path: Path, key: PrivateKey) -> Path:
    return _write(tmp_path / "jwt-public.pem", _public_pem(key))


@pytest.mark.parametrize("algorithm", list(KEY_MAKERS))
async def test_token_signed_with_the_private_key_is_accepted(servers: Servers, tmp_path: Path, algorithm: str) -> None:
    key = KEY_MAKERS[algorithm]()
    key_file = public_key_file(tmp_path, key)
    async with servers.stub(jwt_secret=None, jwt_public_key_file=key_file) as stub:
        await assert_round_trip(stub, jwt.encode(service_claims(), key, algorithm))


@pytest.mark.parametrize("shared_secret", [None, JWT_SECRET], ids=["public-key-only", "with-shared-secret"])
@pytest.mark.parametrize("algorithm", list(KEY_MAKERS))
async def test_hs256_token_keyed_with_the_public_key_pem_is_refused(
    servers: Servers, tmp_path: Path, db: asyncpg.Connection, algorithm: str, shared_secret: str | None
) -> None:
    key_file = public_key_file(tmp_path, KEY_MAKERS[algorithm]())
    forged = hand_made_token("HS256", hmac_key=key_file.read_bytes())
    async with servers.stub(jwt_secret=shared_secret, jwt_public_key_file=key_file) as stub:
        await assert_unauthenticated(stub, db, forged)


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE"])
async def test_unsigned_token_is_refused(
    servers: Servers, tmp_path: Path, db: asyncpg.Connection, algorithm: str
) -> None:
    key_file = public_key_file(tmp_path, KEY_MAKERS["RS256"]())
    async with servers.stub(jwt_public_key_file=key_file) as stub:
        await assert_unauthenticated(stub, db, hand_made_token(algorithm, hmac_key=None))


async def test_rs256_token_is_refused_when_only_a_shared_secret_is_configured(
    servers: Servers, db: asyncpg.Connection
) -> None:
    rs256 = jwt.encode(service_claims(), KEY_MAKERS["RS256"](), "RS256")
    async with servers.stub() as stub:
        await assert_unauthenticated(stub, db, rs256)


@pytest.mark.parametrize(
    ("configured", "signer"), [("RS256", "ES256"), ("ES256", "RS256"), ("RS256", "RS256")], ids=str
)
async def test_token_signed_by_another_key_is_refused(
    servers: Servers, tmp_path: Path, db: asyncpg.Connection, configured: str, signer: str
) -> None:
    key_file = public_key_file(tmp_path, KEY_MAKERS[configured]())
    other = jwt.encode(service_claims(), KEY_MAKERS[signer](), signer)
    async with servers.stub(jwt_secret=None, jwt_public_key_file=key_file) as stub:
        await assert_unauthenticated(stub, db, other)


# --- 3. Issuer and audience ---------------------------------------------------------------------------------


def claims_token(issuer: str | None, audience: str | None) -> str:
    return mint_token(JWT_SECRET, Role.SERVICE, "w", 300, issuer=issuer, audience=audience)


async def test_token_with_the_configured_issuer_and_audience_is_accepted(servers: Servers) -> None:
    async with servers.stub(jwt_issuer=ISSUER, jwt_audience=AUDIENCE) as stub:
        await assert_round_trip(stub, claims_token(ISSUER, AUDIENCE))


@pytest.mark.parametrize(
    ("issuer", "audience"),
    [
        ("https://evil.example", AUDIENCE),
        (ISSUER, "another-service"),
        (ISSUER, None),
        (None, AUDIENCE),
        (None, None),
    ],
    ids=["wrong-issuer", "wrong-audience", "missing-audience", "missing-issuer", "neither"],
)
async def test_token_with_wrong_or_missing_issuer_or_audience_is_refused(
    servers: Servers, db: asyncpg.Connection, issuer: str | None, audience: str | None
) -> None:
    async with servers.stub(jwt_issuer=ISSUER, jwt_audience=AUDIENCE) as stub:
        await assert_unauthenticated(stub, db, claims_token(issuer, audience))


async def test_audience_list_containing_the_configured_audience_is_accepted(servers: Servers) -> None:
    bearer = jwt.encode(service_claims(iss=ISSUER, aud=["crm", AUDIENCE]), JWT_SECRET, "HS256")
    async with servers.stub(jwt_issuer=ISSUER, jwt_audience=AUDIENCE) as stub:
        await assert_round_trip(stub, bearer)


# --- healthcheck command --------------------------------------------------------------------------------------


async def test_healthcheck_command_speaks_mtls(database_url: str, encryption_key: str, pki: Pki) -> None:
    settings = settings_for(database_url, encryption_key, **tls_settings(pki, require_client_certs=True))
    application = await app.start(settings)
    try:
        env = {
            "DEADLETTER_LISTEN": f"localhost:{application.port}",
            "DEADLETTER_TLS_CERT_FILE": str(pki.server_cert),
            "DEADLETTER_TLS_KEY_FILE": str(pki.server_key),
            "DEADLETTER_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
            "DEADLETTER_HEALTHCHECK_CA_FILE": str(pki.ca_cert),
        }
        without_identity = await run_server_command(env, command="healthcheck")
        identity = {"DEADLETTER_HEALTHCHECK_CERT_FILE": str(pki.client_cert)}
        identity["DEADLETTER_HEALTHCHECK_KEY_FILE"] = str(pki.client_key)
        with_identity = await run_server_command(env | identity, command="healthcheck")
        no_ca = await run_server_command(
            {k: v for k, v in env.items() if "HEALTHCHECK" not in k}, command="healthcheck"
        )
    finally:
        await application.stop(0)
    assert with_identity == (0, "SERVING\n")
    assert without_identity[0] == 1
    assert no_ca[0] == 2
    assert "DEADLETTER_HEALTHCHECK_CA_FILE" in no_ca[1]
