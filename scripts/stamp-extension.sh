#!/usr/bin/env bash
# Builds the C version stamp (ext/syncar_stamp) and installs it into Debian's Postgres, the
# one `make test` and `make run` start: `make stamp-extension`. With the extension there,
# `syncar migrate` (postgres.stamp = "auto") uses it instead of the PL/pgSQL stamp.
#
# Needs that Postgres' server headers and pg_config (Debian: postgresql-server-dev-N),
# installed here when missing and run as root; gcc and make. For another server, build with
# its own pg_config: make -C ext/syncar_stamp install PG_CONFIG=/path/to/pg_config
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-services.sh install
bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
[ -x "$bin/postgres" ] || {
  echo "error: no Postgres server under /usr/lib/postgresql; run: scripts/dev-services.sh install" >&2
  exit 1
}
major="$(basename "$(dirname "$bin")")"
if [ ! -x "$bin/pg_config" ] || [ ! -f "/usr/include/postgresql/$major/server/postgres.h" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: the C stamp needs Postgres $major's server headers; run: sudo apt-get install -y postgresql-server-dev-$major" >&2
    exit 1
  fi
  echo "stamp-extension: installing postgresql-server-dev-$major (Debian package)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-server-dev-$major" >/dev/null
fi
command -v gcc >/dev/null || {
  echo "error: the C stamp needs gcc; run: apt-get install -y gcc make" >&2
  exit 1
}
# Clean first: objects built against another server's headers must not be installed here.
make -s -C ext/syncar_stamp clean >/dev/null
make -s -C ext/syncar_stamp PG_CONFIG="$bin/pg_config" >/dev/null
if [ -w "$("$bin/pg_config" --pkglibdir)" ]; then
  make -s -C ext/syncar_stamp PG_CONFIG="$bin/pg_config" install >/dev/null
else
  sudo make -s -C ext/syncar_stamp PG_CONFIG="$bin/pg_config" install >/dev/null
fi
echo "stamp-extension: syncar_stamp installed into Postgres $major ($("$bin/pg_config" --pkglibdir))"
