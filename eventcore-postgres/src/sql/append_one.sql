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
-- - The global order: `locked` takes the stream's own lock (as eventcore_append does; a
--   writer whose connection failed waits for it in eventcore_find_events), then `mark`
--   reads the sequence, atomically (pg_sequence_last_value) and only once the lock is
--   held, and takes the same marker as eventcore_append, a shared lock keyed by the
--   sequence's next value, before `ins` draws a position (the insert consumes `mark`'s
--   row first). A read before the wait for the lock would mark below positions
--   committed, and passed by readers, while it waited (migrations/0005).
-- - The last column fails the statement (ECM01, eventcore_refuse_mark) if the mark is
--   above the position drawn: readers could have passed the event while it was in
--   flight. It cannot happen with the sequence as created.
-- - Only one stream is read and written, so there is no read-only participant to guard
--   against a concurrent writer (the reason eventcore_append locks streams it only reads).
--
-- $1 stream, $2 expected version, $3 event id, $4 type, $5 payload, $6 metadata.
WITH head AS (
    SELECT coalesce(max(e.stream_version), 0) AS version
      FROM {schema}.events e
     WHERE e.stream_id = $1
), locked AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(hashtextextended('eventcore.stream.{schema_name}/' || $1, 0)) AS stream_lock
      FROM head
     WHERE head.version = $2
), mark AS MATERIALIZED (
    SELECT n.next_position,
           pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.{schema_name}'),
               (CASE WHEN n.next_position % 4294967296 >= 2147483648
                     THEN n.next_position % 4294967296 - 4294967296
                     ELSE n.next_position % 4294967296 END)::integer) AS marker
      FROM (SELECT coalesce(pg_sequence_last_value('{schema}.global_position_seq'::regclass) + 1, 1)
                   AS next_position
              FROM locked
            OFFSET 0) AS n
), ins AS (
    INSERT INTO {schema}.events (global_position, event_id, stream_id, stream_version,
                                 event_type, payload, metadata)
    SELECT nextval('{schema}.global_position_seq'), $3, $1, head.version + 1,
           $4, $5::text::json, $6::text::json
      FROM head, mark
    RETURNING global_position, recorded_at
)
SELECT head.version AS actual, ins.global_position, ins.recorded_at,
       CASE WHEN mark.next_position > ins.global_position
            THEN {schema}.eventcore_refuse_mark(mark.next_position, ins.global_position)
       END AS refused
  FROM head
  LEFT JOIN ins ON true
  LEFT JOIN mark ON true
