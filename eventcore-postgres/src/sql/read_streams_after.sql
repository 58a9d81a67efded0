-- The events of the given streams after the given versions ($1 ids, $2 versions, same
-- order), in global order, each row also carrying its stream's current version
-- (`current`); a stream with nothing new gives one row without an event (NULL
-- global_position). One statement, so one snapshot. (Written with LATERAL joins: a UNION
-- or a CTE used twice took four to five times as long to plan, on every call.)
-- The events' subquery is kept apart from the join (OFFSET 0), so that each stream is
-- read through its index whatever the table's statistics said when the plan was made
-- (see read_streams.sql), and the arrays reach unnest through a subquery so that the
-- generic plan is kept (see read_streams.sql too).
SELECT e.global_position, e.event_id, wanted.stream_id, e.stream_version, e.event_type,
       e.payload::text AS payload, e.metadata::text AS metadata, e.recorded_at,
       head.current
  FROM (SELECT $1::text[] AS ids, $2::bigint[] AS afters OFFSET 0) AS p
 CROSS JOIN LATERAL unnest(p.ids, p.afters) AS wanted(stream_id, after_version)
 CROSS JOIN LATERAL (
       SELECT max(h.stream_version) AS current
         FROM {schema}.events h
        WHERE h.stream_id = wanted.stream_id) AS head
  LEFT JOIN LATERAL (
       SELECT * FROM {schema}.events x
        WHERE x.stream_id = wanted.stream_id AND x.stream_version > wanted.after_version
       OFFSET 0) AS e
    ON true
 ORDER BY e.global_position NULLS LAST
