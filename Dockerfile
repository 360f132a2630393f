# syncar's container image.
#   docker build -t registry.example.com/syncar:0.1.0 .
#   docker run --rm registry.example.com/syncar:0.1.0 check-config
# Linted by hadolint in scripts/check-k8s.sh, which also checks that the stand-ins below
# cover every target of Cargo.toml.

FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source change. Cargo wants every bench the manifest names
# to exist, hence the empty stand-ins (one per [[bench]] of Cargo.toml).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs benches/stale.rs benches/hot.rs benches/micro.rs benches/memory.rs benches/fleet.rs \
       benches/install.rs benches/ddl.rs benches/relay.rs \
    && cargo build --release --locked --bin syncar \
    && rm -rf src benches

# The sources (src/http.rs embeds docs/openapi.json). touch: the stand-ins built above are
# newer than the copied files, and cargo decides what to rebuild by modification time.
COPY src ./src
COPY docs/openapi.json ./docs/openapi.json
RUN mkdir -p benches \
    && touch benches/stale.rs benches/hot.rs benches/micro.rs benches/memory.rs benches/fleet.rs \
       benches/install.rs benches/ddl.rs benches/relay.rs \
        src/main.rs src/lib.rs \
    && cargo build --release --locked --bin syncar \
    && install -m 0755 target/release/syncar /usr/local/bin/syncar

# Distroless: glibc and libgcc (all syncar links against), no shell, no package manager.
# Every probe is an httpGet on the admin listener, so nothing needs to run inside the
# container. syncar talks to Postgres and Redis without TLS (no TLS support is built in), so
# the image's CA bundle goes unused. Built on bookworm above: the same glibc as Debian 12.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/syncar /usr/local/bin/syncar
# The documented defaults, so the image runs without a mounted config; on Kubernetes the
# ConfigMap mounted at /etc/syncar replaces it.
COPY config/syncar.toml /etc/syncar/syncar.toml
# Numeric user and group 10001, the manifests' runAsUser/runAsGroup (not the image's own
# nonroot user, 65532): a numeric uid needs no passwd entry, and runAsNonRoot can check it.
USER 10001:10001
# 7070: the API (server.listen; loopback in the k8s/ config, so reachable only inside the
# pod). 7071: /healthz, /readyz and /metrics once server.admin_listen is set, as k8s/ does.
EXPOSE 7070 7071
# `syncar --config /etc/syncar/syncar.toml`, then the command: `serve` by default, or
# `migrate` or `check-config`.
ENTRYPOINT ["/usr/local/bin/syncar", "--config", "/etc/syncar/syncar.toml"]
CMD ["serve"]
