-- Held until the batch commits: a second runner of the projection waits here.
SELECT position FROM {schema}.projection_checkpoints WHERE projection = $1 FOR UPDATE
