-- Recovery and retention: why a delivery failed, whether it was sent back, the outbox it goes back through,
-- and the record that keeps the daily purge to one run across replicas.

ALTER TABLE dead_letter_queue
    ADD COLUMN failure_kind    TEXT    NOT NULL DEFAULT 'retryable'
        CHECK (failure_kind IN ('retryable', 'signature_invalid', 'malformed_payload', 'permanent')),
    ADD COLUMN status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'reprocessed')),
    ADD COLUMN reprocessed_at  TIMESTAMPTZ,
    ADD COLUMN reprocessed_by  TEXT,
    ADD COLUMN reprocess_count INTEGER NOT NULL DEFAULT 0 CHECK (reprocess_count >= 0);

-- Redrive walks pending dead letters by failure time.
CREATE INDEX dead_letter_queue_pending_failed_at_idx
    ON dead_letter_queue (failed_at, id) WHERE status = 'pending';

-- The processing queue: a transactional outbox. A row is written in the same transaction that marks its dead
-- letter reprocessed, so either both happen or neither. The payload and headers stay sealed exactly as in
-- dead_letter_queue (their associated data names dead_letter_id); workers get them decrypted through the
-- ClaimQueued RPC, or from the broker the relay publishes to. A row leaves the queue when it is acknowledged
-- or published.
CREATE TABLE webhook_queue (
    id                UUID        PRIMARY KEY,
    dead_letter_id    UUID        NOT NULL,
    attempt           INTEGER     NOT NULL CHECK (attempt > 0),
    provider          TEXT        NOT NULL,
    event_id          TEXT        NOT NULL,
    correlation_id    TEXT        NOT NULL,
    payload_encrypted TEXT        NOT NULL,
    headers_encrypted TEXT        NOT NULL,
    enqueued_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A claim is a lease: the row is offered again once available_at passes.
    available_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by        TEXT,
    claim_count       INTEGER     NOT NULL DEFAULT 0,
    UNIQUE (dead_letter_id, attempt)
);

CREATE INDEX webhook_queue_available_idx ON webhook_queue (available_at, enqueued_at);

ALTER TABLE webhook_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhook_queue FORCE ROW LEVEL SECURITY;
CREATE POLICY webhook_queue_service_all ON webhook_queue
    FOR ALL TO deadletter_service USING (true) WITH CHECK (true);
REVOKE ALL ON webhook_queue FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_queue TO deadletter_service;

-- One row per day the retention job ran: the first replica to insert today's row runs it, the rest skip.
CREATE TABLE retention_runs (
    run_on     DATE        PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    cutoff     TIMESTAMPTZ NOT NULL,
    purged     BIGINT
);
REVOKE ALL ON retention_runs FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON retention_runs TO deadletter_service;
