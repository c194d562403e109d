-- Every query the service runs, by name. server/sql/__init__.py loads this file once.
-- Parameters are positional ($1...) and always bound, never formatted into the text.

-- name: act_as
-- First statement of every request's transaction: the caller's database role and subject, for this
-- transaction only (is_local = true), so a pooled connection never carries them to its next borrower.
SELECT set_config('role', $1, true), set_config('app.actor', $2, true);

-- name: store_batch
-- Many dead letters and their audit rows in one statement (migrations/0005); run outside a transaction block,
-- so its return means they are committed. Returns the rows inserted; a row whose idempotency key is taken is
-- not among them.
SELECT id, failed_at
FROM deadletter_store_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15);

-- name: insert_audit
INSERT INTO audit_log (actor, role, peer, method, action, outcome, dead_letter_ids, event_id, provider,
                       correlation_id, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11);

-- name: get_dead_letter_for_update
-- Reprocess locks the row: concurrent Reprocess calls for one id queue here and see each other's outcome.
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count,
       payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE id = $1
FOR UPDATE;

-- name: get_dead_letter
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count,
       payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE id = $1;

-- name: get_dead_letter_by_idempotency_key
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count,
       payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE idempotency_key = $1;

-- name: list_dead_letters
-- Keyset pagination: rows strictly after the cursor ($3, $4) in (failed_at DESC, id DESC) order. The first page
-- passes NULLs, which sort after every row. Served by dead_letter_queue_failed_at_id_idx.
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count
FROM dead_letter_queue
WHERE failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND (failed_at, id) < (COALESCE($3::timestamptz, 'infinity'),
                         COALESCE($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
  AND ($6::text IS NULL OR failure_kind = $6)
  AND ($7::text IS NULL OR status = $7)
ORDER BY failed_at DESC, id DESC
LIMIT $5;

-- name: list_dead_letters_by_provider
-- As list_dead_letters, for one provider; served by dead_letter_queue_provider_failed_at_id_idx.
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count
FROM dead_letter_queue
WHERE provider = $8
  AND failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND (failed_at, id) < (COALESCE($3::timestamptz, 'infinity'),
                         COALESCE($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
  AND ($6::text IS NULL OR failure_kind = $6)
  AND ($7::text IS NULL OR status = $7)
ORDER BY failed_at DESC, id DESC
LIMIT $5;

-- name: reprocess_dead_letter
-- Marks the dead letter reprocessed and puts it on the outbox, in one statement; the ciphertexts are copied
-- unchanged (their associated data names the dead letter, not the queue row).
WITH updated AS (
    UPDATE dead_letter_queue
    SET status = 'reprocessed', reprocessed_at = now(), reprocessed_by = $2, reprocess_count = reprocess_count + 1
    WHERE id = $1
    RETURNING *
), queued AS (
    INSERT INTO webhook_queue (id, dead_letter_id, attempt, provider, event_id, correlation_id, payload_encrypted,
                               headers_encrypted)
    SELECT $3, id, reprocess_count, provider, event_id, correlation_id, payload_encrypted, headers_encrypted
    FROM updated
)
SELECT id, event_id, provider, correlation_id, error_message, retry_count, received_at, failed_at,
       payload_size_bytes, idempotency_key, failure_kind, status, reprocessed_at, reprocessed_by, reprocess_count
FROM updated;

-- name: redrive_candidates
-- Pending, retryable dead letters a Redrive would send, oldest failure first (dead_letter_queue_pending_failed_at_idx).
-- The caller asks for one more than its limit to learn whether more remain.
SELECT id
FROM dead_letter_queue
WHERE status = 'pending' AND failure_kind = 'retryable'
  AND failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND ($3::text IS NULL OR provider = $3)
  AND ($4::text IS NULL OR failure_kind = $4)
ORDER BY failed_at, id
LIMIT $5;

-- name: redrive_skipped
-- Matches a Redrive does not send: already reprocessed, or not retryable.
SELECT count(*)
FROM dead_letter_queue
WHERE NOT (status = 'pending' AND failure_kind = 'retryable')
  AND failed_at >= COALESCE($1::timestamptz, '-infinity')
  AND failed_at < COALESCE($2::timestamptz, 'infinity')
  AND ($3::text IS NULL OR provider = $3)
  AND ($4::text IS NULL OR failure_kind = $4);

-- name: claim_queued
-- The next available item, leased to the caller; SKIP LOCKED lets many workers claim at once.
UPDATE webhook_queue
SET available_at = now() + make_interval(secs => $1), claimed_by = $2, claim_count = claim_count + 1
WHERE id = (
    SELECT id FROM webhook_queue
    WHERE available_at <= now()
    ORDER BY available_at, enqueued_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING id, dead_letter_id, attempt, provider, event_id, correlation_id, payload_encrypted, headers_encrypted;

-- name: acknowledge_queued
DELETE FROM webhook_queue WHERE id = $1 RETURNING dead_letter_id;

-- name: relay_batch
-- Items for the broker relay, locked until its transaction ends: a relay that dies mid-batch leaves them for
-- the next run (which republishes them under the same message ids).
SELECT id, dead_letter_id, attempt, provider, event_id, correlation_id, payload_encrypted, headers_encrypted
FROM webhook_queue
WHERE available_at <= now()
ORDER BY enqueued_at
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: delete_queued
DELETE FROM webhook_queue WHERE id = ANY($1::uuid[]);

-- name: count_expired
SELECT count(*) FROM dead_letter_queue WHERE failed_at < $1;

-- name: purge_batch
-- One batch of a purge: a few thousand rows per transaction, so no lock is held for long and Store never waits.
WITH doomed AS (
    SELECT id FROM dead_letter_queue
    WHERE failed_at < $1
    ORDER BY failed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM dead_letter_queue AS d USING doomed WHERE d.id = doomed.id;

-- name: try_retention_lock
-- The transaction stays open, idle, while the purge runs its batches on other connections (minutes for a big
-- backlog): a server-wide idle_in_transaction_session_timeout must not end it, and the run with it.
SELECT pg_try_advisory_xact_lock($1), set_config('idle_in_transaction_session_timeout', '0', true);

-- name: claim_retention_run
-- The first replica to record today's run performs it; the others find the row and skip.
INSERT INTO retention_runs (run_on, cutoff) VALUES ($1, $2) ON CONFLICT (run_on) DO NOTHING RETURNING run_on;

-- name: finish_retention_run
UPDATE retention_runs SET purged = $2 WHERE run_on = $1;

-- name: ping
SELECT 1;

-- name: pending_by_provider
-- For the metrics refresher, every few tens of seconds: never per scrape. An index-only scan of
-- dead_letter_queue_pending_provider_idx (migrations/0006).
SELECT provider, count(*) AS pending, min(failed_at) AS oldest
FROM dead_letter_queue
WHERE status = 'pending'
GROUP BY provider;

-- name: queued_count
SELECT count(*) FROM webhook_queue;

-- name: last_retention_success
SELECT max(started_at) FROM retention_runs WHERE purged IS NOT NULL;

-- name: rotation_batch_dead_letter_queue
-- Key rotation (server/rotation.py), one batch: rows with a value under a key other than the primary ($1),
-- after the cursor ($2), not already skipped ($3), locked without waiting for anyone.
SELECT id, id AS record_id, payload_encrypted, headers_encrypted
FROM dead_letter_queue
WHERE id > $2
  AND (split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1)
  AND NOT (id = ANY($3::uuid[]))
ORDER BY id
LIMIT $4
FOR UPDATE SKIP LOCKED;

-- name: rotation_batch_webhook_queue
-- As rotation_batch_dead_letter_queue, for the outbox (its values are bound to dead_letter_id).
SELECT id, dead_letter_id AS record_id, payload_encrypted, headers_encrypted
FROM webhook_queue
WHERE id > $2
  AND (split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1)
  AND NOT (id = ANY($3::uuid[]))
ORDER BY id
LIMIT $4
FOR UPDATE SKIP LOCKED;

-- name: rotation_reseal_dead_letter_queue
-- Write resealed values back, each only if the row still holds what was read: never overwrite a change.
UPDATE dead_letter_queue AS d
SET payload_encrypted = r.payload_encrypted, headers_encrypted = r.headers_encrypted
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
    AS r (id, old_payload, old_headers, payload_encrypted, headers_encrypted)
WHERE d.id = r.id AND d.payload_encrypted = r.old_payload AND d.headers_encrypted = r.old_headers
RETURNING d.id;

-- name: rotation_reseal_webhook_queue
-- As rotation_reseal_dead_letter_queue, for the outbox.
UPDATE webhook_queue AS q
SET payload_encrypted = r.payload_encrypted, headers_encrypted = r.headers_encrypted
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
    AS r (id, old_payload, old_headers, payload_encrypted, headers_encrypted)
WHERE q.id = r.id AND q.payload_encrypted = r.old_payload AND q.headers_encrypted = r.old_headers
RETURNING q.id;

-- name: rotation_pending_dead_letter_queue
-- Rows another rotation pass could still rotate: under another key and not skipped ($2).
SELECT count(*) FROM dead_letter_queue
WHERE (split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1)
  AND NOT (id = ANY($2::uuid[]));

-- name: rotation_pending_webhook_queue
-- As rotation_pending_dead_letter_queue, for the outbox.
SELECT count(*) FROM webhook_queue
WHERE (split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1)
  AND NOT (id = ANY($2::uuid[]));

-- name: rotation_remaining_dead_letter_queue
-- Rows left under another key, by that key's id (the payload's, or the headers' when only they are behind).
SELECT CASE WHEN split_part(payload_encrypted, '.', 2) <> $1 THEN split_part(payload_encrypted, '.', 2)
            ELSE split_part(headers_encrypted, '.', 2) END AS key_id,
       count(*) AS records
FROM dead_letter_queue
WHERE split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1
GROUP BY 1;

-- name: rotation_remaining_webhook_queue
-- As rotation_remaining_dead_letter_queue, for the outbox.
SELECT CASE WHEN split_part(payload_encrypted, '.', 2) <> $1 THEN split_part(payload_encrypted, '.', 2)
            ELSE split_part(headers_encrypted, '.', 2) END AS key_id,
       count(*) AS records
FROM webhook_queue
WHERE split_part(payload_encrypted, '.', 2) <> $1 OR split_part(headers_encrypted, '.', 2) <> $1
GROUP BY 1;
