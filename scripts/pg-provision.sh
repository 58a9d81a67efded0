# Sourced by scripts/test (and usable on its own with `source`): makes sure DATABASE_URL
# points at a PostgreSQL server.
#
# - DATABASE_URL already set: use it as it is.
# - Otherwise: start a throwaway cluster with the installed initdb/pg_ctl, listening on
#   127.0.0.1 only, on a free port, in a temporary directory that `pg_teardown` (called
#   from the caller's EXIT trap) stops and removes. When running as root, the cluster
#   runs as the `postgres` OS user, because PostgreSQL refuses to run as root.
#
# Fails with a clear message when no PostgreSQL can be had.

pg_fail() {
    echo "scripts/test: $*" >&2
    echo "scripts/test: set DATABASE_URL to a PostgreSQL server, or install the PostgreSQL server binaries (initdb, pg_ctl)." >&2
    exit 1
}

pg_find_bin() {
    local name=$1 found
    found=$(command -v "$name" 2>/dev/null || true)
    if [ -z "$found" ]; then
        found=$(ls -1d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    echo "$found"
}

source "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

pg_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

PG_TMPDIR=""
PG_CTL=""

pg_teardown() {
    if [ -n "$PG_TMPDIR" ] && [ -d "$PG_TMPDIR" ]; then
        pg_as_owner "$PG_CTL" -D "$PG_TMPDIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_TMPDIR"
    fi
}

pg_provision() {
    if [ -n "${DATABASE_URL:-}" ]; then
        echo "scripts/test: using DATABASE_URL from the environment"
        return 0
    fi
    local initdb
    initdb=$(pg_find_bin initdb)
    PG_CTL=$(pg_find_bin pg_ctl)
    [ -n "$initdb" ] && [ -n "$PG_CTL" ] || pg_fail "DATABASE_URL is not set and initdb/pg_ctl were not found."
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        pg_fail "running as root, but there is no 'postgres' OS user to run the cluster as."
    fi

    PG_TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/eventcore-pg.XXXXXX")
    chmod 755 "$PG_TMPDIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_TMPDIR"
    local port
    port=$(free_port 54329) || pg_fail "could not find a free TCP port."

    pg_as_owner "$initdb" -D "$PG_TMPDIR/data" -U eventcore --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$PG_TMPDIR/initdb.log" 2>&1 || { cat "$PG_TMPDIR/initdb.log" >&2; pg_fail "initdb failed."; }
    # Durability stays at PostgreSQL's defaults (fsync, synchronous_commit on).
    pg_as_owner "$PG_CTL" -D "$PG_TMPDIR/data" -w -t 60 -l "$PG_TMPDIR/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_TMPDIR -c max_connections=300" start \
        >/dev/null || { cat "$PG_TMPDIR/server.log" >&2; pg_fail "the throwaway PostgreSQL cluster did not start."; }
    export DATABASE_URL="postgres://eventcore@127.0.0.1:$port/postgres"
    echo "scripts/test: started a throwaway PostgreSQL on 127.0.0.1:$port ($PG_TMPDIR)"
}
