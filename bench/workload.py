"""What the benchmark sends: a realistic ~2 KiB WhatsApp webhook as a Store request, and its gRPC frame.

The body starts from tests/samples/webhooks/whatsapp-text-message.json with the patient's message made longer
(still valid JSON, ASCII like Meta's escaped bodies), and its x-hub-signature-256 is recomputed with the
samples' made-up app secret, so it is what a worker would really hand over after a failed delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deadletter.v1 import deadletter_pb2 as pb
from server.config import PROJECT_ROOT

SAMPLES = PROJECT_ROOT / "tests" / "samples" / "webhooks"
SAMPLE = SAMPLES / "whatsapp-text-message.json"
BODY_BYTES = 2048
STORE_METHOD = "/deadletter.v1.DeadLetterService/Store"
ERROR_MESSAGE = "CRM API answered 503 Service Unavailable"

_MESSAGE = (
    "Hi, I need to move my appointment on Friday. My test results came back and Dr. Rivera wants to see me "
    "sooner. The lab said the HbA1c was 7.9 and the fasting glucose 162, and the nurse asked me to bring my "
    "glucose diary and the list of medication I take now: metformin 1000 mg twice a day, lisinopril 10 mg in "
    "the morning and atorvastatin 20 mg at night. I also started getting headaches in the afternoon since last "
    "week, mostly after lunch, and my blood pressure at home was 148/92 yesterday evening. Could you tell me if "
    "Tuesday or Wednesday morning is possible? I work until 2 pm most days but I can ask my manager to leave "
    "early if it has to be in the afternoon. My insurance changed in January, the new member number is on the "
    "card I will bring, and the clinic portal still shows the old one. Should I fast before the visit again or "
    "is that only for the blood test? Also my daughter Sofia (she is 9) needs her school vaccination form "
    "signed before the end of the month, can we do both on the same day? Sorry for the long message and thank "
    "you so much for your help, the reception line was busy all morning and I could not get through. "
)


@dataclass(frozen=True)
class Workload:
    """The Store request every load generator sends, and the pieces other sections reuse."""

    body: bytes
    headers: dict[str, str]
    event_id: str
    request: pb.StoreRequest

    @property
    def frame(self) -> bytes:
        """The request as one gRPC message on the wire: uncompressed flag, 4-byte big-endian length, bytes."""
        message = self.request.SerializeToString()
        return struct.pack(">BI", 0, len(message)) + message

    @property
    def headers_json(self) -> bytes:
        """The headers as the vault seals them."""
        return json.dumps(self.headers, sort_keys=True, ensure_ascii=False).encode("utf-8")


def padded_body(size: int = BODY_BYTES) -> bytes:
    """The sample webhook with its text message lengthened so the compact JSON is exactly size bytes."""
    document: dict[str, Any] = json.loads(SAMPLE.read_bytes())
    message = document["entry"][0]["changes"][0]["value"]["messages"][0]
    message["text"]["body"] = ""
    overhead = len(_compact(document))
    if overhead >= size:
        raise ValueError(f"the sample is already {overhead} bytes")
    text = (_MESSAGE * (1 + size // len(_MESSAGE)))[: size - overhead].rstrip()
    message["text"]["body"] = text.ljust(size - overhead, ".")
    body = _compact(document)
    assert len(body) == size
    assert json.loads(body) == document
    return body


def workload() -> Workload:
    body = padded_body()
    manifest = json.loads((SAMPLES / "manifest.json").read_text(encoding="utf-8"))
    secret = manifest["app_secret_for_signatures"].encode()
    headers = {
        "content-type": "application/json",
        "x-hub-signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
    }
    event_id = json.loads(body)["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    request = pb.StoreRequest(
        event_id=event_id,
        provider=pb.PROVIDER_WHATSAPP,
        payload=body,
        headers=headers,
        error_message=ERROR_MESSAGE,
        retry_count=3,
        correlation_id=f"bench-{uuid.uuid4()}",
        # No idempotency_key: every request is the same bytes, so with a key all but the first would be replays.
    )
    request.received_at.FromDatetime(datetime.now(UTC).replace(microsecond=0))
    return Workload(body, headers, event_id, request)


def _compact(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
