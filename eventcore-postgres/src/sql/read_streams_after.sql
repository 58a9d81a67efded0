-- The events of the given streams after the given versions ($1 ids, $2 versions, same
-- order), in global order, followed by one row per stream with only its current version
-- (global_position NULL); one statement, so one snapshot. (No CTE: a CTE used twice is
-- materialized and took four times as long to plan, on every call.)
SELECT e.global_position, e.event_id, e.stream_id, e.stream_version, e.event_type,
       e.payload::text AS payload, e.metadata::text AS metadata, e.recorded_at
  FROM unnest($1::text[], $2::bigint[]) AS wanted(stream_id, after_version)
  JOIN {schema}.events e
    ON e.stream_id = wanted.stream_id AND e.stream_version > wanted.after_version
UNION ALL
SELECT NULL, NULL, current.stream_id,
       (SELECT max(h.stream_version) FROM {schema}.events h WHERE h.stream_id = current.stream_id),
       NULL, NULL, NULL, NULL
  FROM unnest($1::text[]) AS current(stream_id)
 ORDER BY 1 NULLS LAST
