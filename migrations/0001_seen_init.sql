-- seen schema, version 1: where a store's marks go to survive the loss of
-- its host. Applied by `seen pg migrate` (or seen::checkpoint::Postgres::migrate)
-- in one transaction; never edit a released migration, add the next one.

-- One row per store: a state directory, or one Kafka partition of a
-- consumer in partition scope. `secret` is the store's fingerprint key:
-- whoever can read it can test ids against the marks (see the README).
CREATE TABLE seen_stores (
    store           text PRIMARY KEY,
    secret          bytea NOT NULL CHECK (length(secret) = 16),
    topic           text,
    kafka_partition integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- How far each local log of a store has been checkpointed. Positions only
-- compare within one log, so a store restored on a new host (a new log)
-- gets its own row.
CREATE TABLE seen_checkpoints (
    store       text NOT NULL REFERENCES seen_stores (store) ON DELETE CASCADE,
    log_id      bytea NOT NULL,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, log_id)
);

-- The live marks: a 16-byte fingerprint (never the id) and when it expires,
-- in Unix seconds. No foreign key: a checkpoint writes millions of rows and
-- checks the store once itself.
CREATE TABLE seen_marks (
    store       text NOT NULL,
    fingerprint bytea NOT NULL,
    expires_at  bigint NOT NULL,
    PRIMARY KEY (store, fingerprint)
);
CREATE INDEX seen_marks_expiry ON seen_marks (store, expires_at);
