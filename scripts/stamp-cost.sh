#!/usr/bin/env bash
# What a plain-SQL UPDATE costs Postgres with syncar's version stamp, in CPU instructions
# counted by valgrind's callgrind: the same from run to run, whatever else the machine is
# doing (TPS on a shared machine varies by tens of percent between runs; see BENCHMARKS.md,
# "Where the version stamp's cost goes"). `make bench-stamp`.
#
# A Postgres of its own (data under a temporary directory); `syncar migrate` installs the
# `wal` source's triggers on `syncar_kv` (the stamp, exactly as syncar writes it), with the
# PL/pgSQL stamp in database `postgres` and with the C stamp of the syncar_stamp extension
# (`make stamp-extension` installs it) in database `ext`; then, in
# single-user mode under callgrind, the same prepared single-row UPDATEs (random keys of
# 1000, a new jsonb value each) on tables that differ only in their triggers:
#   plain      no trigger
#   c-trigger  a C BEFORE ROW trigger doing almost nothing (core's
#              suppress_redundant_updates_trigger): the trigger machinery alone
#   plpgsql    a PL/pgSQL BEFORE ROW trigger that only returns NEW
#   nextval    a PL/pgSQL trigger setting version := nextval(...), no exception block
#   syncar     syncar's PL/pgSQL stamp (nextval inside the block that survives a renamed column)
#   extension  syncar's C stamp (postgres.stamp = "extension")
#   inline     no trigger, version = nextval(...) in the UPDATE itself
#   log        syncar's PL/pgSQL stamp and the changes_log source's statement trigger, as
#              migrated: SECURITY DEFINER with a pinned search_path (database `log`)
#   log-invoker the same trigger function run as the writer (database `loginv`): what
#              SECURITY DEFINER costs
# Prints instructions per UPDATE (the run's total less a run of the PREPARE alone, over the
# statements) and each variant's share above `plain`. Needs valgrind (Debian package).
set -euo pipefail

cd "$(dirname "$0")/.."
STATEMENTS="${STATEMENTS:-3000}"
command -v valgrind >/dev/null || {
  echo "error: valgrind missing; run: apt-get install -y valgrind" >&2
  exit 1
}
bin="$(pg_config --bindir 2>/dev/null || true)"
[ -x "$bin/initdb" ] || bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
[ -x "$bin/initdb" ] || {
  echo "error: no Postgres server binaries; run: scripts/dev-services.sh install" >&2
  exit 1
}
cargo build -q --bin syncar
syncar="${CARGO_TARGET_DIR:-target}/debug/syncar"

dir="$(mktemp -d /tmp/syncar-stamp-XXXXXX)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then su postgres -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$dir"
trap 'as_pg "$bin/pg_ctl -D $dir/data -m immediate stop" >/dev/null 2>&1 || true; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
port="$(scripts/dev-services.sh free-ports 1)"
as_pg "$bin/initdb -D $dir/data -A trust" >/dev/null
as_pg "$bin/pg_ctl -D $dir/data -o '-p $port -k $dir -c listen_addresses=127.0.0.1 -c wal_level=logical' -l $dir/log -w start" >/dev/null
psql=(psql -h 127.0.0.1 -p "$port" -U postgres -q -v ON_ERROR_STOP=1 -d postgres)
printf '[postgres]\nstamp = "plpgsql"\n[feeds]\npostgres_source = "wal"\n' >"$dir/syncar.toml"
SYNCAR_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres" "$syncar" migrate --config "$dir/syncar.toml" >/dev/null
"${psql[@]}" -c "CREATE DATABASE ext"
printf '[postgres]\nstamp = "extension"\n[feeds]\npostgres_source = "wal"\n' >"$dir/ext.toml"
SYNCAR_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/ext" "$syncar" migrate --config "$dir/ext.toml" >/dev/null
for db in log loginv; do
  "${psql[@]}" -c "CREATE DATABASE $db"
  printf '[postgres]\nstamp = "plpgsql"\n[feeds]\npostgres_source = "changes_log"\n' >"$dir/$db.toml"
  SYNCAR_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/$db" "$syncar" migrate --config "$dir/$db.toml" >/dev/null
  "${psql[@]}" -d "$db" -c "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, jsonb_build_object('v', i) FROM generate_series(1, 1000) i" -c "VACUUM ANALYZE syncar_kv"
done
"${psql[@]}" -d loginv -c "ALTER FUNCTION public.syncar_announce_kv() SECURITY INVOKER RESET search_path"
"${psql[@]}" -d ext -c "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, jsonb_build_object('v', i) FROM generate_series(1, 1000) i" -c "VACUUM ANALYZE syncar_kv"
"${psql[@]}" <<'SQL'
INSERT INTO syncar_kv (key, value) SELECT 'k' || i, jsonb_build_object('v', i) FROM generate_series(1, 1000) i;
CREATE FUNCTION bare() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE FUNCTION next() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.version := nextval('public.syncar_version_seq'); RETURN NEW; END $$;
DO $$ DECLARE t text; BEGIN
  FOREACH t IN ARRAY ARRAY['plain', 'c_trigger', 'plpgsql', 'nextval', 'inline'] LOOP
    EXECUTE format('CREATE TABLE %I (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL)', t);
    EXECUTE format('INSERT INTO %I SELECT key, value, version FROM syncar_kv', t);
  END LOOP;
END $$ LANGUAGE plpgsql;
SQL
"${psql[@]}" <<'SQL'
CREATE TRIGGER t BEFORE UPDATE ON c_trigger FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger();
CREATE TRIGGER t BEFORE UPDATE ON plpgsql FOR EACH ROW EXECUTE FUNCTION bare();
CREATE TRIGGER t BEFORE UPDATE ON nextval FOR EACH ROW EXECUTE FUNCTION next();
VACUUM ANALYZE;
SQL
as_pg "$bin/pg_ctl -D $dir/data -w stop" >/dev/null

script() { # table, extra SET clause, statements
  echo "PREPARE u(int, text) AS UPDATE $1 SET value = jsonb_build_object('v', \$1)$2 WHERE key = \$2"
  local i
  for ((i = 0; i < $3; i++)); do echo "EXECUTE u($((RANDOM * 32768 + RANDOM)), 'k$((RANDOM % 1000 + 1))')"; done
}
count() { # name, table, extra, statements, database
  RANDOM=27 # the same keys and values for every variant and every run
  script "$2" "$3" "$4" >"$dir/$1.sql"
  [ "$(id -u)" -eq 0 ] && chown postgres "$dir/$1.sql"
  as_pg "valgrind --tool=callgrind --callgrind-out-file=$dir/$1.cg $bin/postgres --single -D $dir/data \
    -c fsync=off -c wal_level=logical ${5:-postgres} <$dir/$1.sql >$dir/$1.log 2>&1"
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/$1.log"
}
base="$(count empty plain '' 0)"
printf '%-11s %14s %10s\n' variant instr/UPDATE 'vs plain'
plain=""
for v in plain:plain: c-trigger:c_trigger: plpgsql:plpgsql: nextval:nextval: syncar:syncar_kv: \
  extension:syncar_kv::ext "inline:inline:, version = nextval('public.syncar_version_seq')" \
  log:syncar_kv::log log-invoker:syncar_kv::loginv; do
  IFS=: read -r name table extra db <<<"$v"
  total="$(count "$name" "$table" "$extra" "$STATEMENTS" "$db")"
  per=$(((total - base) / STATEMENTS))
  [ -n "$plain" ] || plain=$per
  printf '%-11s %14d %+9.1f%%\n' "$name" "$per" "$(echo "($per - $plain) * 100 / $plain" | bc -l)"
done
echo "(Postgres $("$bin/postgres" --version | awk '{print $3}'), $STATEMENTS prepared single-row UPDATEs per variant, single-user mode, callgrind)"
