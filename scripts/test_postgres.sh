#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the registry's database tests (best effort).
#   scripts/test_postgres.sh start   -> prints a SQLAlchemy URL, exit 0; exit 1 if no server here
#   scripts/test_postgres.sh stop    -> stops it and removes its data folder
set -u
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
DATA=${DIFFORGE_PG_DATA:-/tmp/difforge-test-pg}
PORT=${DIFFORGE_PG_PORT:-55432}
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$1"; else sh -c "$1"; fi; }

case "${1:-start}" in
  start)
    [ -n "$BIN" ] && [ -x "$BIN/initdb" ] || { echo "no PostgreSQL server on this machine" >&2; exit 1; }
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then echo "no postgres user" >&2; exit 1; fi
    rm -rf "$DATA" && mkdir -p "$DATA" && { [ "$(id -u)" != 0 ] || chown postgres "$DATA"; }
    as_pg "$BIN/initdb -D $DATA -A trust -U postgres >/dev/null" || exit 1
    as_pg "$BIN/pg_ctl -D $DATA -o '-k /tmp -p $PORT -c listen_addresses=127.0.0.1 -c fsync=off' -l $DATA/log -w start >/dev/null" || exit 1
    echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
    ;;
  stop)
    [ -d "$DATA" ] && as_pg "$BIN/pg_ctl -D $DATA -m immediate stop >/dev/null 2>&1"
    rm -rf "$DATA"
    ;;
esac
