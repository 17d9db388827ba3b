#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL server, e.g.
#   scripts/with-postgres.sh .venv/bin/python -m pytest -q tests/attribution tests/migrations
#
# Starts a fresh cluster in a temporary directory (initdb; as the `postgres` user when run as root,
# since the server refuses to run as root), listening only on a unix socket inside that directory (no
# TCP; the directory is private, so trust authentication reaches nobody else), with fsync off for speed.
# Exports OPENLORA_TEST_DATABASE_URL=postgresql+psycopg://postgres@/postgres?host=<dir>, runs the
# command, then stops the server and deletes the directory whatever happens. Exits with the command's
# status. Installs the Debian `postgresql` package when no server binaries are found (idempotent; needs
# root or passwordless sudo), like scripts/ensure-chromium.sh.
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

pg_bindir() {
    # the newest installed major version's server binaries (Debian: /usr/lib/postgresql/<major>/bin)
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
}

PGBIN=$(pg_bindir)
if [ -z "$PGBIN" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "with-postgres: PostgreSQL is missing and this user cannot install it (not root, no sudo)" >&2
            exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq postgresql >/dev/null
    PGBIN=$(pg_bindir)
    if [ -z "$PGBIN" ]; then
        echo "with-postgres: installed postgresql but found no initdb under /usr/lib/postgresql/*/bin" >&2
        exit 1
    fi
fi

# The server must not run as root: as root, run it as the `postgres` user (created by the package).
RUNAS=()
if [ "$(id -u)" -eq 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    RUNAS=(runuser -u postgres --)
fi

DIR=$(mktemp -d /tmp/openlora-pg.XXXXXX)  # short path: a unix socket path must stay under ~100 bytes
chmod 700 "$DIR"
if [ ${#RUNAS[@]} -gt 0 ]; then chown postgres:postgres "$DIR"; fi

cleanup() {
    if [ -f "$DIR/data/postmaster.pid" ]; then
        "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! "${RUNAS[@]}" "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
        --no-sync >"$DIR/initdb.log" 2>&1; then
    cat "$DIR/initdb.log" >&2
    echo "with-postgres: initdb failed" >&2
    exit 1
fi
cat >>"$DIR/data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$DIR'
port = 5432
max_connections = 50
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
if ! "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start >/dev/null; then
    cat "$DIR/server.log" >&2 || true
    echo "with-postgres: the server did not start" >&2
    exit 1
fi

export OPENLORA_TEST_DATABASE_URL="postgresql+psycopg://postgres@/postgres?host=$DIR"
echo "with-postgres: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') at $OPENLORA_TEST_DATABASE_URL" >&2
set +e
"$@"
status=$?
set -e
exit "$status"
