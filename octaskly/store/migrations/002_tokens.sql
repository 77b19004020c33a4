-- 002: API tokens the dispatcher issued, and revocations (of those and of tokens signed
-- elsewhere with the cluster key). A revocation is kept until the token would have
-- expired anyway.
CREATE TABLE tokens (
    jti         TEXT PRIMARY KEY,
    subject     TEXT,               -- NULL for a revocation of a token issued elsewhere
    role        TEXT,
    issued_at   REAL,
    expires_at  REAL NOT NULL,
    revoked_at  REAL
);

CREATE INDEX tokens_revoked ON tokens (expires_at) WHERE revoked_at IS NOT NULL;
