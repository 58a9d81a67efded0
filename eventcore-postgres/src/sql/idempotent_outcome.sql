-- The events stored with a key, or one row of NULLs if the key holds no events, or no
-- row if the key is unknown.
SELECT e.event_id, e.stream_id, e.stream_version, e.global_position, e.recorded_at
  FROM {schema}.idempotency_keys k
  LEFT JOIN {schema}.events e ON e.idempotency_key = k.idempotency_key
 WHERE k.idempotency_key = $1
 ORDER BY e.global_position
