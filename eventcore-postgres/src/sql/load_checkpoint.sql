SELECT position FROM {schema}.projection_checkpoints WHERE projection = $1
