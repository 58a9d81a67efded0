-- One statement, so one transaction and one round trip (see migrations/0001).
SELECT deduplicated, event_ids, stream_ids, versions, positions, recorded_at
  FROM {schema}.eventcore_append($1, $2, $3, $4, $5, $6, $7::text[]::json[], $8::text[]::json[], $9)
