-- 003 (PostgreSQL): audit chains brought over by `octaskly migrate` from an SQLite
-- installation's audit log, line for line, with the MAC'd head that vouches for the end.
-- `octaskly migrate` verifies the chain it reads back from here before it reports success.
-- (Running dispatchers go on writing their own audit log in their data dir.)
CREATE TABLE audit_archive (
    source  text    NOT NULL,   -- where the chain came from (host and file)
    line_no integer NOT NULL,
    line    text    NOT NULL,
    PRIMARY KEY (source, line_no)
);

CREATE TABLE audit_archive_heads (
    source      text PRIMARY KEY,
    head        text NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
