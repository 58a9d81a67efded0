-- Every event of the given streams, in global order, in one statement (one snapshot).
SELECT global_position, event_id, stream_id, stream_version, event_type,
       payload::text AS payload, metadata::text AS metadata, recorded_at
  FROM {schema}.events
 WHERE stream_id = ANY($1)
 ORDER BY global_position
