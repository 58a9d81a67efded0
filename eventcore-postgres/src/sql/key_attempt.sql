-- Which attempt stored an idempotency key (NULL: stored before migration 0005); no row
-- if the key is unknown. Used after a lost answer, to tell this call's write from an
-- earlier call's.
SELECT attempt FROM {schema}.idempotency_keys WHERE idempotency_key = $1
