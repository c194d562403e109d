"""Structured logging: one JSON object per line on stderr.

Never pass payloads, headers, tokens or keys to a logger. Exceptions are logged by type and stack only: driver
messages can quote the values of a failed query, and those values can be PHI.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import traceback
from typing import Any

# Fields that describe the current call (method, correlation id, record id), added to every line it logs.
call_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("call_fields", default=None)

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

# json.dumps builds a new encoder on every call that passes options; one line per RPC makes that add up.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(call_fields.get() or {})
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the stack, never str(exception): see the module docstring.
            entry["exception"] = record.exc_info[0].__name__
            entry["stack"] = "".join(traceback.format_tb(record.exc_info[2]))
        return _ENCODER.encode(entry)


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds, like datetime.isoformat(timespec="milliseconds") but a third the cost."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}+00:00"


def configure(level: str) -> None:
    """Send every log line, ours and the libraries', through the JSON formatter on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pgserver narrates every command it runs at INFO, over many lines; its warnings still show.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, root.level))
    # The lines never show the caller's file, thread or process, so do not compute them for every record (the
    # logging HOWTO's "Optimization" section); it was a measurable share of a Store's time.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def annotate(**fields: Any) -> None:
    """Add fields to every line logged for the rest of the current call."""
    current = call_fields.get()
    if current is not None:
        current.update(fields)
