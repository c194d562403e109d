"""Opaque List page tokens: the keyset cursor, authenticated with a MAC over the cursor and the filters.

A token is only good for the filters it was issued with (AIP-158) and cannot be edited or forged; both are
detected by the MAC and answered with INVALID_ARGUMENT. The MAC keys come from the encryption keyring, so every
replica accepts every other replica's tokens, and tokens survive a key rotation while the old key is listed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from datetime import UTC, datetime, timedelta

from server.domain import Cursor, ListFilter
from server.errors import InvalidArgument

_VERSION = 1
_BODY = struct.Struct(">Bq16s")  # version, failed_at in microseconds since the epoch, id
_MAC_BYTES = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageTokens:
    """Issues and checks page tokens with MAC keys (the first signs, all verify)."""

    def __init__(self, mac_keys: list[bytes]) -> None:
        self._keys = mac_keys

    def encode(self, cursor: Cursor, filters: ListFilter) -> str:
        micros = (cursor.failed_at - _EPOCH) // timedelta(microseconds=1)
        body = _BODY.pack(_VERSION, micros, cursor.id.bytes)
        return base64.urlsafe_b64encode(body + self._mac(self._keys[0], body, filters)).decode("ascii")

    def decode(self, token: str, filters: ListFilter) -> Cursor:
        """Return the cursor in token, or raise InvalidArgument if it is not ours, edited, or for other filters."""
        try:
            # validate=True: the lenient decoder skips foreign characters, so an edited token could still pass.
            raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise _invalid() from None
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if len(body) != _BODY.size or len(mac) != _MAC_BYTES:
            raise _invalid()
        if not any(hmac.compare_digest(mac, self._mac(key, body, filters)) for key in self._keys):
            raise _invalid()
        version, micros, id_bytes = _BODY.unpack(body)
        if version != _VERSION:
            raise _invalid()
        return Cursor(_EPOCH + timedelta(microseconds=micros), uuid.UUID(bytes=id_bytes))

    @staticmethod
    def _mac(key: bytes, body: bytes, filters: ListFilter) -> bytes:
        return hmac.new(key, body + _filters_bytes(filters), hashlib.sha256).digest()[:_MAC_BYTES]


def _filters_bytes(filters: ListFilter) -> bytes:
    parts = (
        filters.provider or "",
        filters.failed_after.isoformat() if filters.failed_after else "",
        filters.failed_before.isoformat() if filters.failed_before else "",
        filters.failure_kind or "",
        filters.status or "",
    )
    return "|".join(parts).encode()


def _invalid() -> InvalidArgument:
    return InvalidArgument(
        "page_token", "is not a token this service issued for these filters; start again without one"
    )
