#!/usr/bin/env bash
# Runs the client examples (examples/python, examples/typescript) against two real syncar
# instances sharing one Postgres and one Redis (scripts/dev-services.sh), as CI would: each
# example checks that syncar behaves as documented and exits non-zero if not.
#
#   bash scripts/run-examples.sh
#
# Needs python3 (3.11+, with venv), node (20+) and npm. Installs the examples' pinned
# dependencies into .run/examples/venv and examples/typescript/node_modules (both
# git-ignored). Quiet on success but for the examples' own output.
#
# Environment: SYNCAR_BIN (a syncar binary; default target/debug/syncar, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

state="$PWD/.run/examples"
venv="$state/venv"
mkdir -p "$state"
started=$SECONDS

pid_a="" pid_b="" example_pid="" services_up=""
die() {
  echo "run-examples: FAILED: $*" >&2
  for log in "$state"/syncar-a.log "$state"/syncar-b.log; do
    if [ -n "$pid_a" ] && [ -s "$log" ]; then
      echo "run-examples: last lines of $log:" >&2
      tail -n 15 "$log" >&2
    fi
  done
  exit 1
}
# Runs a command with its output in a file, shown only if it fails.
quietly() {
  local out="$state/step.log"
  "$@" >"$out" 2>&1 || { cat "$out" >&2; die "$*"; }
}

# What the examples need, before anything is started.
missing=()
command -v python3 >/dev/null || missing+=("python3 (3.11 or later; Debian: apt-get install python3 python3-venv)")
command -v node >/dev/null || missing+=("node (20 or later; https://nodejs.org, or Debian: apt-get install nodejs)")
command -v npm >/dev/null || missing+=("npm (comes with Node.js; Debian: apt-get install npm)")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'run-examples: missing: %s\n' "${missing[@]}" >&2
  exit 1
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 is $(python3 --version 2>&1); the Python example needs 3.11 or later"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' ||
  die "node is $(node --version); the TypeScript example needs Node.js 20 or later"

# One run at a time: runs share the Postgres data under $state.
exec 9>"$state/lock"
flock -w 300 9 || die "another run-examples.sh held $state/lock for 5 minutes"

# Dependencies, reinstalled only when their pins change.
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >/dev/null 2>&1 || {
    rm -rf "$venv"
    die "python3 cannot create a venv; Debian: apt-get install python3-venv"
  }
fi
if ! cmp -s examples/python/requirements.txt "$venv/requirements.txt"; then
  quietly "$venv/bin/pip" install -q --disable-pip-version-check -r examples/python/requirements.txt
  cp examples/python/requirements.txt "$venv/requirements.txt"
fi
ts=examples/typescript
if [ ! -d "$ts/node_modules" ] || ! cmp -s "$ts/package-lock.json" "$state/npm-installed.json"; then
  quietly npm ci --prefix "$ts" --no-audit --no-fund
  cp "$ts/package-lock.json" "$state/npm-installed.json"
fi
# Type-checks and compiles to examples/typescript/dist.
quietly "$ts/node_modules/.bin/tsc" -p "$ts"

# syncar: the binary given, or the debug build.
bin="${SYNCAR_BIN:-${CARGO_TARGET_DIR:-target}/debug/syncar}"
if [ ! -x "$bin" ]; then
  [ -z "${SYNCAR_BIN:-}" ] || die "SYNCAR_BIN=$SYNCAR_BIN is not an executable"
  echo "run-examples: building syncar (cargo build --bin syncar)"
  quietly cargo build --bin syncar
fi

# Postgres and Redis of our own, on free ports, so a `make run` left running (or another
# script) does not clash.
export SYNCAR_DEV_DIR="$state/services"
read -r pg_port redis_port port_a port_b <<<"$(scripts/dev-services.sh free-ports 4)"
export SYNCAR_DEV_PG_PORT="$pg_port" SYNCAR_DEV_REDIS_PORT="$redis_port"

cleanup() {
  local pid
  for pid in $example_pid $pid_a $pid_b; do kill "$pid" 2>/dev/null || true; done
  for pid in $example_pid $pid_a $pid_b; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$services_up" ]; then scripts/dev-services.sh down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'echo "run-examples: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# A run that was killed may have left its Postgres running on its own data, on another port.
scripts/dev-services.sh down >/dev/null 2>&1 || true
services_up=yes
quietly scripts/dev-services.sh up
eval "$(scripts/dev-services.sh env)"

# Two instances, as two pods would run them: same Postgres, Redis and config (so the same
# redis.key_prefix), their own names and ports.
start() { # start NAME PORT
  SYNCAR_LISTEN="127.0.0.1:$2" SYNCAR_INSTANCE="examples-$1" SYNCAR_LOG=warn \
    "$bin" serve --config config/syncar.toml >"$state/syncar-$1.log" 2>&1 &
}
start a "$port_a"
pid_a=$!
start b "$port_b"
pid_b=$!

# Ready, and both feeds up (L1 in use): what the examples' coherence steps are about.
readyz() { # readyz PORT: the raw HTTP response of GET /readyz, or nothing
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && cat <&3) 2>/dev/null || true
}
for name in a b; do
  if [ "$name" = a ]; then pid=$pid_a port=$port_a; else pid=$pid_b port=$port_b; fi
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || die "syncar $name exited"
    response="$(readyz "$port")"
    if [[ "$response" == "HTTP/1."?" 200"* && "$response" == *'"l1_in_use":true'* ]]; then
      continue 2
    fi
    sleep 0.1
  done
  die "syncar $name: /readyz not 200 with l1_in_use within 30 s: ${response#*$'\r\n\r\n'}"
done

# In the background, so that a signal to this script stops the example too (cleanup).
run_example() { # run_example FILE COMMAND...
  local file="$1"
  shift
  echo "--- $file"
  "$@" &
  example_pid=$!
  wait "$example_pid" || die "$file exited with status $?"
  example_pid=""
}
export SYNCAR_A="http://127.0.0.1:$port_a" SYNCAR_B="http://127.0.0.1:$port_b"
run_example examples/python/orders.py "$venv/bin/python" examples/python/orders.py
run_example examples/typescript/orders.ts node "$ts/dist/orders.js"
echo "run-examples: both examples passed in $((SECONDS - started)) s"
