-- Every snapshot of one name.
DELETE FROM {schema}.snapshots WHERE name = $1
