//! The configuration's shape: every section and key with its default. `///` on each field is
//! the user's reference; `config/syncar.toml` documents the same keys with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This instance's name in logs and metrics (`SYNCAR_INSTANCE`). Defaults to the hostname.
    pub instance: Option<String>,
    pub server: ServerConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub feeds: FeedsConfig,
    pub log: LogConfig,
    pub audit: AuditConfig,
    /// Tables served as resources, besides the built-in `kv`.
    #[serde(rename = "resource")]
    pub resources: Vec<ResourceConfig>,
    /// Environment overrides that could not be applied, reported by `validate`.
    #[serde(skip)]
    pub(super) env_problems: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API (`SYNCAR_LISTEN`). Loopback by default: the app is a neighbour.
    pub listen: String,
    /// A Unix domain socket serving the same API as `listen`, beside it (e.g. a path in an
    /// `emptyDir` volume the pod's containers share): no TCP/IP stack on the way. The file is
    /// replaced at start if it is a stale socket.
    pub listen_unix: Option<String>,
    /// The socket file's mode, in octal (`"0600"`: only the user syncar runs as may connect;
    /// `"0660"` for its group too).
    pub listen_unix_mode: String,
    /// A second listener serving only `/healthz`, `/readyz` and `/metrics`, without a token
    /// and apart from the API's load shedding (`SYNCAR_ADMIN_LISTEN`): for the kubelet's probes and
    /// Prometheus, which reach the pod's IP, while the API stays on loopback. None: those
    /// routes are served on `listen` only.
    pub admin_listen: Option<String>,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest key accepted, in bytes after percent-decoding; longer ones get 414. Keys travel
    /// in NOTIFY payloads, which Postgres limits to 8000 bytes.
    pub max_key_bytes: usize,
    /// Most keys one batch get may name; more get 413 `too_many_keys`.
    pub max_batch_keys: usize,
    /// Most watch streams open at once; more get 503 `overloaded`.
    pub max_watchers: usize,
    /// Events a watcher may fall behind before it is sent a `reset` and closed.
    pub watch_buffer: usize,
    /// How long a client may take to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Deadline for one request, from headers read to response; past it the client gets 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Runtime worker threads; 0 means one per core. A sidecar shares its pod's CPUs with the
    /// app: size it with `make bench-hot`, which measures 2 threads against 1.
    pub worker_threads: usize,
    /// Largest request head (request line and headers), in bytes; larger gets 431. At least
    /// 8192.
    pub max_header_bytes: usize,
    /// Requests handled at once; beyond it syncar answers 503 with `Retry-After` at once
    /// (load shedding) instead of queueing without bound. `/healthz` is exempt.
    pub max_concurrent_requests: usize,
    /// File holding the bearer token every route but `/healthz` then requires
    /// (`Authorization: Bearer ...`). `SYNCAR_AUTH_TOKEN` sets it directly. Never logged.
    pub auth_token_file: Option<PathBuf>,
    /// The token itself, from `SYNCAR_AUTH_TOKEN` or `auth_token_file`; never in the file.
    #[serde(skip)]
    pub auth_token: Option<Secret>,
    /// Listen on a non-loopback address without a token. Off: syncar refuses to start, so a
    /// misconfigured pod cannot expose every document to its network.
    pub allow_unauthenticated_non_loopback: bool,
}

/// A secret value: shown as `***` in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL or key=value string (`SYNCAR_POSTGRES_URL`). Never logged with its password.
    /// TLS as libpq has it: `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
    /// `verify-full`), `sslrootcert` (a PEM file of CA certificates, or `system`), `sslcert`
    /// and `sslkey` (a client certificate); see `tls.rs`.
    pub url: String,
    /// Schema holding syncar's own objects: the version sequence, trigger functions, `syncar_kv`.
    pub schema: String,
    /// Connections in the pool. One resource's reads and writes leave a quarter of them
    /// (rounded down) to the others, so that a lock on one table cannot take them all.
    pub pool_size: usize,
    /// Timeout for opening a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for a free pooled connection before answering 503.
    #[serde(with = "humantime_serde")]
    pub pool_timeout: Duration,
    /// Server-side `statement_timeout` on every pooled connection.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Run the migration at start (`syncar serve`). Off: the schema must already be installed.
    pub migrate_on_start: bool,
    /// Which version stamp the migration puts on each cached table; see [`Stamp`].
    pub stamp: Stamp,
    /// `Retry-After` sent with a 503 when Postgres is unavailable.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Connection for the LISTEN feed, when it must differ from `url` (LISTEN does not work
    /// through PgBouncer in transaction mode). Default: `url`.
    pub listen_url: Option<String>,
    /// Connection for the relay's replication connection (`wal` source), when it must differ
    /// from `url`: straight to the primary, not through PgBouncer, as a role with
    /// `REPLICATION`. Default: `url`.
    pub replication_url: Option<String>,
    /// File holding `url` (a mounted Secret), read at start; overrides `url`.
    pub url_file: Option<PathBuf>,
}

/// The invalidation feeds that keep every instance's L1 coherent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedsConfig {
    /// The Postgres feed: sees every write, plain SQL included, and repairs Redis.
    pub postgres: bool,
    /// How the Postgres feed learns of changes:
    /// - `auto` (the default): on a fresh install, `wal` when the server allows it
    ///   (`wal_level = logical` and a role allowed to replicate), else `changes_log`;
    ///   `/readyz` says which and why. Decided once: afterwards the recorded source stays
    ///   (an install by an earlier release keeps `changes_log`) until configured otherwise.
    /// - `wal`: logical decoding. One instance, elected, streams the WAL through a
    ///   replication slot and relays every change to Redis; every instance hears it there.
    ///   Nothing on the writers' path but the version stamp (and a message per DELETE or
    ///   TRUNCATE statement).
    /// - `changes_log`: every instance polls `syncar_changes` every `poll_interval`; writers
    ///   pay a log insert per statement.
    /// - `notify`: LISTEN/NOTIFY: immediate, but every notifying commit takes a cluster-wide
    ///   lock, which cost writers of cached tables about two thirds of their throughput in
    ///   `make bench-hot`.
    ///
    /// Decides which triggers the migration installs, so every instance of a deployment must
    /// resolve to the same source.
    pub postgres_source: PostgresSource,
    /// The logical replication slot of the `wal` source (a slot is per cluster, so one per
    /// database and deployment). Empty: `syncar_` followed by the database's name.
    pub wal_slot: String,
    /// The publication naming the cached tables, for the `wal` source.
    pub wal_publication: String,
    /// Whether this instance stands for election as the relay of the `wal` source. Off for
    /// instances that must never open a replication connection (a separate `syncar relay`
    /// Deployment relays for them).
    pub relay: bool,
    /// How long the relay's claim in Redis lasts without renewal: a relay that dies is
    /// replaced within about this long (plus its replication connection's release).
    #[serde(with = "humantime_serde")]
    pub relay_lease: Duration,
    /// `wal_sender_timeout` on the relay's replication connection: how soon Postgres lets go
    /// of the slot when the relay vanishes without closing its socket.
    #[serde(with = "humantime_serde")]
    pub wal_sender_timeout: Duration,
    /// How often the `changes_log` source polls.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Redis pub/sub: the fast path for writes made through syncar.
    pub redis: bool,
    /// How often each instance sends itself a heartbeat through each feed.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A feed whose own heartbeat has not come back for this long counts as down: L1 is
    /// bypassed until it is back. This bounds staleness when a connection dies silently.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// While the Postgres feed is down, keep reading Redis (plain-SQL writes made meanwhile
    /// are not repaired there). Only for deployments where every write goes through syncar.
    pub trust_redis_when_postgres_feed_down: bool,
    /// Report the instance unready (`/readyz` 503) while a feed is down. Reads stay correct
    /// either way: L1 is bypassed.
    pub unready_when_down: bool,
    /// While Postgres cannot be reached at all (the feed cannot even connect), keep serving
    /// L1 and Redis instead of bypassing them (no write can commit through syncar then).
    /// Writers that still reach Postgres from elsewhere are then bounded only by the TTLs.
    pub serve_cached_while_postgres_unreachable: bool,
    /// How long the changes log (`syncar_changes`) keeps entries, for replay after outages.
    #[serde(with = "humantime_serde")]
    pub changes_retention: Duration,
    /// Replay starts this long before an outage began: longer than the longest transaction,
    /// whose changes are logged with its start-side time.
    #[serde(with = "humantime_serde")]
    pub replay_margin: Duration,
    /// Longest pause between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long a read with `min_lsn` waits for this instance to apply that WAL position
    /// (`wal` source) before it reads Postgres instead. Usually the writer's own commit or
    /// the next relay heartbeat (`heartbeat_interval`) brings it; below
    /// `server.request_timeout`.
    #[serde(with = "humantime_serde")]
    pub min_lsn_wait: Duration,
    /// Every write through syncar (PUT, DELETE, a transaction) returns only once every live
    /// instance has applied it, as with `?consistency=strong` (which a write may still turn
    /// off with `?consistency=default`): its commit waits for the relay as a synchronous
    /// standby. Needs the `wal` source and the relay named in `synchronous_standby_names`;
    /// otherwise writes are refused (503 `not_synchronous`, saying what to change). The
    /// older spelling of `write_consistency = "strong"`.
    pub synchronous_writes: bool,
    /// When a write through syncar that does not say (`?consistency=`) answers: `default`,
    /// `eventual` (at commit, Redis and the other instances behind the answer) or `strong`
    /// (as `synchronous_writes`). A write's own `?consistency=` wins.
    pub write_consistency: WriteConsistency,
}

/// When a write answers (`?consistency=` on a PUT, DELETE or transaction, and
/// [`FeedsConfig::write_consistency`]; the names of Dapr's state API). See
/// `http/consistency.rs`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WriteConsistency {
    /// Once Postgres committed and this instance's L1 holds the write; Redis and the other
    /// instances follow behind the answer.
    Eventual,
    /// Once Postgres committed and Redis and this instance's L1 hold the write.
    #[default]
    Default,
    /// Once every live instance has applied the write.
    Strong,
}

impl WriteConsistency {
    /// The name in the configuration and in `?consistency=`.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteConsistency::Eventual => "eventual",
            WriteConsistency::Default => "default",
            WriteConsistency::Strong => "strong",
        }
    }
}

impl FeedsConfig {
    /// How a write that does not say answers: `strong` with `synchronous_writes`, else
    /// `write_consistency`.
    pub fn write_default(&self) -> WriteConsistency {
        if self.synchronous_writes {
            WriteConsistency::Strong
        } else {
            self.write_consistency
        }
    }
}

/// The version stamp: the BEFORE INSERT OR UPDATE row trigger that gives every row written,
/// by anyone, a fresh version from `syncar_version_seq` (ARCHITECTURE.md, "Versions").
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stamp {
    /// The default: the C stamp when Postgres has the `syncar_stamp` extension (installed, or
    /// available and this role may create it), else PL/pgSQL.
    Auto,
    /// A PL/pgSQL function per table, which any Postgres runs (managed services included).
    Plpgsql,
    /// The `syncar_stamp` extension's C function (`ext/syncar_stamp`), about half the
    /// PL/pgSQL stamp's cost to every writer (BENCHMARKS.md, "Where the version stamp's cost
    /// goes"); the migration fails, saying what to install, where Postgres lacks it. A
    /// running instance still puts the PL/pgSQL stamp back where the library stops loading
    /// (a promoted standby without it), since every write would fail otherwise.
    Extension,
}

impl Stamp {
    /// The name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Stamp::Auto => "auto",
            Stamp::Plpgsql => "plpgsql",
            Stamp::Extension => "extension",
        }
    }
}

/// See [`FeedsConfig::postgres_source`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PostgresSource {
    Auto,
    Wal,
    Notify,
    ChangesLog,
}

impl PostgresSource {
    /// The name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            PostgresSource::Auto => "auto",
            PostgresSource::Wal => "wal",
            PostgresSource::Notify => "notify",
            PostgresSource::ChangesLog => "changes_log",
        }
    }
}

impl Default for FeedsConfig {
    fn default() -> Self {
        FeedsConfig {
            postgres: true,
            postgres_source: PostgresSource::Auto,
            wal_slot: String::new(),
            wal_publication: "syncar".into(),
            relay: true,
            relay_lease: Duration::from_secs(2),
            wal_sender_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            redis: true,
            heartbeat_interval: Duration::from_millis(250),
            lease: Duration::from_secs(1),
            trust_redis_when_postgres_feed_down: false,
            unready_when_down: false,
            serve_cached_while_postgres_unreachable: false,
            changes_retention: Duration::from_secs(15 * 60),
            replay_margin: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
            min_lsn_wait: Duration::from_millis(500),
            synchronous_writes: false,
            write_consistency: WriteConsistency::Default,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL (`SYNCAR_REDIS_URL`). Never logged with its password.
    pub url: String,
    /// Prefix of every key syncar writes; one prefix per deployment sharing a Redis.
    pub key_prefix: String,
    /// File holding `url` (a mounted Secret), read at start; overrides `url`.
    pub url_file: Option<PathBuf>,
    /// With a `rediss://` URL: a PEM file of the CA certificates that sign the server's
    /// (a mounted Secret). Unset: the machine's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: a client certificate (PEM), for a server that requires one
    /// (`tls-auth-clients yes`); with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The key of `tls_cert_file` (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Deadline for one Redis command; past it the command counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Timeout for opening a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After a failure, how long reads skip Redis before trying it again.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Keys remembered for repair after Redis failed following a commit. Past it, the whole
    /// key prefix is dropped from Redis once it answers again.
    pub repair_queue_max: usize,
    /// How syncar finds Redis: `single` (the node at `url`), `sentinel` (the master that
    /// `sentinels` name `master_name`, followed through failovers; `url` then gives only the
    /// credentials and database, its host and port are not used) or `cluster` (a Redis
    /// Cluster: `url` and `nodes` are seed nodes, the rest is learnt from `CLUSTER SLOTS`;
    /// keys carry a hash tag and invalidations go over sharded pub/sub).
    pub mode: RedisMode,
    /// With `mode = "cluster"`: more seed nodes besides `url`'s, `host:port` each, tried in
    /// turn when the cluster's layout is first read.
    pub nodes: Vec<String>,
    /// With `mode = "sentinel"`: the Sentinels' addresses, `host:port` each.
    pub sentinels: Vec<String>,
    /// With `mode = "sentinel"`: the name the Sentinels monitor the master under
    /// (`sentinel monitor <master_name> ...`).
    pub master_name: String,
}

/// See [`RedisConfig::mode`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    #[default]
    Single,
    Sentinel,
    Cluster,
}

/// Cache settings for every resource; each `[[resource]]` may override the TTLs.
///
/// Read through [`CacheSection`], the section as written, so that a bad key is reported at
/// its own line.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "CacheSection")]
pub struct CacheConfig {
    /// Use the in-process cache (L1). Off: every read goes to Redis first.
    pub l1: bool,
    /// Upper bound of L1's memory, in bytes: keys, documents and 160 bytes per entry of
    /// bookkeeping (`l1::ENTRY_OVERHEAD_BYTES`, measured by `make bench-memory`).
    pub l1_max_bytes: u64,
    /// One load per key across the fleet: when Redis misses a key, the instance that claims
    /// the key's fill lease in Redis reads Postgres and fills Redis, and the others poll
    /// Redis for at most this long before they read Postgres themselves (Meta's memcache
    /// leases, "Scaling Memcache at Facebook", NSDI 2013, section 3.2.1). It is also the
    /// lease's lifetime, so an instance that dies holding it delays the others by at most
    /// this. `0s`: off, every instance that misses reads Postgres. Default 100 ms.
    pub fill_lease: Duration,
    /// The TTL keys, written in `[cache]` itself.
    pub ttl: TtlConfig,
}

/// The TTLs of a resource: `[cache]`'s, or a `[[resource]]`'s own where it sets them.
#[derive(Clone, Debug, PartialEq)]
pub struct TtlConfig {
    /// Lifetime of a document in L1.
    pub l1_ttl: Duration,
    /// Lifetime of a document in Redis.
    pub l2_ttl: Duration,
    /// Lifetime of a cached "not found", in both tiers.
    pub negative_ttl: Duration,
    /// Lifetime of a tombstone (left by a delete or an invalidation). Never jittered. Must
    /// outlive any load, so it is checked to exceed [`Config::longest_load`].
    pub tombstone_ttl: Duration,
    /// Random spread of every TTL, as a fraction (0.1: +-10%), so entries written together do
    /// not expire together.
    pub ttl_jitter: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Name in the URL: `/v1/{name}/{key}`. Lowercase letters, digits, `_` and `-`.
    pub name: String,
    /// The table holding the documents.
    pub table: String,
    /// The table's schema.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The key column: text, varchar, smallint, integer or bigint, with a unique index.
    pub key: String,
    /// The version column, added by the migration when absent.
    #[serde(default = "default_version_column")]
    pub version_column: String,
    #[serde(default, with = "humantime_serde")]
    pub l1_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub l2_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub tombstone_ttl: Option<Duration>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (`SYNCAR_LOG_FORMAT`).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `syncar=debug,info` (`SYNCAR_LOG`).
    pub level: String,
}

/// The built-in consistency auditor (after Meta's Polaris, "Cache made consistent", 2022):
/// re-checks a sample of the reads this instance answered from L1 or Redis against Postgres.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Fraction of the reads answered from L1 or Redis that are re-checked (0 to 1; 0 turns
    /// the auditor off). Each check is one select by key: at the default 0.001 the auditor
    /// costs Postgres 0.1 % of the pod's cached reads, and an idle pod nothing.
    pub sample_ratio: f64,
    /// At most this many checks a second, whatever the read rate.
    pub max_per_second: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sample_ratio: 0.001,
            max_per_second: 20,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7070".into(),
            admin_listen: None,
            listen_unix: None,
            listen_unix_mode: "0600".into(),
            max_body_bytes: 1024 * 1024,
            max_key_bytes: 512,
            max_batch_keys: 1000,
            max_watchers: 256,
            watch_buffer: 1024,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            worker_threads: 2,
            max_header_bytes: 16 * 1024,
            max_concurrent_requests: 1024,
            auth_token_file: None,
            auth_token: None,
            allow_unauthenticated_non_loopback: false,
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://syncar@127.0.0.1:5432/syncar".into(),
            schema: default_schema(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            pool_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            migrate_on_start: true,
            stamp: Stamp::Auto,
            retry_after: Duration::from_secs(1),
            listen_url: None,
            replication_url: None,
            url_file: None,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "syncar:".into(),
            url_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
            retry_interval: Duration::from_secs(1),
            repair_queue_max: 100_000,
            mode: RedisMode::Single,
            sentinels: Vec::new(),
            master_name: String::new(),
            nodes: Vec::new(),
        }
    }
}

/// The `[cache]` section as written: [`CacheConfig`]'s keys and [`TtlConfig`]'s side by side.
/// Not `#[serde(flatten)]`: serde buffers a flattened section before reading it, and toml can
/// then point only at the section's header, not at the bad key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CacheSection {
    l1: bool,
    l1_max_bytes: u64,
    #[serde(with = "humantime_serde")]
    fill_lease: Duration,
    #[serde(with = "humantime_serde")]
    l1_ttl: Duration,
    #[serde(with = "humantime_serde")]
    l2_ttl: Duration,
    #[serde(with = "humantime_serde")]
    negative_ttl: Duration,
    #[serde(with = "humantime_serde")]
    tombstone_ttl: Duration,
    ttl_jitter: f64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheConfig::default().into()
    }
}

impl From<CacheConfig> for CacheSection {
    fn from(c: CacheConfig) -> Self {
        CacheSection {
            l1: c.l1,
            l1_max_bytes: c.l1_max_bytes,
            fill_lease: c.fill_lease,
            l1_ttl: c.ttl.l1_ttl,
            l2_ttl: c.ttl.l2_ttl,
            negative_ttl: c.ttl.negative_ttl,
            tombstone_ttl: c.ttl.tombstone_ttl,
            ttl_jitter: c.ttl.ttl_jitter,
        }
    }
}

impl From<CacheSection> for CacheConfig {
    fn from(s: CacheSection) -> Self {
        CacheConfig {
            l1: s.l1,
            l1_max_bytes: s.l1_max_bytes,
            fill_lease: s.fill_lease,
            ttl: TtlConfig {
                l1_ttl: s.l1_ttl,
                l2_ttl: s.l2_ttl,
                negative_ttl: s.negative_ttl,
                tombstone_ttl: s.tombstone_ttl,
                ttl_jitter: s.ttl_jitter,
            },
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1: true,
            l1_max_bytes: 256 * 1024 * 1024,
            fill_lease: Duration::from_millis(100),
            ttl: TtlConfig::default(),
        }
    }
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig {
            l1_ttl: Duration::from_secs(30),
            l2_ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
            tombstone_ttl: Duration::from_secs(30),
            ttl_jitter: 0.1,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[allow(clippy::derivable_impls)] // spelled out so the defaults read in one place
impl Default for Config {
    fn default() -> Self {
        Config {
            instance: None,
            server: ServerConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            cache: CacheConfig::default(),
            feeds: FeedsConfig::default(),
            log: LogConfig::default(),
            audit: AuditConfig::default(),
            resources: Vec::new(),
            env_problems: Vec::new(),
        }
    }
}

fn default_schema() -> String {
    "public".into()
}

fn default_version_column() -> String {
    "version".into()
}

impl Config {
    /// The TTLs of a configured resource: its own where set, the `[cache]` ones otherwise.
    pub fn ttl_for(&self, r: &ResourceConfig) -> TtlConfig {
        let d = &self.cache.ttl;
        TtlConfig {
            l1_ttl: r.l1_ttl.unwrap_or(d.l1_ttl),
            l2_ttl: r.l2_ttl.unwrap_or(d.l2_ttl),
            negative_ttl: r.negative_ttl.unwrap_or(d.negative_ttl),
            tombstone_ttl: r.tombstone_ttl.unwrap_or(d.tombstone_ttl),
            ttl_jitter: d.ttl_jitter,
        }
    }

    /// The longest a read's load can run: it is dropped with its request at
    /// `request_timeout`, and its steps are each bounded.
    pub fn longest_load(&self) -> Duration {
        let steps =
            self.postgres.pool_timeout + self.postgres.statement_timeout + self.redis.timeout * 2;
        steps.min(self.server.request_timeout)
    }

    /// The instance name: configured, or the hostname.
    pub fn instance_name(&self) -> String {
        if let Some(name) = &self.instance {
            return name.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "syncar".into())
    }
}

/// A resource name: safe in URLs, Redis keys (no `:`) and NOTIFY payloads.
pub fn is_resource_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 63
}
