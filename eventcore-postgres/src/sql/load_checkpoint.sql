SELECT position FROM {schema}.projection_checkpoints WHERE projection = $1 AND position > 0
