#!/usr/bin/env bash
# Fuzzes the HTTP API with schemathesis (from PyPI), driven by the OpenAPI document syncar
# serves, against a running syncar on real Postgres and Redis (scripts/dev-services.sh).
# Fails on any 5xx, any response that does not match the document, a crash or a hang.
#   FUZZ_EXAMPLES  test cases per operation and phase (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
st="$(command -v schemathesis || echo "$scripts_dir/schemathesis")"
if [ ! -x "$st" ]; then
  python3 -m pip install -q schemathesis
  st="$(command -v schemathesis || echo "$scripts_dir/schemathesis")"
fi

# Data of their own and free ports, so a `make run` left running (or anything else) does not
# clash.
export SYNCAR_DEV_DIR="$PWD/.run/fuzz"
read -r free_pg free_redis free_api <<<"$(scripts/dev-services.sh free-ports 3)"
export SYNCAR_DEV_PG_PORT="${SYNCAR_DEV_PG_PORT:-$free_pg}"
export SYNCAR_DEV_REDIS_PORT="${SYNCAR_DEV_REDIS_PORT:-$free_redis}"
scripts/dev-services.sh up
eval "$(scripts/dev-services.sh env)"
# The relay as a synchronous standby (README "Committed means evicted"), so that writes the
# fuzz sends with consistency=strong are served, not refused with 503 not_synchronous.
psql_bin="$(command -v psql || ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n1)"
"$psql_bin" "$SYNCAR_POSTGRES_URL" -qAtc "ALTER SYSTEM SET synchronous_standby_names = '\"syncar-relay\"'"
"$psql_bin" "$SYNCAR_POSTGRES_URL" -qAtc "SELECT pg_reload_conf()" >/dev/null
port="${SYNCAR_FUZZ_PORT:-$free_api}"
cargo build -q
SYNCAR_LISTEN="127.0.0.1:$port" SYNCAR_LOG=warn "${CARGO_TARGET_DIR:-target}/debug/syncar" serve --config config/syncar.toml &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; scripts/dev-services.sh down >/dev/null' EXIT

ready=""
for _ in $(seq 150); do
  if body="$( (exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && cat <&3) 2>/dev/null)" \
    && grep -q '"ready":true' <<<"$body" && grep -q '"sync":true' <<<"$body"; then
    ready=yes
    break
  fi
  sleep 0.2
done
[ -n "$ready" ] || { echo "fuzz: syncar never became ready" >&2; exit 1; }

# positive_data_acceptance is left out: a schema-valid If-Match or If-None-Match rightly gets
# 412 (or 400 for both at once) depending on what is stored, which that check counts as a
# rejection.
timeout 900 "$st" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance \
  --max-examples "${FUZZ_EXAMPLES:-50}" --request-timeout 10 --seed 1

kill -0 "$pid" || { echo "fuzz: syncar died during the run" >&2; exit 1; }
echo "fuzz: passed; syncar still running"
