-- Where events with these ids landed, after queueing behind any append still holding
-- their streams: used after a connection failure to learn whether an append whose
-- answer was lost committed.
-- (Not joined to the events table here: this statement's snapshot is older than the
-- wait inside the function.)
SELECT event_id, stream_id, stream_version, global_position, recorded_at
  FROM {schema}.eventcore_find_events($1, $2)
