-- 005: task output as bytes. stdout and stderr become BLOB columns holding exactly what the
-- task wrote (before, TEXT holding it decoded, invalid UTF-8 replaced by U+FFFD). SQLite
-- cannot change a column's type: the table is rebuilt (columns in the same order, rowids
-- kept) and its indexes made again. CAST(... AS BLOB) keeps the UTF-8 bytes of old rows.
CREATE TABLE tasks_new (
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
    stdout          BLOB    NOT NULL DEFAULT X'',  -- the kept tail, exactly as written
    stderr          BLOB    NOT NULL DEFAULT X'',
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

INSERT INTO tasks_new (
    pk, id, queue_seq, status, priority, command, spec, requirements, timeout, attempts,
    worker_id, exit_code, stdout, stderr, stdout_dropped, stderr_dropped, duration_ms, error,
    created_at, started_at, completed_at, not_before, lost_count, owner, idempotency_key,
    request_id
)
SELECT
    pk, id, queue_seq, status, priority, command, spec, requirements, timeout, attempts,
    worker_id, exit_code, CAST(stdout AS BLOB), CAST(stderr AS BLOB), stdout_dropped,
    stderr_dropped, duration_ms, error, created_at, started_at, completed_at, not_before,
    lost_count, owner, idempotency_key, request_id
FROM tasks;

DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;

-- The indexes of 001 and 004, unchanged (dropped with the old table).
CREATE INDEX tasks_queue ON tasks (priority, queue_seq) WHERE status = 'queued';
CREATE INDEX tasks_created ON tasks (created_at);
CREATE INDEX tasks_status ON tasks (status, created_at);
CREATE INDEX tasks_worker ON tasks (worker_id, created_at) WHERE worker_id IS NOT NULL;
CREATE INDEX tasks_owner ON tasks (owner, created_at);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (ifnull(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Must match queries.PRUNE_TASKS word for word (see 004).
CREATE INDEX tasks_finished ON tasks (completed_at)
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled');
