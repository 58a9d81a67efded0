-- A checkpoint never moves backwards.
INSERT INTO {schema}.projection_checkpoints AS c (projection, position) VALUES ($1, $2)
ON CONFLICT (projection) DO UPDATE
   SET position = GREATEST(c.position, EXCLUDED.position), updated_at = now()
