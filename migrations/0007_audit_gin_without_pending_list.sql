-- The GIN index on audit_log.dead_letter_ids kept new entries in a pending list and merged it into the index
-- whenever the list outgrew gin_pending_list_limit (4 MB). Every call writes an audit row (List: one id per row
-- of its page), so every few thousand calls one of them paid for the merge: 0.4-0.5 s, measured with 50-id rows
-- and by bench/run.py as List's maximum. Without the pending list each insert updates the index itself: about
-- 0.3 ms more for a 50-id row, and no caller pays for anyone else's (PostgreSQL's GIN "fast update" notes).
--
-- Changing the option locks the index against audit writes: give up rather than queue every call behind a
-- long reader (the migration then fails and the next start retries it).
SET LOCAL lock_timeout = '10s';
ALTER INDEX audit_log_dead_letter_ids_idx SET (fastupdate = off);
-- Turning the option off leaves what is already pending in the list: merge it now, not in some caller's insert.
SELECT gin_clean_pending_list('audit_log_dead_letter_ids_idx'::regclass);
