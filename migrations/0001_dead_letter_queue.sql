-- The dead letters: webhook deliveries that failed processing after all retries.
--
-- The spec's columns keep their names and types. payload_encrypted and headers_encrypted hold AES-256-GCM
-- envelopes (see server/crypto.py), never plaintext. error_message is plaintext by design (searchable for
-- review), so workers must not quote payloads in it.
CREATE TABLE dead_letter_queue (
    id                 UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id           TEXT        NOT NULL,
    provider           TEXT        NOT NULL CHECK (provider IN ('facebook', 'instagram', 'whatsapp')),
    received_at        TIMESTAMPTZ NOT NULL,
    correlation_id     TEXT        NOT NULL,
    payload_encrypted  TEXT        NOT NULL,
    error_message      TEXT        NOT NULL,
    retry_count        INTEGER     NOT NULL CHECK (retry_count >= 0),
    failed_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Beyond the spec: the delivery's HTTP headers (encrypted like the payload), the plaintext size for
    -- review screens, and the worker's idempotency key.
    headers_encrypted  TEXT        NOT NULL,
    payload_size_bytes INTEGER     NOT NULL CHECK (payload_size_bytes > 0),
    idempotency_key    TEXT
);

-- One record per idempotency key; rows without a key are unconstrained.
CREATE UNIQUE INDEX dead_letter_queue_idempotency_key_key
    ON dead_letter_queue (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- List's keyset order (failed_at DESC, id DESC), unfiltered and by provider. These are also the indexes on
-- failed_at and on provider: separate single-column ones would only slow every Store down.
CREATE INDEX dead_letter_queue_failed_at_id_idx
    ON dead_letter_queue (failed_at DESC, id DESC);
CREATE INDEX dead_letter_queue_provider_failed_at_id_idx
    ON dead_letter_queue (provider, failed_at DESC, id DESC);

CREATE INDEX dead_letter_queue_event_id_idx
    ON dead_letter_queue (event_id);
