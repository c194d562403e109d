"""The audit trail's vocabulary: who acted (Actor), what they did (Action), and the row that records it.

An entry holds ids, names and counts only: never payloads, headers, tokens or keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from server.auth import Role


class Action(enum.StrEnum):
    STORED = "stored"
    VIEWED = "viewed"
    LISTED = "listed"
    REPROCESSED = "reprocessed"
    PURGED = "purged"
    DENIED = "denied"


@dataclass(frozen=True)
class Actor:
    """The caller of one RPC, as the interceptor established it."""

    subject: str
    role: Role | None
    peer: str
    method: str


@dataclass(frozen=True)
class AuditEntry:
    actor: Actor
    action: Action
    outcome: str = "OK"
    dead_letter_ids: tuple[str, ...] = ()
    event_id: str | None = None
    provider: str | None = None
    correlation_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
