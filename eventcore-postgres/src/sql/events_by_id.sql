-- Where events with these ids landed: used after a connection failure to learn whether
-- an append whose answer was lost committed.
SELECT event_id, stream_id, stream_version, global_position
  FROM {schema}.events
 WHERE event_id = ANY($1)
 ORDER BY global_position
