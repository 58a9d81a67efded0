-- The checkpoint and the parked events, in one statement (one transaction).
WITH parked AS (
    DELETE FROM {schema}.projection_parked_events WHERE projection = $1
)
DELETE FROM {schema}.projection_checkpoints WHERE projection = $1
