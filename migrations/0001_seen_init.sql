-- seen schema, version 1: where a store's marks go to survive the loss of
-- its host. Applied by `seen pg migrate` (or seen::checkpoint::Postgres::migrate)
-- in one transaction; never edit a released migration, add the next one.

-- One row per store: a state directory, or one Kafka partition of a
-- consumer in partition scope. `secret` is the store's fingerprint key:
-- whoever can read it can test ids against the marks (see the README).
CREATE TABLE seen_stores (
    id              integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    store           text NOT NULL UNIQUE,
    secret          bytea NOT NULL CHECK (length(secret) = 16),
    topic           text,
    kafka_partition integer,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- How far each local log of a store has been checkpointed. Positions only
-- compare within one log, so a store restored on a new host (a new log)
-- gets its own row.
CREATE TABLE seen_checkpoints (
    store_id    integer NOT NULL REFERENCES seen_stores (id) ON DELETE CASCADE,
    log_id      bytea NOT NULL,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store_id, log_id)
);

-- Numbers each chunk a checkpoint writes: later chunks win.
CREATE SEQUENCE seen_batch_seq;

-- The marks: each store's log, compacted per chunk and appended. A
-- 16-byte fingerprint (never the id) and its expiry in Unix seconds; a
-- negative expiry is a forget that lives until -expires_at. Append-only
-- on purpose: no index on the random fingerprints, so a checkpoint costs
-- a sequential write (a b-tree on them made it 4-6x slower); positions
-- keep checkpoints from writing anything twice, and expired rows are
-- found through the BRIN index.
CREATE TABLE seen_marks (
    store_id    integer NOT NULL,
    fingerprint uuid NOT NULL,
    expires_at  bigint NOT NULL,
    batch       bigint NOT NULL
);
CREATE INDEX seen_marks_store ON seen_marks (store_id, batch);
CREATE INDEX seen_marks_expiry ON seen_marks USING brin (expires_at);

-- Marks made inside callers' transactions: PostgreSQL arbitrates between
-- racing transactions on the primary key.
CREATE TABLE seen_tx_marks (
    store_id    integer NOT NULL,
    fingerprint uuid NOT NULL,
    expires_at  bigint NOT NULL,
    PRIMARY KEY (store_id, fingerprint)
);
CREATE INDEX seen_tx_marks_expiry ON seen_tx_marks (expires_at);
