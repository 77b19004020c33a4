-- 004: task retention. Finished tasks by completion time, so deleting those that finished
-- before a cutoff (oldest first, in bounded batches) reads only the rows it deletes.
-- Partial: queued and running tasks, which are never deleted, are not in it. The status
-- list must match queries.PRUNE_TASKS word for word, or SQLite cannot use the index.
CREATE INDEX tasks_finished ON tasks (completed_at)
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled');
