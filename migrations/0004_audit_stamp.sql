-- PostgreSQL, not the application, stamps each audit row's time and actor: the time is the transaction's,
-- and the actor is the subject the request's transaction declared with set_config('app.actor', ...). A role
-- that can insert audit rows still cannot backdate one.
CREATE FUNCTION audit_log_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.occurred_at := now();
    NEW.actor := coalesce(current_setting('app.actor', true), '');
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_stamp BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_stamp();
