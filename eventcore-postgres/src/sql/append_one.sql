-- One event to one stream that must be at exactly version $2 (0: no stream yet), with
-- no idempotency key: the append of every command over one stream, and the raw append.
-- One plain statement instead of a call of eventcore_append (migrations/0001), which
-- costs the same checks several statements inside PL/pgSQL. The same guarantees:
--
-- - The version: `head` reads the stream's version in this statement's snapshot. A
--   version other than $2 inserts nothing and returns the actual one. An append that
--   took version $2 + 1 after that snapshot makes the insert fail on
--   events_stream_version_key (the caller reports a conflict), so versions stay
--   contiguous and are never taken twice.
-- - The global order: `mark` takes the same marker as eventcore_append, a shared lock
--   keyed by the sequence's next value, before `ins` draws a position (the insert
--   consumes `mark`'s row first). Also, as eventcore_append does, the stream's own lock,
--   which a writer whose connection failed waits for (eventcore_find_events).
-- - Only one stream is read and written, so there is no read-only participant to guard
--   against a concurrent writer (the reason eventcore_append locks streams it only reads).
--
-- $1 stream, $2 expected version, $3 event id, $4 type, $5 payload, $6 metadata.
WITH head AS (
    SELECT coalesce(max(e.stream_version), 0) AS version
      FROM {schema}.events e
     WHERE e.stream_id = $1
), mark AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(hashtextextended('eventcore.stream.{schema_name}/' || $1, 0)) AS stream_lock,
           pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.{schema_name}'),
               (CASE WHEN n.slot >= 2147483648 THEN n.slot - 4294967296 ELSE n.slot END)::integer)
               AS marker
      FROM head,
           (SELECT (CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END)
                   % 4294967296 AS slot
              FROM {schema}.global_position_seq s) AS n
     WHERE head.version = $2
), ins AS (
    INSERT INTO {schema}.events (global_position, event_id, stream_id, stream_version,
                                 event_type, payload, metadata)
    SELECT nextval('{schema}.global_position_seq'), $3, $1, head.version + 1,
           $4, $5::text::jsonb, $6::text::jsonb
      FROM head, mark
    RETURNING global_position, recorded_at
)
SELECT head.version AS actual, ins.global_position, ins.recorded_at
  FROM head LEFT JOIN ins ON true
