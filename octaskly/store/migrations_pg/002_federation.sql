-- 002 (PostgreSQL): several dispatchers on one database, all active.
-- A running task belongs to the dispatcher that claimed it (`dispatcher_id`); each
-- dispatcher holds a lease in `dispatchers`, renewed every few seconds. When a lease runs
-- out (the dispatcher died or lost the database), another dispatcher re-queues the tasks
-- it held. Times in this table are the database server's clock, so the dispatchers'
-- clocks need not agree.
ALTER TABLE tasks ADD COLUMN dispatcher_id text;
CREATE INDEX tasks_dispatcher ON tasks (dispatcher_id) WHERE status = 'running';

CREATE TABLE dispatchers (
    id           text PRIMARY KEY,           -- the node name (node_name, else host:port)
    instance     text NOT NULL,              -- random per start: two live processes of one name are refused
    p2p_address  text,
    api_url      text,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    renewed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until  timestamptz NOT NULL,
    summary      text                        -- JSON: its workers and counts, for the shared API
);
