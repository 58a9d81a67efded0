# Sourced by the provisioning scripts: `free_port PREFERRED` prints PREFERRED when it is
# free on 127.0.0.1 (so that the URL a test build sees stays the same from run to run and
# cargo does not rebuild the tests, whose build script watches it), any free port
# otherwise.
free_port() {
    python3 - "$1" <<'PY'
import socket, sys
for port in (int(sys.argv[1]), 0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    print(s.getsockname()[1])
    s.close()
    break
PY
}
