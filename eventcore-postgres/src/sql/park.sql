INSERT INTO {schema}.projection_parked_events
       (projection, event_id, global_position, stream_id, stream_version, event_type, error, parked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (projection, event_id) DO NOTHING
