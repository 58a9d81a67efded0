UPDATE {schema}.projection_checkpoints
   SET position = GREATEST(position, $2), updated_at = now()
 WHERE projection = $1
