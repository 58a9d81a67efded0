-- The global log after $1, below the horizon of marks still held (see migrations/0001 and
-- ADR 0003); filters apply before the limit. One statement, one round trip.
SELECT global_position, event_id, stream_id, stream_version, event_type, payload, metadata,
       recorded_at
  FROM {schema}.eventcore_read_log($1, $2, $3, $4)
