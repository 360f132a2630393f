//! Configuration: the TOML file, environment overrides, defaults and validation. Everything is
//! checked here, and every problem reported at once, before any socket is bound. Knows nothing
//! about what the values are used for.
//!
//! `config/syncar.toml` documents every key with its default; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variables that override keys of the file.
pub const ENV_CONFIG: &str = "SYNCAR_CONFIG";
pub const ENV_LISTEN: &str = "SYNCAR_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "SYNCAR_ADMIN_LISTEN";
pub const ENV_POSTGRES_URL: &str = "SYNCAR_POSTGRES_URL";
pub const ENV_REDIS_URL: &str = "SYNCAR_REDIS_URL";
pub const ENV_INSTANCE: &str = "SYNCAR_INSTANCE";
pub const ENV_LOG_FORMAT: &str = "SYNCAR_LOG_FORMAT";
pub const ENV_LOG_LEVEL: &str = "SYNCAR_LOG";
pub const ENV_AUTH_TOKEN: &str = "SYNCAR_AUTH_TOKEN";

/// The name of the built-in resource backed by `syncar_kv`.
pub const KV_RESOURCE: &str = "kv";

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
    /// Tables served as resources, besides the built-in `kv`.
    #[serde(rename = "resource")]
    pub resources: Vec<ResourceConfig>,
    /// Environment overrides that could not be applied, reported by `validate`.
    #[serde(skip)]
    env_problems: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API (`SYNCAR_LISTEN`). Loopback by default: the app is a neighbour.
    pub listen: String,
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
    pub url: String,
    /// Schema holding syncar's own objects: the version sequence, trigger functions, `syncar_kv`.
    pub schema: String,
    /// Connections in the pool.
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
    /// `Retry-After` sent with a 503 when Postgres is unavailable.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Connection for the LISTEN feed, when it must differ from `url` (LISTEN does not work
    /// through PgBouncer in transaction mode). Default: `url`.
    pub listen_url: Option<String>,
    /// File holding `url` (a mounted Secret), read at start; overrides `url`.
    pub url_file: Option<PathBuf>,
}

/// The invalidation feeds that keep every instance's L1 coherent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedsConfig {
    /// The Postgres feed: sees every write, plain SQL included, and repairs Redis.
    pub postgres: bool,
    /// How the Postgres feed learns of changes: `changes_log` (the default: polls
    /// `syncar_changes` every `poll_interval`, no NOTIFY on the write path) or `notify`
    /// (LISTEN/NOTIFY: immediate, but every notifying commit takes a cluster-wide lock, which
    /// cost writers of cached tables about two thirds of their throughput in `make bench-hot`).
    /// Decides what the triggers do, so every instance of a deployment must agree; the
    /// migration installs the matching ones.
    pub postgres_source: PostgresSource,
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
}

/// See [`FeedsConfig::postgres_source`].
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PostgresSource {
    Notify,
    ChangesLog,
}

impl Default for FeedsConfig {
    fn default() -> Self {
        FeedsConfig {
            postgres: true,
            postgres_source: PostgresSource::ChangesLog,
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
}

/// Cache settings for every resource; each `[[resource]]` may override the TTLs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Use the in-process cache (L1). Off: every read goes to Redis first.
    pub l1: bool,
    /// Upper bound of L1's memory: keys, documents and about 512 bytes per entry of
    /// bookkeeping (`l1::ENTRY_OVERHEAD_BYTES`, measured by `make bench-memory`).
    pub l1_max_bytes: u64,
    #[serde(flatten)]
    pub ttl: TtlConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    /// Lifetime of a document in L1.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// Lifetime of a document in Redis.
    #[serde(with = "humantime_serde")]
    pub l2_ttl: Duration,
    /// Lifetime of a cached "not found", in both tiers.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Lifetime of a tombstone (left by a delete or an invalidation). Never jittered. Must
    /// outlive any load, so it is checked to exceed [`Config::longest_load`].
    #[serde(with = "humantime_serde")]
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
            max_body_bytes: 1024 * 1024,
            max_key_bytes: 512,
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
            retry_after: Duration::from_secs(1),
            listen_url: None,
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
            timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(500),
            retry_interval: Duration::from_secs(1),
            repair_queue_max: 100_000,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            l1: true,
            l1_max_bytes: 256 * 1024 * 1024,
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
    /// Loads the file (if any), applies the environment, and validates the result.
    ///
    /// `path` wins over `SYNCAR_CONFIG`; with neither, the defaults are used.
    ///
    /// # Errors
    /// Every problem found, at once.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os(ENV_CONFIG).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let mut config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.clone(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok());
        config.read_secret_files();
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; unknown keys are errors.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `*_file` settings (mounted Secrets); a file that cannot be read is a problem
    /// reported by `validate`.
    pub fn read_secret_files(&mut self) {
        let mut read = |key: &str, path: &Option<PathBuf>| -> Option<String> {
            let path = path.as_ref()?;
            match std::fs::read_to_string(path) {
                Ok(text) => Some(text.trim().to_string()),
                Err(e) => {
                    self.env_problems
                        .push(format!("{key}: cannot read {}: {e}", path.display()));
                    None
                }
            }
        };
        let pg = read("postgres.url_file", &self.postgres.url_file.clone());
        let redis = read("redis.url_file", &self.redis.url_file.clone());
        let token = read(
            "server.auth_token_file",
            &self.server.auth_token_file.clone(),
        );
        if let Some(url) = pg {
            self.postgres.url = url;
        }
        if let Some(url) = redis {
            self.redis.url = url;
        }
        if let Some(token) = token {
            self.server.auth_token = Some(Secret(token));
        }
    }

    /// Applies the `SYNCAR_*` overrides, reading variables through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(v) = var(ENV_AUTH_TOKEN) {
            self.server.auth_token = Some(Secret(v));
        }
        if let Some(v) = var(ENV_LISTEN) {
            self.server.listen = v;
        }
        if let Some(v) = var(ENV_ADMIN_LISTEN) {
            // Empty: unset, as a template that always passes the variable would have it.
            self.server.admin_listen = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = var(ENV_POSTGRES_URL) {
            self.postgres.url = v;
        }
        if let Some(v) = var(ENV_REDIS_URL) {
            self.redis.url = v;
        }
        if let Some(v) = var(ENV_INSTANCE) {
            self.instance = Some(v);
        }
        if let Some(v) = var(ENV_LOG_LEVEL) {
            self.log.level = v;
        }
        if let Some(v) = var(ENV_LOG_FORMAT) {
            match v.as_str() {
                "json" => self.log.format = LogFormat::Json,
                "text" => self.log.format = LogFormat::Text,
                _ => self.env_problems.push(format!(
                    "{ENV_LOG_FORMAT}: {v:?} is neither \"text\" nor \"json\""
                )),
            }
        }
    }

    /// Checks every rule and returns all violations, each naming its key.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with one line per problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = self.env_problems.clone();
        let mut bad = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));

        if let Some(instance) = &self.instance {
            if instance.is_empty() || instance.len() > 128 {
                bad("instance", "must be 1 to 128 characters".into());
            }
        }
        if let Some(admin) = &self.server.admin_listen {
            match admin.parse::<SocketAddr>() {
                Err(_) => bad(
                    "server.admin_listen",
                    format!("{admin:?} is not an address like 0.0.0.0:7071"),
                ),
                Ok(addr) if addr.port() != 0 && Some(addr) == self.server.listen.parse().ok() => {
                    bad(
                        "server.admin_listen",
                        "must differ from server.listen".into(),
                    )
                }
                Ok(_) => {}
            }
        }
        match self.server.listen.parse::<SocketAddr>() {
            Err(_) => bad(
                "server.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:7070",
                    self.server.listen
                ),
            ),
            Ok(addr)
                if !addr.ip().is_loopback()
                    && self.server.auth_token.is_none()
                    && !self.server.allow_unauthenticated_non_loopback =>
            {
                bad(
                    "server.listen",
                    format!(
                        "{addr} is not a loopback address: set a token ({ENV_AUTH_TOKEN} or server.auth_token_file), or server.allow_unauthenticated_non_loopback = true"
                    ),
                )
            }
            Ok(_) => {}
        }
        if self
            .server
            .auth_token
            .as_ref()
            .is_some_and(|t| t.0.len() < 16)
        {
            bad("server.auth_token", "must be at least 16 characters".into());
        }
        if self.server.max_header_bytes < 8192 {
            bad("server.max_header_bytes", "must be at least 8192".into());
        }
        if self.server.max_concurrent_requests == 0 {
            bad("server.max_concurrent_requests", "must be positive".into());
        }
        if self.server.max_body_bytes == 0 {
            bad("server.max_body_bytes", "must be positive".into());
        }
        if !(1..=4096).contains(&self.server.max_key_bytes) {
            bad(
                "server.max_key_bytes",
                "must be between 1 and 4096 (keys travel in NOTIFY payloads, limited to 8000 bytes)"
                    .into(),
            );
        }
        for (key, d) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.request_timeout", self.server.request_timeout),
            ("postgres.connect_timeout", self.postgres.connect_timeout),
            ("postgres.pool_timeout", self.postgres.pool_timeout),
            (
                "postgres.statement_timeout",
                self.postgres.statement_timeout,
            ),
            ("redis.timeout", self.redis.timeout),
            ("redis.connect_timeout", self.redis.connect_timeout),
            ("redis.retry_interval", self.redis.retry_interval),
        ] {
            if d.is_zero() {
                bad(key, "must be positive".into());
            }
        }
        let no_tls = "sslmode=require, but syncar is built without TLS: use sslmode=disable (or \
                      prefer) over a private network or a mesh that adds TLS";
        match self.postgres.url.parse::<tokio_postgres::Config>() {
            Err(e) => bad(
                "postgres.url",
                format!("not a Postgres connection string: {e}"),
            ),
            Ok(pg) if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require => {
                bad("postgres.url", no_tls.into())
            }
            Ok(_) => {}
        }
        if let Some(Ok(pg)) = self
            .postgres
            .listen_url
            .as_ref()
            .map(|u| u.parse::<tokio_postgres::Config>())
        {
            if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                bad("postgres.listen_url", no_tls.into());
            }
        }
        if let Some(Err(e)) = self
            .postgres
            .listen_url
            .as_ref()
            .map(|u| u.parse::<tokio_postgres::Config>())
        {
            bad(
                "postgres.listen_url",
                format!("not a Postgres connection string: {e}"),
            );
        }
        let f = &self.feeds;
        for (key, d) in [
            ("feeds.heartbeat_interval", f.heartbeat_interval),
            ("feeds.lease", f.lease),
            ("feeds.changes_retention", f.changes_retention),
            ("feeds.max_backoff", f.max_backoff),
        ] {
            if d.is_zero() {
                bad(key, "must be positive".into());
            }
        }
        if f.poll_interval.is_zero() {
            bad("feeds.poll_interval", "must be positive".into());
        }
        if f.postgres_source == PostgresSource::ChangesLog && f.lease <= f.poll_interval * 2 {
            bad(
                "feeds.lease",
                "must exceed two poll intervals with the changes_log source".into(),
            );
        }
        if f.lease <= f.heartbeat_interval * 2 {
            bad(
                "feeds.lease",
                "must exceed two heartbeat intervals, or one late heartbeat marks a feed down"
                    .into(),
            );
        }
        let longest_l2 = self
            .resources
            .iter()
            .map(|r| self.ttl_for(r).l2_ttl)
            .chain(std::iter::once(self.cache.ttl.l2_ttl))
            .max()
            .unwrap_or_default();
        if f.postgres && f.changes_retention < longest_l2 {
            bad(
                "feeds.changes_retention",
                format!(
                    "must be at least the longest l2_ttl ({}): at start-up the retained log is what repairs Redis entries written while no instance listened",
                    humantime::format_duration(longest_l2)
                ),
            );
        }
        if f.changes_retention <= f.replay_margin {
            bad(
                "feeds.changes_retention",
                "must exceed feeds.replay_margin".into(),
            );
        }
        if !is_identifier(&self.postgres.schema) {
            bad("postgres.schema", "must be a plain identifier".into());
        }
        if self.postgres.pool_size == 0 {
            bad("postgres.pool_size", "must be positive".into());
        }
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(self.redis.url.as_str()) {
            bad("redis.url", format!("not a Redis URL: {e}"));
        }
        if self.redis.key_prefix.is_empty() {
            bad(
                "redis.key_prefix",
                "must not be empty (it keeps syncar's keys apart from others)".into(),
            );
        }
        if self.cache.l1_max_bytes == 0 {
            bad("cache.l1_max_bytes", "must be positive".into());
        }
        self.check_ttls("cache", &self.cache.ttl, &mut bad);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }

        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.resources.iter().enumerate() {
            let at = format!("resource[{i}]");
            if !is_resource_name(&r.name) {
                bad(
                    &format!("{at}.name"),
                    format!(
                        "{:?} must be 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter or digit",
                        r.name
                    ),
                );
            } else if r.name == KV_RESOURCE {
                bad(
                    &format!("{at}.name"),
                    "\"kv\" is the built-in resource".into(),
                );
            } else if !seen.insert(r.name.as_str()) {
                bad(
                    &format!("{at}.name"),
                    format!("{:?} is configured twice", r.name),
                );
            }
            for (field, value) in [
                ("table", &r.table),
                ("schema", &r.schema),
                ("key", &r.key),
                ("version_column", &r.version_column),
            ] {
                if value.is_empty() || value.len() > 63 || value.contains('\u{0}') {
                    bad(
                        &format!("{at}.{field}"),
                        "must be a Postgres identifier of 1 to 63 bytes".into(),
                    );
                }
            }
            if r.key == r.version_column {
                bad(
                    &format!("{at}.version_column"),
                    "must differ from the key column".into(),
                );
            }
            let ttl = self.ttl_for(r);
            self.check_ttls(&at, &ttl, &mut bad);
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

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

    fn check_ttls(&self, at: &str, ttl: &TtlConfig, bad: &mut impl FnMut(&str, String)) {
        for (key, d) in [
            ("l1_ttl", ttl.l1_ttl),
            ("l2_ttl", ttl.l2_ttl),
            ("negative_ttl", ttl.negative_ttl),
            ("tombstone_ttl", ttl.tombstone_ttl),
        ] {
            if d < Duration::from_millis(1) {
                bad(&format!("{at}.{key}"), "must be at least 1ms".into());
            }
        }
        if !(0.0..=0.5).contains(&ttl.ttl_jitter) {
            bad(
                &format!("{at}.ttl_jitter"),
                "must be between 0.0 and 0.5".into(),
            );
        }
        let longest_load = self.longest_load();
        if ttl.tombstone_ttl <= longest_load {
            bad(
                &format!("{at}.tombstone_ttl"),
                format!(
                    "must exceed the longest a load can take ({}: the smaller of server.request_timeout and postgres.pool_timeout + postgres.statement_timeout + 2 x redis.timeout), or a slow load could land after its tombstone expired",
                    humantime::format_duration(longest_load)
                ),
            );
        }
    }
}

/// A plain lowercase SQL identifier (used for syncar's own schema name).
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// A resource name: safe in URLs, Redis keys (no `:`) and NOTIFY payloads.
pub fn is_resource_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_file() {
        Config::default().validate().unwrap();
        let text = include_str!("../config/syncar.toml");
        let documented = Config::parse(text).expect("config/syncar.toml parses");
        documented.validate().unwrap();
        assert_eq!(documented.server.listen, ServerConfig::default().listen);
        assert_eq!(documented.cache.ttl, TtlConfig::default());
        assert_eq!(
            documented.redis.key_prefix,
            RedisConfig::default().key_prefix
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let text = r#"
            [server]
            listen = "not an address"
            max_key_bytes = 0
            [postgres]
            url = "postgres://u@h:notaport/db"
            [cache]
            ttl_jitter = 2.0
            tombstone_ttl = "1s"
            [[resource]]
            name = "Bad Name"
            table = "t"
            key = "id"
            [[resource]]
            name = "kv"
            table = "t"
            key = "v"
            version_column = "v"
        "#;
        let config = Config::parse(text).unwrap();
        let err = config.validate().unwrap_err().to_string();
        for needle in [
            "server.listen",
            "server.max_key_bytes",
            "postgres.url",
            "cache.ttl_jitter",
            "cache.tombstone_ttl",
            "resource[0].name",
            "resource[1].name",
            "resource[1].version_column",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn a_non_loopback_listener_needs_a_token_or_an_explicit_override() {
        let mut config = Config::default();
        config.server.listen = "0.0.0.0:7070".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        config.apply_env(|name| (name == ENV_AUTH_TOKEN).then(|| "0123456789abcdef".into()));
        config.validate().unwrap();
        assert_eq!(format!("{:?}", config.server.auth_token), "Some(***)");
        let mut open = Config::default();
        open.server.listen = "0.0.0.0:7070".into();
        open.server.allow_unauthenticated_non_loopback = true;
        open.validate().unwrap();
    }

    #[test]
    fn a_tls_only_postgres_url_is_refused_up_front() {
        let mut config = Config::default();
        config.postgres.url = "postgres://u:pw@db/x?sslmode=require".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("postgres.url: sslmode=require"), "{err}");
        assert!(!err.contains("pw"), "{err}");
        config.postgres.url = "postgres://u:pw@db/x?sslmode=prefer".into();
        config.validate().unwrap();
    }

    #[test]
    fn the_admin_listener_needs_no_token_but_its_own_address() {
        let mut config = Config::default();
        config.apply_env(|name| (name == ENV_ADMIN_LISTEN).then(|| "0.0.0.0:7071".into()));
        config.validate().unwrap();
        config.server.admin_listen = Some("127.0.0.1:7070".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.admin_listen: must differ"), "{err}");
        config.server.admin_listen = Some("everywhere".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.admin_listen"), "{err}");
    }

    #[test]
    fn secrets_are_read_from_files() {
        let dir = std::env::temp_dir().join(format!("syncar-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pg"), "postgres://u:pw@db/x\n").unwrap();
        std::fs::write(dir.join("token"), "  a-token-of-sixteen+  \n").unwrap();
        let mut config = Config::default();
        config.postgres.url_file = Some(dir.join("pg"));
        config.server.auth_token_file = Some(dir.join("token"));
        config.redis.url_file = Some(dir.join("missing"));
        config.read_secret_files();
        assert_eq!(config.postgres.url, "postgres://u:pw@db/x");
        assert_eq!(
            config.server.auth_token,
            Some(Secret("a-token-of-sixteen+".into()))
        );
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("redis.url_file"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[server]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::default();
        config.apply_env(|name| match name {
            ENV_LISTEN => Some("127.0.0.1:9999".into()),
            ENV_REDIS_URL => Some("redis://127.0.0.1:1".into()),
            ENV_INSTANCE => Some("pod-7".into()),
            ENV_LOG_FORMAT => Some("yaml".into()),
            _ => None,
        });
        assert_eq!(config.server.listen, "127.0.0.1:9999");
        assert_eq!(config.redis.url, "redis://127.0.0.1:1");
        assert_eq!(config.instance_name(), "pod-7");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("SYNCAR_LOG_FORMAT"), "{err}");
    }
}
