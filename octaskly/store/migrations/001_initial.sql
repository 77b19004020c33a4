-- 001: the task table and the indexes the dispatcher's queries need.
-- Applied in one transaction by octaskly.store.migrating; the version goes to user_version.

CREATE TABLE tasks (
    pk              INTEGER PRIMARY KEY,  -- rowid alias: insertion order
    id              TEXT    NOT NULL UNIQUE,
    queue_seq       INTEGER NOT NULL,     -- acknowledgement order, assigned by the writer
    status          TEXT    NOT NULL CHECK (status IN
                        ('queued', 'running', 'completed', 'failed', 'timed_out', 'cancelled')),
    priority        INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 3),
    command         TEXT    NOT NULL,
    spec            TEXT    NOT NULL,     -- the TaskSpec as JSON
    requirements    TEXT,                 -- spec.requirements as JSON; NULL = the defaults
    timeout         INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    worker_id       TEXT,
    exit_code       INTEGER,
    stdout          TEXT    NOT NULL DEFAULT '',
    stderr          TEXT    NOT NULL DEFAULT '',
    stdout_dropped  INTEGER NOT NULL DEFAULT 0,
    stderr_dropped  INTEGER NOT NULL DEFAULT 0,
    duration_ms     INTEGER,
    error           TEXT,
    created_at      REAL    NOT NULL,
    started_at      REAL,
    completed_at    REAL,
    not_before      REAL,
    lost_count      INTEGER NOT NULL DEFAULT 0,
    owner           TEXT,
    idempotency_key TEXT,
    request_id      TEXT
);

-- Queue refill: queued tasks of one priority in queue_seq order. Partial, so finished
-- tasks (the bulk of a long-lived database) cost the queue nothing.
CREATE INDEX tasks_queue ON tasks (priority, queue_seq) WHERE status = 'queued';

-- Listing newest first, unfiltered and by status / worker / owner; counts by status.
CREATE INDEX tasks_created ON tasks (created_at);
CREATE INDEX tasks_status ON tasks (status, created_at);
CREATE INDEX tasks_worker ON tasks (worker_id, created_at) WHERE worker_id IS NOT NULL;
CREATE INDEX tasks_owner ON tasks (owner, created_at);

-- One task per (owner, idempotency key). ifnull: NULLs are distinct in a UNIQUE index,
-- and a request without an owner must still be idempotent.
CREATE UNIQUE INDEX tasks_idempotency ON tasks (ifnull(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
