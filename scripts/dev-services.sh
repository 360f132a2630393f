#!/usr/bin/env bash
# Local Postgres and Redis for `make run`: loopback only, data under .run/ (git-ignored), on
# ports that do not clash with servers already running on the standard ones.
#
#   scripts/dev-services.sh up      install the Debian packages if absent, start both
#   scripts/dev-services.sh down    stop both
#   scripts/dev-services.sh env     print the SYNCAR_* variables pointing at them
#   scripts/dev-services.sh install install the Debian packages if absent (for benches)
#   scripts/dev-services.sh install-test  those and what the tests start besides (redis-cli
#                                   for a Redis Cluster, psql, PgBouncer)
#   scripts/dev-services.sh free-ports N  print N distinct loopback ports nothing uses now
set -euo pipefail

cd "$(dirname "$0")/.."
RUN_DIR="${SYNCAR_DEV_DIR:-$PWD/.run}"
PG_PORT="${SYNCAR_DEV_PG_PORT:-55432}"
REDIS_PORT="${SYNCAR_DEV_REDIS_PORT:-56379}"
PG_DB=syncar

pg_bindir() {
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir
    return
  fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1
}

install_packages() {
  local need=()
  [ -n "$(pg_bindir)" ] && [ -x "$(pg_bindir)/initdb" ] || need+=(postgresql)
  command -v redis-server >/dev/null || need+=(redis-server)
  if [ "${1:-}" = tests ]; then
    command -v redis-cli >/dev/null || need+=(redis-tools)
    command -v psql >/dev/null || need+=(postgresql-client)
    [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || need+=(pgbouncer)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} (Debian packages)"
    if [ "$(id -u)" -ne 0 ]; then
      echo "error: ${need[*]} missing; run: sudo apt-get install -y ${need[*]}" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# Postgres refuses to run as root: use the postgres user then.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

up() {
  install_packages
  local bin
  bin="$(pg_bindir)"
  mkdir -p "$RUN_DIR"
  if [ ! -f "$RUN_DIR/pg/PG_VERSION" ]; then
    mkdir -p "$RUN_DIR/pg"
    [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$RUN_DIR/pg"
    as_pg "$bin/initdb" -D "$RUN_DIR/pg" -A trust -U postgres -E UTF8 >/dev/null
  fi
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$RUN_DIR"
  if ! as_pg "$bin/pg_ctl" -D "$RUN_DIR/pg" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$RUN_DIR/pg" -l "$RUN_DIR/pg.log" -w \
      -o "-p $PG_PORT -k $RUN_DIR -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_slot_wal_keep_size=1GB" start >/dev/null
  fi
  as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1 ||
    as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $PG_DB"
  if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN_DIR" \
      --daemonize yes --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" >/dev/null
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  echo "postgres on 127.0.0.1:$PG_PORT (database $PG_DB), redis on 127.0.0.1:$REDIS_PORT; data in .run/"
}

down() {
  local bin
  bin="$(pg_bindir)"
  if [ -f "$RUN_DIR/pg/PG_VERSION" ]; then
    as_pg "$bin/pg_ctl" -D "$RUN_DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
  fi
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  echo "stopped"
}

env_vars() {
  echo "export SYNCAR_POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB"
  echo "export SYNCAR_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
}

# Ports the kernel hands out as free, all held at once so they differ. A fixed port in the
# ephemeral range can be taken at any moment by some client connection's local end, and a
# listener then fails to bind.
free_ports() {
  python3 -c '
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_vars ;;
  install) install_packages ;;
  install-test) install_packages tests ;;
  free-ports) free_ports "${2:-1}" ;;
  *) echo "usage: $0 up|down|env|install|install-test|free-ports [N]" >&2; exit 2 ;;
esac
