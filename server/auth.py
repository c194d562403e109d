"""Who is calling: bearer JWTs verified with PyJWT, mapped to the service or admin role.

Token shapes follow Supabase: ``role: service_role`` is the service; ``role: authenticated`` with
``app_metadata.role == "admin"`` is an admin. ``user_metadata`` is editable by end users and never grants
anything. Each key accepts exactly one algorithm (HS256 for the shared secret; RS256 or ES256 for a public
key, by its type): the token's header only chooses which key to try, never what a key accepts.

Never log or echo a token; errors say what was wrong with it, not what it was.
"""

from __future__ import annotations

import base64
import contextvars
import enum
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.config import ConfigError
from server.errors import Unauthenticated

MIN_SECRET_BYTES = 32
MAX_SUBJECT_CHARS = 256
MIN_RSA_BITS = 2048
_VERIFIED_TOKENS = 1024


class Role(enum.StrEnum):
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. role is None for a valid token that grants no role here."""

    subject: str
    role: Role | None


# Set by the interceptor for each call; handlers read it and never parse metadata themselves.
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller")


class TokenVerifier:
    """Verifies bearer tokens against a shared secret (HS256) and/or a public key (RS256 or ES256)."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key_pem: bytes | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 30.0,
    ) -> None:
        self._keys: dict[str, Any] = {}
        if secret is not None:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"DEADLETTER_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
            self._keys["HS256"] = secret
        if public_key_pem is not None:
            algorithm, key = _public_key(public_key_pem)
            self._keys[algorithm] = key
        if not self._keys:
            raise ConfigError("set DEADLETTER_JWT_SECRET or DEADLETTER_JWT_PUBLIC_KEY_FILE to verify callers")
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        # Workers send the same token on every call: remember what a verified token said until it expires.
        self._verified: dict[str, tuple[Caller, float]] = {}

    def verify(self, token: str) -> Caller:
        """Return the caller a token names, or raise Unauthenticated."""
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        caller, expires = self._verify(token)
        if len(self._verified) >= _VERIFIED_TOKENS:
            self._verified.clear()
        self._verified[token] = (caller, expires)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        try:
            algorithm = str(jwt.get_unverified_header(token).get("alg"))
            key = self._keys.get(algorithm)
            if key is None:
                raise Unauthenticated("bearer token is signed with an algorithm this server does not accept")
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer token has expired") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as error:
            raise Unauthenticated(f"bearer token rejected: {type(error).__name__}") from None
        except jwt.PyJWTError:
            raise Unauthenticated("bearer token is malformed or its signature does not verify") from None
        # Cached until exp (as verified, so a number), never beyond: an expired token is verified again and refused.
        return _caller(claims), float(claims["exp"])


def _caller(claims: dict[str, Any]) -> Caller:
    role: Role | None = None
    app_metadata = claims.get("app_metadata")
    if claims.get("role") == "service_role":
        role = Role.SERVICE
    elif (
        claims.get("role") == "authenticated" and isinstance(app_metadata, dict) and app_metadata.get("role") == "admin"
    ):
        role = Role.ADMIN
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        subject = str(claims.get("role") or "anonymous")
    if len(subject) > MAX_SUBJECT_CHARS or "\x00" in subject:
        # Truncating would merge distinct actors in the audit trail.
        raise Unauthenticated(f"bearer token's sub is longer than {MAX_SUBJECT_CHARS} characters or malformed")
    return Caller(subject, role)


def _public_key(pem: bytes) -> tuple[str, Any]:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ConfigError("DEADLETTER_JWT_PUBLIC_KEY_FILE does not hold a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"DEADLETTER_JWT_PUBLIC_KEY_FILE: RSA keys need at least {MIN_RSA_BITS} bits")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ConfigError("DEADLETTER_JWT_PUBLIC_KEY_FILE must hold an RSA or P-256 EC public key")


def bearer_token(metadata: dict[str, str]) -> str:
    """The token from 'authorization: Bearer <token>' call metadata, or raise Unauthenticated."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    return token.strip()


def mint_token(
    secret: str, role: Role, subject: str, ttl_seconds: int, issuer: str | None = None, audience: str | None = None
) -> str:
    """Make an HS256 token of the shape the verifier accepts, for local use and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "nbf": now, "exp": now + ttl_seconds}
    if role is Role.SERVICE:
        claims["role"] = "service_role"
    else:
        claims |= {"role": "authenticated", "app_metadata": {"role": "admin"}}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def generate_jwt_secret() -> str:
    """A new random HS256 secret (48 bytes, base64url)."""
    return base64.urlsafe_b64encode(os.urandom(48)).decode("ascii")


def read_public_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        raise ConfigError("DEADLETTER_JWT_PUBLIC_KEY_FILE cannot be read") from None
