-- 001 (PostgreSQL): the tasks and tokens of SQLite's migrations 001, 002 and 004, in one
-- step. SQLite's 003 (the replication position and term history) has no counterpart:
-- with PostgreSQL, durability and failover are the database's own (streaming
-- replication), and several dispatchers share one database instead of a standby.
-- Applied in one transaction by octaskly.store.postgres; the version goes to
-- octaskly_schema. Column names match octaskly/store/queries.py.

CREATE SEQUENCE tasks_queue_seq;

CREATE TABLE tasks (
    pk              bigserial PRIMARY KEY,  -- insertion order
    id              text    NOT NULL UNIQUE,
    queue_seq       bigint  NOT NULL,       -- acknowledgement order (tasks_queue_seq)
    status          text    NOT NULL CHECK (status IN
                        ('queued', 'running', 'completed', 'failed', 'timed_out', 'cancelled')),
    priority        integer NOT NULL CHECK (priority BETWEEN 0 AND 3),
    command         text    NOT NULL,
    spec            text    NOT NULL,       -- the TaskSpec as JSON (text: kept byte for byte)
    requirements    text,                   -- spec.requirements as JSON; NULL = the defaults
    timeout         bigint  NOT NULL,
    attempts        bigint  NOT NULL DEFAULT 0,
    worker_id       text,
    exit_code       bigint,
    stdout          bytea   NOT NULL DEFAULT '',  -- UTF-8; bytea because text cannot hold NUL
    stderr          bytea   NOT NULL DEFAULT '',
    stdout_dropped  bigint  NOT NULL DEFAULT 0,
    stderr_dropped  bigint  NOT NULL DEFAULT 0,
    duration_ms     bigint,
    error           text,
    created_at      double precision NOT NULL,
    started_at      double precision,
    completed_at    double precision,
    not_before      double precision,
    lost_count      bigint  NOT NULL DEFAULT 0,
    owner           text,
    idempotency_key text,
    request_id      text
);

CREATE INDEX tasks_queue ON tasks (priority, queue_seq) WHERE status = 'queued';
CREATE INDEX tasks_created ON tasks (created_at, pk);
CREATE INDEX tasks_status ON tasks (status, created_at);
CREATE INDEX tasks_worker ON tasks (worker_id, created_at) WHERE worker_id IS NOT NULL;
CREATE INDEX tasks_owner ON tasks (owner, created_at);
CREATE INDEX tasks_running ON tasks (queue_seq) WHERE status = 'running';
CREATE UNIQUE INDEX tasks_idempotency ON tasks (coalesce(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_finished ON tasks (completed_at)
    WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled');

CREATE TABLE tokens (
    jti         text PRIMARY KEY,
    subject     text,               -- NULL for a revocation of a token issued elsewhere
    role        text,
    issued_at   double precision,
    expires_at  double precision NOT NULL,
    revoked_at  double precision
);

CREATE INDEX tokens_revoked ON tokens (expires_at) WHERE revoked_at IS NOT NULL;
