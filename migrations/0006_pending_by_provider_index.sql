-- The metrics refresher counts pending dead letters by provider and finds the oldest of each every few tens of
-- seconds. Without this index that was a parallel scan of the whole table (0.4–0.8 s on both cores at 10^6 rows,
-- measured by bench/run.py), which showed up as List and Get outliers. Pending rows only: small, and an
-- index-only scan answers the query.
CREATE INDEX dead_letter_queue_pending_provider_idx
    ON dead_letter_queue (provider, failed_at) WHERE status = 'pending';
