-- Access control inside PostgreSQL, independent of the gRPC interceptor, and the audit trail.
--
-- Two NOLOGIN roles carry every privilege: deadletter_service (workers, automation: full access) and
-- deadletter_admin (compliance review: read only). The server logs in as a role of its own that is neither
-- superuser nor table owner and holds no privilege itself (NOINHERIT member of both); each request switches
-- to one of the two with SET LOCAL ROLE, so a request can never do more than its caller's role allows.
-- Roles are cluster-wide, so creating them is idempotent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'deadletter_service') THEN
        CREATE ROLE deadletter_service NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'deadletter_admin') THEN
        CREATE ROLE deadletter_admin NOLOGIN;
    END IF;
END
$$;

-- FORCE: row-level security applies to the table owner as well; only superusers and BYPASSRLS roles skip it,
-- and the server's login role is neither.
ALTER TABLE dead_letter_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE dead_letter_queue FORCE ROW LEVEL SECURITY;

CREATE POLICY dead_letter_queue_service_all ON dead_letter_queue
    FOR ALL TO deadletter_service USING (true) WITH CHECK (true);
CREATE POLICY dead_letter_queue_admin_read ON dead_letter_queue
    FOR SELECT TO deadletter_admin USING (true);

REVOKE ALL ON dead_letter_queue FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON dead_letter_queue TO deadletter_service;
GRANT SELECT ON dead_letter_queue TO deadletter_admin;

REVOKE ALL ON deadletter_schema_migrations FROM PUBLIC;
GRANT SELECT ON deadletter_schema_migrations TO deadletter_service, deadletter_admin;

-- Who did what to which dead letter, and when. Ids and outcomes only: never payloads, headers, tokens or
-- keys. Rows are written in the same transaction as the change they record. Purge and retention never
-- touch this table; it is kept longer than the dead letters.
CREATE TABLE audit_log (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor           TEXT        NOT NULL,  -- the token's subject; '' when the caller was not authenticated
    role            TEXT        NOT NULL,  -- 'service', 'admin', or '' when no role was granted
    peer            TEXT        NOT NULL,  -- the caller's network address as gRPC saw it
    method          TEXT        NOT NULL,  -- the full gRPC method name
    action          TEXT        NOT NULL
        CHECK (action IN ('stored', 'viewed', 'listed', 'reprocessed', 'purged', 'denied')),
    outcome         TEXT        NOT NULL,  -- the gRPC status code name, OK for success
    dead_letter_ids UUID[]      NOT NULL DEFAULT '{}',
    event_id        TEXT,
    provider        TEXT,
    correlation_id  TEXT,
    metadata        JSONB       NOT NULL DEFAULT '{}'  -- small facts: counts, flags, cut-offs
);

CREATE INDEX audit_log_occurred_at_idx ON audit_log (occurred_at);
CREATE INDEX audit_log_dead_letter_ids_idx ON audit_log USING gin (dead_letter_ids);

REVOKE ALL ON audit_log FROM PUBLIC;
GRANT SELECT, INSERT ON audit_log TO deadletter_service, deadletter_admin;

-- Append-only even for the owner: corrections are new rows, never edits.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
