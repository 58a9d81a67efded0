-- Where events with these ids landed, after queueing behind any append still holding
-- their streams: used after a connection failure to learn whether an append whose
-- answer was lost committed.
SELECT event_id, stream_id, stream_version, global_position
  FROM {schema}.eventcore_find_events($1, $2)
