-- Events to several streams (or several events to one) where every stream must be at
-- an exact version (0: no stream yet), with no idempotency key: every multi-stream
-- command, in one plain statement. eventcore_append (migrations/0006) pays for its
-- checks as a dozen statements inside PL/pgSQL, each with its executor start and stop:
-- a two-stream transfer spent 0.16 ms in it (pg_stat_statements, W2 at C=8), this
-- statement 0.05 ms. The same guarantees, in the same order:
--
-- - The versions: `wanted` reads each stream's version in this statement's snapshot. If
--   any is not the one expected, nothing is locked or written. A stream written is then
--   safe however old the snapshot: an append that took one of its versions meanwhile
--   makes the insert fail on events_stream_version_key. A stream only read has no such
--   arbiter, so its lock is taken by eventcore_lock_shared_version (migrations/0007),
--   which then reads its version again in a fresh snapshot; if it moved, nothing is
--   written. The first case returns one row per stream not at its expected version
--   (conflict_stream, conflict_actual: a committed version, so the conflict is real and
--   reported as such, without locking anything); the second fails on the index and the
--   last returns no row: in those two the caller asks eventcore_append, which reports
--   the conflict as of after its locks (or writes, if the versions hold by then).
-- - The locks: `locked` takes every participant's lock in key order (written streams
--   exclusively, streams only read in shared mode), as eventcore_append does, so that
--   overlapping appends of both kinds queue instead of deadlocking. Two streams whose
--   keys collide take the exclusive lock first; the shared one is then granted at once
--   (a session's own locks never conflict).
-- - The global order: `mark` reads the sequence atomically (pg_sequence_last_value) and
--   only once every lock is held (its row comes from `locked`), and takes the same
--   marker as eventcore_append, a shared lock keyed by the sequence's next value; `ins`
--   draws the positions after it, in request order (the sorted subquery feeds nextval
--   row by row). The last column fails the statement (ECM01) if the mark is above a
--   position drawn, as in append_one.sql.
--
-- Each node of a plan costs its initialization on every execution, so the statement
-- has as few as the checks allow (measured with pgbench, two streams: 8,700 / 14,500
-- calls a second at C=1 / C=8 against 6,900 / 12,800 for a version that also returned
-- the versions read). The arrays reach unnest through subqueries of their own (OFFSET
-- 0), so that the planner cannot count them: with the counts known, a plan made for
-- one call's values looked cheaper than the generic plan, and PostgreSQL planned every
-- call again (95 µs each, more than the execution; W2 at C=1 fell from 7,300 transfers
-- a second to 3,300).
--
-- $1 streams, $2 their expected versions, $3 whether each is written (same order);
-- then per event, in request order (grouped by stream): $4 stream, $5 version (the
-- expected one plus its place among the stream's events), $6 id, $7 type, $8 payload,
-- $9 metadata. One row per event written: its position, recording time and id; or one
-- row per stream not at its expected version (see above).
WITH wanted AS MATERIALIZED (
    SELECT w.stream_id, w.expected, w.written,
           hashtextextended('eventcore.stream.{schema_name}/' || w.stream_id, 0) AS lock_key,
           (SELECT coalesce(max(e.stream_version), 0)
              FROM {schema}.events e
             WHERE e.stream_id = w.stream_id) AS actual
      FROM (SELECT $1::text[] AS streams, $2::bigint[] AS expected, $3::boolean[] AS written
            OFFSET 0) AS p,
           unnest(p.streams, p.expected, p.written) AS w(stream_id, expected, written)
), locked AS MATERIALIZED (
    SELECT count(*) AS locks,
           count(*) FILTER (WHERE CASE WHEN l.written
                                       THEN pg_advisory_xact_lock(l.lock_key) IS NULL
                                       ELSE {schema}.eventcore_lock_shared_version(l.stream_id, l.lock_key)
                                            <> l.expected
                                  END) AS moved
      FROM (SELECT w.stream_id, w.expected, w.written, w.lock_key
              FROM wanted w
             WHERE NOT EXISTS (SELECT 1 FROM wanted c WHERE c.actual <> c.expected)
             ORDER BY w.lock_key, w.written DESC
            OFFSET 0) AS l
), mark AS MATERIALIZED (
    SELECT n.next_position,
           pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.{schema_name}'),
               (CASE WHEN n.next_position % 4294967296 >= 2147483648
                     THEN n.next_position % 4294967296 - 4294967296
                     ELSE n.next_position % 4294967296 END)::integer) AS marker
      FROM (SELECT coalesce(pg_sequence_last_value('{schema}.global_position_seq'::regclass) + 1, 1)
                   AS next_position
              FROM locked
             WHERE locked.locks > 0 AND locked.moved = 0
            OFFSET 0) AS n
), ins AS (
    INSERT INTO {schema}.events (global_position, event_id, stream_id, stream_version,
                                 event_type, payload, metadata)
    SELECT nextval('{schema}.global_position_seq'), x.event_id, x.stream_id, x.stream_version,
           x.event_type, x.payload::json, x.metadata::json
      FROM (SELECT u.stream_id, u.stream_version, u.event_id, u.event_type, u.payload,
                   u.metadata
              FROM (SELECT $4::text[] AS streams, $5::bigint[] AS versions, $6::uuid[] AS ids,
                           $7::text[] AS types, $8::text[] AS payloads, $9::text[] AS metadata
                    OFFSET 0) AS p,
                   unnest(p.streams, p.versions, p.ids, p.types, p.payloads, p.metadata)
                       WITH ORDINALITY
                       AS u(stream_id, stream_version, event_id, event_type, payload, metadata, ord),
                   mark
             ORDER BY u.ord
            OFFSET 0) AS x
    RETURNING global_position, recorded_at, event_id
)
SELECT i.global_position, i.recorded_at, i.event_id,
       CASE WHEN m.next_position > i.global_position
            THEN {schema}.eventcore_refuse_mark(m.next_position, i.global_position)
       END AS refused,
       NULL::text AS conflict_stream, NULL::bigint AS conflict_actual
  FROM ins i, mark m
UNION ALL
SELECT NULL, NULL, NULL, NULL, w.stream_id, w.actual
  FROM wanted w
 WHERE w.actual <> w.expected
