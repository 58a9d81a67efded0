-- The snapshot of this key ($1: SnapshotKey::canonical), if it is still the one with
-- this last position and time taken (not one saved since).
DELETE FROM {schema}.snapshots
 WHERE key_md5 = md5($1)::uuid AND key = $1
   AND last_position IS NOT DISTINCT FROM $2 AND taken_at = $3
