"""The JSON log line: its time format, field order and what an exception contributes."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

import pytest

from server import logs


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("deadletter.rpc", logging.INFO, __file__, 1, "rpc", None, None)
    record.created = created
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("created", [1_764_756_000.0, 1_764_756_000.0009, 1_764_756_000.5, 1_764_756_059.9999])
def test_time_is_iso_8601_utc_with_milliseconds(created: float) -> None:
    line = json.loads(logs.JsonFormatter().format(_record(created)))
    assert line["time"] == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def test_fields_keep_their_order_and_call_fields_come_before_extras() -> None:
    token = logs.call_fields.set({"method": "/deadletter.v1.DeadLetterService/Store", "correlation_id": "c-1"})
    try:
        line = logs.JsonFormatter().format(_record(1_764_756_000.0, code="OK", duration_ms=1.5))
    finally:
        logs.call_fields.reset(token)
    assert list(json.loads(line)) == [
        "time", "level", "logger", "message", "method", "correlation_id", "code", "duration_ms",
    ]  # fmt: skip


def test_an_exception_is_logged_by_type_and_stack_never_by_its_text() -> None:
    value = "".join(["patient ", "Jane", " Roe said hello"])  # not in the source line the stack quotes
    try:
        raise ValueError(value)  # driver messages can quote a failed query's values
    except ValueError:
        record = logging.LogRecord("deadletter.rpc", logging.ERROR, __file__, 1, "failed", None, None)
        record.exc_info = sys.exc_info()
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["exception"] == "ValueError"
    assert "test_logs.py" in line["stack"]
    assert "Jane" not in json.dumps(line)
