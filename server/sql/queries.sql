-- Every query the service runs, by name. server/sql/__init__.py loads this file once.
-- Parameters are positional ($1...) and always bound, never formatted into the text.

-- name: act_as
-- First statement of every request's transaction: the caller's database role and subject, for this
-- transaction only (is_local = true), so a pooled connection never carries them to its next borrower.
SELECT set_config('role', $1, true), set_config('app.actor', $2, true);

-- name: insert_dead_letter
-- The record and its audit row in one statement. Returns no row when the idempotency key is taken; the caller
-- then reads the existing record (and audits that).
WITH inserted AS (
    INSERT INTO dead_letter_queue (
        id, event_id, provider, received_at, correlation_id, payload_encrypted, headers_encrypted,
        payload_size_bytes, error_message, retry_count, idempotency_key
    )
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, failed_at, event_id, provider, correlation_id
), audited AS (
    INSERT INTO audit_log (actor, role, peer, method, action, outcome, dead_letter_ids, event_id, provider,
                           correlation_id)
    SELECT $12, $13, $14, $15, 'stored', 'OK', ARRAY[id], event_id, provider, correlation_id FROM inserted
)
SELECT failed_at FROM inserted;

-- name: insert_audit
INSERT INTO audit_log (actor, role, peer, method, action, outcome, dead_letter_ids, event_id, provider,
                       correlation_id, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: get_dead_letter
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE id = $1;

-- name: get_dead_letter_by_idempotency_key
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE idempotency_key = $1;

-- name: list_dead_letters
-- Keyset pagination: rows strictly after the cursor ($3, $4) in (failed_at DESC, id DESC) order. The first page
-- passes NULLs, which sort after every row. Served by dead_letter_queue_failed_at_id_idx.
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key
FROM dead_letter_queue
WHERE failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND (failed_at, id) < (COALESCE($3::timestamptz, 'infinity'),
                         COALESCE($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
ORDER BY failed_at DESC, id DESC
LIMIT $5;

-- name: list_dead_letters_by_provider
-- As list_dead_letters, for one provider; served by dead_letter_queue_provider_failed_at_id_idx.
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key
FROM dead_letter_queue
WHERE provider = $6
  AND failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND (failed_at, id) < (COALESCE($3::timestamptz, 'infinity'),
                         COALESCE($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
ORDER BY failed_at DESC, id DESC
LIMIT $5;
