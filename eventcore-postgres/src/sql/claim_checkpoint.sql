-- Makes sure the checkpoint row exists, so that it can be locked.
INSERT INTO {schema}.projection_checkpoints (projection, position) VALUES ($1, 0)
ON CONFLICT (projection) DO NOTHING
