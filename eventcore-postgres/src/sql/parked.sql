SELECT projection, event_id, global_position, stream_id, stream_version, event_type, error, parked_at
  FROM {schema}.projection_parked_events
 WHERE projection = $1
 ORDER BY global_position
