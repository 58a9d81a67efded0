-- The log after $1, at most $2 events, in position order, without the horizon of
-- read_all.sql: an event whose position is below a returned one but whose commit is not
-- visible yet is simply not there (EventStore::peek_log). No pg_locks scan, so no
-- contention with appends: the executor's log feed reads this every few milliseconds.
SELECT global_position, event_id, stream_id, stream_version, event_type,
       payload::text AS payload, metadata::text AS metadata, recorded_at
  FROM {schema}.events
 WHERE global_position > $1
 ORDER BY global_position
 LIMIT $2
