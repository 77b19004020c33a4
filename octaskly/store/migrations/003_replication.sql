-- 003: what streaming replication to a standby needs.
-- `replication` holds this database's position: `lsn` counts the write transactions that
-- changed something (a standby applies them in the same order and stores the primary's
-- number), `term` is the leadership term the last of them was written under, `db_id`
-- names the history (a standby whose db_id differs must take a snapshot first).
CREATE TABLE replication (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    db_id   TEXT    NOT NULL,
    lsn     INTEGER NOT NULL,
    term    INTEGER NOT NULL
);
INSERT INTO replication (id, db_id, lsn, term) VALUES (1, lower(hex(randomblob(16))), 0, 1);

-- The term history: term `term` began after transaction `start_lsn` (as PostgreSQL's
-- timeline history). A standby's position (term, lsn) is on this history only if `lsn`
-- is not past the start of the next term; otherwise it diverged and is re-seeded.
CREATE TABLE terms (
    term      INTEGER PRIMARY KEY,
    start_lsn INTEGER NOT NULL
);
INSERT INTO terms (term, start_lsn) VALUES (1, 0);
