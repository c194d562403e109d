"""Prometheus metrics, served on their own HTTP port (DEADLETTER_METRICS_LISTEN).

Labels are method names, status codes and providers only: never ids, subjects or anything from a payload.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("deadletter.metrics")

RPCS = Counter("deadletter_rpc_requests_total", "RPCs handled, by method and status code.", ["method", "code"])
RPC_SECONDS = Histogram(
    "deadletter_rpc_duration_seconds",
    "RPC latency, by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STORED = Counter("deadletter_stored_total", "Dead letters stored (idempotent replays excluded).", ["provider"])
REPROCESSED = Counter("deadletter_reprocessed_total", "Dead letters sent back for processing.", ["provider"])
PURGED = Counter("deadletter_purged_total", "Dead letters deleted by Purge or retention.")
DECRYPTION_FAILURES = Counter(
    "deadletter_decryption_failures_total", "Sealed values that failed to open (DATA_LOSS or an unknown key)."
)
PENDING = Gauge(
    "deadletter_pending", "Dead letters not yet sent back, by provider (refreshed periodically).", ["provider"]
)
OLDEST_PENDING_AGE = Gauge(
    "deadletter_oldest_pending_age_seconds", "Age of the oldest pending dead letter, by provider.", ["provider"]
)
QUEUED = Gauge("deadletter_queued", "Webhooks waiting in the processing outbox.")
RETENTION_LAST_SUCCESS = Gauge(
    "deadletter_retention_last_success_timestamp_seconds",
    "When a daily retention purge last finished, on any replica (Unix time).",
)
DATABASE_UP = Gauge("deadletter_database_up", "1 when the last database check succeeded, else 0.")


def serve(listen: str) -> int:
    """Start the metrics HTTP server on host:port (port 0 picks one); return the bound port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"))
    bound: int = server.server_port
    log.info("metrics listening", extra={"address": f"{host}:{bound}"})
    return bound
