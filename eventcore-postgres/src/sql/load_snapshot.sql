-- The snapshot of exactly this key ($1: SnapshotKey::canonical).
SELECT versions, event_ids, last_position, state, taken_at
  FROM {schema}.snapshots
 WHERE key_md5 = md5($1)::uuid AND key = $1
