"""Encryption at rest: AES-256-GCM envelopes with a keyring so keys can rotate.

A sealed value is ``v1.<key id>.<base64(nonce || ciphertext || tag)>``: the format version, then the id of the
key that made it, so each record is opened with the key it names (never by trying every key). The nonce is 96
random bits, fresh for every encryption. The associated data binds the ciphertext to its record and field
(``v1|<record id>|<field>``; ids only, never content), so a ciphertext copied onto another row, or from the
payload column into the headers column, fails to open.

Never log or return plaintext or key material from here; errors carry record and key ids only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.config import ConfigError
from server.errors import KeyUnavailable, RecordCorrupted

FORMAT_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEYS_VARIABLE = "DEADLETTER_ENCRYPTION_KEYS"


def generate_key() -> str:
    """Return a new random key, base64-encoded, in the form DEADLETTER_ENCRYPTION_KEYS takes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    """Derive a key's public id: stable, short, and revealing nothing useful about the key."""
    return hmac.new(key, b"deadletter key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class _Key:
    id: str
    aead: AESGCM
    material: bytes


class Keyring:
    """The configured keys, newest first. The first key encrypts; any key decrypts what it sealed."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError(f"{KEYS_VARIABLE} holds no key")
        self._keys = [_Key(key_id(k), AESGCM(k), k) for k in keys]
        self._by_id = {k.id: k for k in self._keys}
        if len(self._by_id) != len(self._keys):
            raise ConfigError(f"{KEYS_VARIABLE} lists the same key twice")

    @classmethod
    def parse(cls, value: str) -> Keyring:
        """Parse the comma-separated base64 keys of DEADLETTER_ENCRYPTION_KEYS; errors never echo a key."""
        keys = []
        for position, text in enumerate(value.split(","), start=1):
            try:
                key = base64.b64decode(text.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{KEYS_VARIABLE}: key #{position} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(
                    f"{KEYS_VARIABLE}: key #{position} is {len(key)} bytes; AES-256 needs exactly {KEY_BYTES}"
                )
            keys.append(key)
        return cls(keys)

    @property
    def primary_id(self) -> str:
        return self._keys[0].id

    @property
    def ids(self) -> list[str]:
        return [k.id for k in self._keys]

    def derive(self, purpose: bytes) -> list[bytes]:
        """Per-purpose MAC keys from every key, primary first, so MACs verify across a rotation."""
        return [hmac.new(k.material, b"deadletter derive " + purpose, hashlib.sha256).digest() for k in self._keys]

    def seal(self, plaintext: bytes, record_id: str, field: str) -> str:
        """Encrypt plaintext for one field of one record under the primary key."""
        key = self._keys[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = key.aead.encrypt(nonce, plaintext, _associated_data(record_id, field))
        return f"{FORMAT_VERSION}.{key.id}.{base64.b64encode(nonce + sealed).decode('ascii')}"

    def open(self, value: str, record_id: str, field: str) -> bytes:
        """Decrypt a sealed value, raising RecordCorrupted if it fails authentication or is malformed."""
        version, _, rest = value.partition(".")
        kid, _, body = rest.partition(".")
        if version != FORMAT_VERSION or not kid or not body:
            raise RecordCorrupted(record_id)
        key = self._by_id.get(kid)
        if key is None:
            raise KeyUnavailable(record_id, kid)
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise RecordCorrupted(record_id) from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise RecordCorrupted(record_id)
        try:
            return key.aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _associated_data(record_id, field))
        except InvalidTag:
            raise RecordCorrupted(record_id) from None


def _associated_data(record_id: str, field: str) -> bytes:
    return f"{FORMAT_VERSION}|{record_id}|{field}".encode("ascii")
