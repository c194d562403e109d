-- Store in one round trip, for many dead letters at once: the server coalesces concurrent Stores into one
-- call. The function runs as its caller (SECURITY INVOKER): it switches to the service role for the rest of
-- the transaction, exactly as every other request does, so row-level security and the grants apply; called
-- in autocommit, the statement is the transaction, and its return means the rows and their audit rows are
-- committed. Rows whose idempotency key is taken are skipped and not returned: the server handles those one
-- by one.
CREATE FUNCTION deadletter_store_batch(
    p_actor            TEXT,
    p_method           TEXT,
    p_ids              UUID[],
    p_peers            TEXT[],
    p_event_ids        TEXT[],
    p_providers        TEXT[],
    p_received_at      TIMESTAMPTZ[],
    p_correlation_ids  TEXT[],
    p_payloads         TEXT[],
    p_headers          TEXT[],
    p_sizes            INTEGER[],
    p_error_messages   TEXT[],
    p_retry_counts     INTEGER[],
    p_idempotency_keys TEXT[],
    p_failure_kinds    TEXT[]
) RETURNS TABLE (id UUID, failed_at TIMESTAMPTZ)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('role', 'deadletter_service', true), set_config('app.actor', p_actor, true);
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO dead_letter_queue AS d (
            id, event_id, provider, received_at, correlation_id, payload_encrypted, headers_encrypted,
            payload_size_bytes, error_message, retry_count, idempotency_key, failure_kind
        )
        SELECT * FROM unnest(
            p_ids, p_event_ids, p_providers, p_received_at, p_correlation_ids, p_payloads, p_headers, p_sizes,
            p_error_messages, p_retry_counts, p_idempotency_keys, p_failure_kinds
        )
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING d.id, d.failed_at, d.event_id, d.provider, d.correlation_id
    ), audited AS (
        INSERT INTO audit_log (actor, role, peer, method, action, outcome, dead_letter_ids, event_id, provider,
                               correlation_id)
        SELECT p_actor, 'service', peers.peer, p_method, 'stored', 'OK', ARRAY[i.id], i.event_id, i.provider,
               i.correlation_id
        FROM inserted AS i JOIN unnest(p_ids, p_peers) AS peers (id, peer) ON peers.id = i.id
    )
    SELECT i.id, i.failed_at FROM inserted AS i;
END
$$;
