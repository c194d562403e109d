"""Print the Store request (grpcurl JSON) for one sample webhook, using its headers from manifest.json.

Usage: python3 scripts/sample_request.py tests/samples/webhooks/whatsapp-text-message.json | grpcurl -d @ ...

event_id is the SHA-256 of the body, the fallback the API allows when a platform gives no event id. Only the
standard library is used, so it runs with any Python 3.11+.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path


def store_request(sample: Path) -> dict[str, object]:
    manifest = json.loads((sample.parent / "manifest.json").read_text(encoding="utf-8"))
    entry = next(s for s in manifest["samples"] if s["file"] == sample.name)
    body = sample.read_bytes()
    return {
        "event_id": "sha256:" + hashlib.sha256(body).hexdigest(),
        "provider": "PROVIDER_" + entry["provider"].upper(),
        "payload": base64.b64encode(body).decode("ascii"),
        "headers": entry["headers"],
        "error_message": "CRM API answered 503 Service Unavailable",
        "retry_count": 3,
        "correlation_id": "readme-" + sample.stem,
        "received_at": "2026-12-03T09:30:00Z",
    }


if __name__ == "__main__":
    print(json.dumps(store_request(Path(sys.argv[1])), indent=2))
