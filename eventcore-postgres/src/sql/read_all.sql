-- The global log after $1, below the horizon of marks still held (see migrations/0001,
-- 0005 and ADR 0003); filters apply before the limit. One statement, one round trip.
-- The last row is not an event: every column is NULL but `horizon`, where the read
-- stopped (every event the filters select after $1 and below it is among the rows,
-- unless the limit was reached).
SELECT global_position, event_id, stream_id, stream_version, event_type, payload, metadata,
       recorded_at, horizon
  FROM {schema}.eventcore_read_log_page($1, $2, $3, $4)
