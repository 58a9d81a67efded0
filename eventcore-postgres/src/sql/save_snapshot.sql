-- Of two snapshots of one key, the one folded further stays (a row comes back only when
-- this one was saved). A key whose md5 another key holds is not saved.
INSERT INTO {schema}.snapshots AS s
       (key, name, schema_version, streams, versions, event_ids, last_position, state, taken_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (key_md5) DO UPDATE
   SET versions = EXCLUDED.versions, event_ids = EXCLUDED.event_ids,
       last_position = EXCLUDED.last_position, state = EXCLUDED.state,
       taken_at = EXCLUDED.taken_at
 WHERE s.key = EXCLUDED.key
   AND COALESCE(s.last_position, 0) < COALESCE(EXCLUDED.last_position, 0)
RETURNING 1
