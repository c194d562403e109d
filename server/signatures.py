"""Meta's webhook signatures: x-hub-signature-256 is HMAC-SHA256 of the raw body with the app secret.

Checked before a dead letter goes back for processing, against every configured app secret (several, so a
secret can rotate). Never log the secrets or the body.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "x-hub-signature-256"


def verifies(payload: bytes, headers: dict[str, str], app_secrets: list[bytes]) -> bool:
    """Whether the payload's signature header matches the HMAC under any of the app secrets."""
    value = next((v for k, v in headers.items() if k.lower() == HEADER), "")
    scheme, _, digest = value.partition("=")
    if scheme != "sha256" or not digest:
        return False
    return any(
        hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).hexdigest(), digest.lower())
        for secret in app_secrets
    )
