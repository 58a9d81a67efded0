#!/usr/bin/env bash
# The physical limit beside EventCore's figures: pgbench against the same PostgreSQL,
# with the row shape of EventCore's events table (its columns, types, indexes and check;
# docs/benchmarks.md: W1, W2, W4, W5).
#
#   scripts/pg-limit.sh [--duration SECS]
#
# Uses DATABASE_URL, or starts a throwaway cluster like scripts/test. Prints, for
# concurrency 1 and 8: one INSERT per transaction (the ceiling for W1 and W5); one
# statement inserting a row into each of two streams (the ceiling for what W2 writes);
# a two-stream transaction (two version reads and one two-row INSERT, the W2 a user
# would write by hand); and a paged ordered scan of 100,000 rows (the ceiling for W4),
# in rows/s. pgbench runs with prepared statements (`-M prepared`), as the store sends
# its statements: the simple protocol would parse and plan every statement again and
# put the limit too low.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10
if [ "${1:-}" = "--duration" ]; then
    duration=${2:?--duration needs a value}
fi

source scripts/pg-provision.sh
trap pg_teardown EXIT
pg_provision

pgbench=$(pg_find_bin pgbench)
[ -n "$pgbench" ] || pg_fail "pgbench was not found."
schema="pglimit_$$"
psql() { command psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qAt "$@"; }

psql <<SQL
DROP SCHEMA IF EXISTS $schema CASCADE;
CREATE SCHEMA $schema;
CREATE TABLE $schema.events (
    global_position bigserial   PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL,
    event_type      text        NOT NULL,
    payload         json        NOT NULL,
    metadata        json        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    UNIQUE (stream_id, stream_version),
    CHECK (stream_version > 0 AND global_position > 0)
);
CREATE INDEX ON $schema.events (idempotency_key) WHERE idempotency_key IS NOT NULL;
SQL

dir=$(mktemp -d)
trap 'rm -rf "$dir"; pg_teardown' EXIT
metadata='{"correlation_id":"0191d0c4-0000-7000-8000-000000000000","causation_id":"0191d0c4-0000-7000-8000-000000000001"}'

cat > "$dir/one_insert.sql" <<SQL
INSERT INTO $schema.events (event_id, stream_id, stream_version, event_type, payload, metadata)
VALUES (gen_random_uuid(), 'raw-' || gen_random_uuid(), 1, 'Deposited', '{"amount":1}', '$metadata');
SQL

# One statement, two rows in two streams: what W2 writes, without the reads or checks.
cat > "$dir/two_rows.sql" <<SQL
INSERT INTO $schema.events (event_id, stream_id, stream_version, event_type, payload, metadata)
VALUES (gen_random_uuid(), 'raw-' || gen_random_uuid(), 1, 'Withdrawn', '{"amount":1}', '$metadata'),
       (gen_random_uuid(), 'raw-' || gen_random_uuid(), 1, 'Deposited', '{"amount":1}', '$metadata');
SQL

# Two accounts out of 1,000: read both versions, append one event to each. A concurrent
# writer that took a version first makes the insert do nothing (EventCore would report a
# conflict and retry): rare with 1,000 accounts, and it keeps pgbench's clients running.
cat > "$dir/two_streams.sql" <<SQL
\\set a random(0, 999)
\\set b random(0, 998)
BEGIN;
SELECT coalesce(max(stream_version), 0) AS va FROM $schema.events WHERE stream_id = 'account-' || :a \\gset
SELECT coalesce(max(stream_version), 0) AS vb FROM $schema.events WHERE stream_id = 'account-' || ((:a + 1 + :b) % 1000) \\gset
INSERT INTO $schema.events (event_id, stream_id, stream_version, event_type, payload, metadata)
VALUES (gen_random_uuid(), 'account-' || :a, :va + 1, 'Withdrawn', '{"amount":1}', '$metadata'),
       (gen_random_uuid(), 'account-' || ((:a + 1 + :b) % 1000), :vb + 1, 'Deposited', '{"amount":1}', '$metadata')
ON CONFLICT DO NOTHING;
COMMIT;
SQL

run() {
    local name=$1 clients=$2 file=$3
    local tps
    tps=$("$pgbench" -n -M prepared -c "$clients" -j "$clients" -T "$duration" -f "$file" "$DATABASE_URL" 2>/dev/null \
        | awk '/^tps/ { printf "%.0f", $3 }' || true)
    printf '{"limit":"%s","concurrency":%d,"tps":%s}\n' "$name" "$clients" "${tps:-null}"
}

run one_insert 1 "$dir/one_insert.sql"
run one_insert 8 "$dir/one_insert.sql"
run two_rows 1 "$dir/two_rows.sql"
run two_rows 8 "$dir/two_rows.sql"
run two_streams 1 "$dir/two_streams.sql"
run two_streams 8 "$dir/two_streams.sql"

# Paged ordered scan: 100,000 rows in pages of 5,000 by position.
psql <<SQL
INSERT INTO $schema.events (event_id, stream_id, stream_version, event_type, payload, metadata)
SELECT gen_random_uuid(), 'scan-' || (g / 100), g % 100 + 1, 'Deposited', '{"amount":1}', '$metadata'
  FROM generate_series(0, 99999) g;
ANALYZE $schema.events;
SQL
start=$(date +%s.%N)
psql <<SQL >/dev/null
DO \$\$
DECLARE last bigint := 0; n bigint;
BEGIN
    LOOP
        SELECT max(global_position), count(*) INTO last, n FROM (
            SELECT global_position, payload::text, metadata::text FROM $schema.events
             WHERE global_position > last AND stream_id LIKE 'scan-%'
             ORDER BY global_position LIMIT 5000) page;
        EXIT WHEN n = 0;
    END LOOP;
END \$\$;
SQL
end=$(date +%s.%N)
python3 -c "print('{\"limit\":\"paged_scan_100k\",\"rows_per_s\":%.0f}' % (100000 / ($end - $start)))"

psql -c "DROP SCHEMA $schema CASCADE"
