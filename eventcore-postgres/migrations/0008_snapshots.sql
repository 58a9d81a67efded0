-- EventCore event store, version 8: snapshots of command states (eventcore::snapshot).
-- Unqualified names: applied with search_path set to the store's schema (see 0001).
--
-- - A snapshot only saves work: the executor checks every one against the streams
--   before deciding on it (the events it names must be there, at those versions), and
--   the append checks every stream as always. The table can be emptied at any time
--   (TRUNCATE snapshots) without changing a decision; the next commands read whole.
-- - The key is SnapshotKey::canonical (the name, the schema version and the streams, a
--   line each). With up to 1,000 stream ids it can be longer than a btree entry holds,
--   so the primary key is its md5, and every statement compares the key itself too: two
--   keys with one md5 never share a snapshot (the second is simply never saved).
-- - name, schema_version and streams repeat the key for people and for
--   delete_snapshots; event_ids has a NULL where a stream was at version 0.

CREATE TABLE snapshots (
    key_md5        uuid GENERATED ALWAYS AS (md5(key)::uuid) STORED PRIMARY KEY,
    key            text        NOT NULL,
    name           text        NOT NULL,
    schema_version bigint      NOT NULL,
    streams        text[]      NOT NULL,
    versions       bigint[]    NOT NULL,
    event_ids      uuid[]      NOT NULL,
    last_position  bigint,
    state          bytea       NOT NULL,
    taken_at       timestamptz NOT NULL
);

CREATE INDEX snapshots_name ON snapshots (name);
