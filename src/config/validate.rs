//! Validation of a loaded [`Config`]: every rule, every problem reported at once with the
//! key that has it, before any socket is bound.

use std::net::SocketAddr;
use std::time::Duration;

use super::model::is_resource_name;
use super::{
    Config, ConfigError, PostgresSource, RedisMode, WriteConsistency, ENV_AUTH_TOKEN, KV_RESOURCE,
};
use crate::tls::{redis_certificates, PostgresTls};

/// The longest `cache.fill_lease`: past it, a wait for another instance's load is no
/// cheaper than reading Postgres.
const MAX_FILL_LEASE: Duration = Duration::from_secs(10);

impl Config {
    /// Checks every rule and returns all violations, each naming its key.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with one line per problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = self.env_problems.clone();
        let mut bad = |key: &str, msg: String| problems.push(format!("{key}: {msg}"));
        self.check_server(&mut bad);
        self.check_timeouts(&mut bad);
        self.check_postgres(&mut bad);
        self.check_feeds(&mut bad);
        self.check_redis(&mut bad);
        self.check_cache(&mut bad);
        self.check_log(&mut bad);
        if !(0.0..=1.0).contains(&self.audit.sample_ratio) {
            bad(
                "audit.sample_ratio",
                format!("{} is not between 0 and 1", self.audit.sample_ratio),
            );
        }
        self.check_resources(&mut bad);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// `instance` and `[server]`: addresses, the token, limits.
    fn check_server(&self, bad: &mut impl FnMut(&str, String)) {
        if let Some(instance) = &self.instance {
            if instance.is_empty() || instance.len() > 128 {
                bad("instance", "must be 1 to 128 characters".into());
            }
        }
        if let Some(path) = &self.server.listen_unix {
            if path.is_empty() || path.len() > 100 {
                bad(
                    "server.listen_unix",
                    "must be a path of 1 to 100 bytes (a Unix socket's path is at most 107)".into(),
                );
            }
        }
        if u32::from_str_radix(&self.server.listen_unix_mode, 8).map_or(true, |m| m > 0o777) {
            bad(
                "server.listen_unix_mode",
                format!(
                    "{:?} is not an octal file mode such as \"0600\"",
                    self.server.listen_unix_mode
                ),
            );
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
        if !(1..=1_000_000).contains(&self.server.watch_buffer) {
            bad(
                "server.watch_buffer",
                "must be between 1 and 1000000".into(),
            );
        }
        if !(1..=100_000).contains(&self.server.max_batch_keys) {
            bad(
                "server.max_batch_keys",
                "must be between 1 and 100000".into(),
            );
        }
    }

    /// Every deadline must be positive.
    fn check_timeouts(&self, bad: &mut impl FnMut(&str, String)) {
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
    }

    /// `[postgres]`: connection strings, schema, pool.
    fn check_postgres(&self, bad: &mut impl FnMut(&str, String)) {
        let urls = [
            ("postgres.url", Some(&self.postgres.url)),
            ("postgres.listen_url", self.postgres.listen_url.as_ref()),
            (
                "postgres.replication_url",
                self.postgres.replication_url.as_ref(),
            ),
        ];
        for (key, url) in urls {
            let Some(url) = url else {
                continue;
            };
            match PostgresTls::split(url) {
                Err(e) => bad(key, e.to_string()),
                Ok((rest, tls)) => {
                    if let Err(e) = rest.parse::<tokio_postgres::Config>() {
                        bad(key, format!("not a Postgres connection string: {e}"));
                    }
                    if let Err(e) = tls.check_files() {
                        bad(key, e.to_string());
                    }
                }
            }
        }
        if !is_identifier(&self.postgres.schema) {
            bad("postgres.schema", "must be a plain identifier".into());
        }
        if self.postgres.pool_size == 0 {
            bad("postgres.pool_size", "must be positive".into());
        }
    }

    /// `[feeds]`: intervals, the lease, retention.
    fn check_feeds(&self, bad: &mut impl FnMut(&str, String)) {
        let f = &self.feeds;
        for (key, d) in [
            ("feeds.heartbeat_interval", f.heartbeat_interval),
            ("feeds.lease", f.lease),
            ("feeds.changes_retention", f.changes_retention),
            ("feeds.max_backoff", f.max_backoff),
            ("feeds.wal_sender_timeout", f.wal_sender_timeout),
        ] {
            if d.is_zero() {
                bad(key, "must be positive".into());
            }
        }
        if f.min_lsn_wait >= self.server.request_timeout {
            bad(
                "feeds.min_lsn_wait",
                "must be below server.request_timeout (a read waits this long, then reads \
                 Postgres)"
                    .into(),
            );
        }
        if f.synchronous_writes
            && !matches!(
                f.write_consistency,
                WriteConsistency::Default | WriteConsistency::Strong
            )
        {
            bad(
                "feeds.write_consistency",
                format!(
                    "is {:?} while feeds.synchronous_writes = true, its older spelling of \
                     \"strong\": set one of them",
                    f.write_consistency.as_str()
                ),
            );
        }
        if f.write_default() == WriteConsistency::Strong
            && !matches!(
                f.postgres_source,
                PostgresSource::Wal | PostgresSource::Auto
            )
        {
            bad(
                if f.synchronous_writes {
                    "feeds.synchronous_writes"
                } else {
                    "feeds.write_consistency"
                },
                format!(
                    "needs postgres_source = \"wal\" (the relay as a synchronous standby); \
                     {} has no acknowledgement from the instances for a commit to wait for",
                    f.postgres_source.as_str()
                ),
            );
        }
        if !f.wal_slot.is_empty() && !is_identifier(&f.wal_slot) {
            bad(
                "feeds.wal_slot",
                "must be 1 to 63 of a-z, 0-9 and '_', not starting with a digit (a slot name)"
                    .into(),
            );
        }
        if !is_identifier(&f.wal_publication) {
            bad("feeds.wal_publication", "must be a plain identifier".into());
        }
        if f.relay_lease <= f.heartbeat_interval * 2 {
            bad(
                "feeds.relay_lease",
                "must exceed two heartbeat intervals: the relay renews its claim that often".into(),
            );
        }
        if f.poll_interval.is_zero() {
            bad("feeds.poll_interval", "must be positive".into());
        }
        if matches!(
            f.postgres_source,
            PostgresSource::ChangesLog | PostgresSource::Auto
        ) && f.lease <= f.poll_interval * 2
        {
            bad(
                "feeds.lease",
                "must exceed two poll intervals with the changes_log (or auto) source".into(),
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
    }

    /// `[redis]`: URL, TLS files ([`Config::check_redis_tls`]), the topology's keys
    /// ([`Config::check_redis_topology`]) and key prefix.
    fn check_redis(&self, bad: &mut impl FnMut(&str, String)) {
        let r = &self.redis;
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(r.url.as_str()) {
            bad("redis.url", format!("not a Redis URL: {e}"));
        }
        self.check_redis_tls(bad);
        self.check_redis_topology(bad);
        if r.key_prefix.is_empty() {
            bad(
                "redis.key_prefix",
                "must not be empty (it keeps syncar's keys apart from others)".into(),
            );
        }
    }

    /// `[redis]`'s TLS files: only with `rediss://`, a client certificate with its key, and
    /// every file readable.
    fn check_redis_tls(&self, bad: &mut impl FnMut(&str, String)) {
        let r = &self.redis;
        let tls = r.url.starts_with("rediss://");
        for (key, file) in [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_cert_file", &r.tls_cert_file),
            ("redis.tls_key_file", &r.tls_key_file),
        ] {
            if file.is_some() && !tls {
                bad(
                    key,
                    "is set, but redis.url is not rediss://: the certificates would be unused"
                        .into(),
                );
            }
        }
        let client = match (&r.tls_cert_file, &r.tls_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                bad(
                    "redis.tls_cert_file",
                    "and redis.tls_key_file go together: a client certificate needs its key".into(),
                );
                None
            }
        };
        if tls {
            if let Err(e) = redis_certificates(r.tls_ca_file.as_deref(), client) {
                bad("redis.url", e.to_string());
            }
        }
    }

    /// `redis.mode` and the keys that go with it: Sentinels and the master's name, a
    /// Cluster's seed nodes, database and key prefix.
    fn check_redis_topology(&self, bad: &mut impl FnMut(&str, String)) {
        let r = &self.redis;
        match r.mode {
            RedisMode::Single | RedisMode::Cluster => {
                for (key, set) in [
                    ("redis.sentinels", !r.sentinels.is_empty()),
                    ("redis.master_name", !r.master_name.is_empty()),
                ] {
                    if set {
                        bad(key, "is set, but redis.mode is not \"sentinel\"".into());
                    }
                }
            }
            RedisMode::Sentinel => {
                if r.sentinels.is_empty() {
                    bad(
                        "redis.sentinels",
                        "must name at least one Sentinel (host:port) with mode = \"sentinel\""
                            .into(),
                    );
                }
                for s in &r.sentinels {
                    if !is_host_port(s) {
                        bad("redis.sentinels", format!("{s:?} is not host:port"));
                    }
                }
                if r.master_name.is_empty() {
                    bad(
                        "redis.master_name",
                        "must be the name the Sentinels monitor the master under".into(),
                    );
                }
            }
        }
        if r.mode == RedisMode::Cluster {
            // A Redis Cluster has one database, 0: SELECT is refused.
            if database_of(&r.url).is_some_and(|db| db != 0) {
                bad(
                    "redis.url",
                    "names a database other than 0, but a Redis Cluster has only database 0".into(),
                );
            }
            // The first `{...}` of a key is its hash tag; syncar puts its own right after
            // the prefix (see `l2`), so the prefix must not open one.
            if r.key_prefix.contains(['{', '}']) {
                bad(
                    "redis.key_prefix",
                    "must not contain '{' or '}' with mode = \"cluster\": syncar's hash tag \
                     follows the prefix, and the first {...} of a key is its hash tag"
                        .into(),
                );
            }
        } else if !r.nodes.is_empty() {
            bad(
                "redis.nodes",
                "is set, but redis.mode is not \"cluster\": seed nodes are for a Redis Cluster"
                    .into(),
            );
        }
        for n in &r.nodes {
            if !is_host_port(n) {
                bad("redis.nodes", format!("{n:?} is not host:port"));
            }
        }
    }

    /// `[cache]`: the L1 bound and the default TTLs.
    fn check_cache(&self, bad: &mut impl FnMut(&str, String)) {
        if self.cache.l1_max_bytes == 0 {
            bad("cache.l1_max_bytes", "must be positive".into());
        }
        if self.cache.fill_lease > MAX_FILL_LEASE {
            bad(
                "cache.fill_lease",
                format!(
                    "at most {}: a reader that misses may wait this long for another \
                     instance's load",
                    humantime::format_duration(MAX_FILL_LEASE)
                ),
            );
        }
        let t = &self.cache.ttl;
        let ttls = Ttls {
            l1_ttl: Some(t.l1_ttl),
            l2_ttl: Some(t.l2_ttl),
            negative_ttl: Some(t.negative_ttl),
            tombstone_ttl: Some(t.tombstone_ttl),
            ttl_jitter: Some(t.ttl_jitter),
        };
        ttls.check("cache", self.longest_load(), bad);
    }

    /// `[log]`: the filter.
    fn check_log(&self, bad: &mut impl FnMut(&str, String)) {
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
    }

    /// Every `[[resource]]`: names, identifiers, TTLs.
    fn check_resources(&self, bad: &mut impl FnMut(&str, String)) {
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
            // Only the TTLs the resource sets itself: an inherited one is `[cache]`'s, checked
            // and reported once under `cache.`, not once more per resource.
            let own = Ttls {
                l1_ttl: r.l1_ttl,
                l2_ttl: r.l2_ttl,
                negative_ttl: r.negative_ttl,
                tombstone_ttl: r.tombstone_ttl,
                ttl_jitter: None,
            };
            own.check(&at, self.longest_load(), bad);
        }
    }
}

/// The TTL keys one section sets, checked by [`Ttls::check`]: `[cache]` sets them all, a
/// `[[resource]]` only those it overrides.
struct Ttls {
    l1_ttl: Option<Duration>,
    l2_ttl: Option<Duration>,
    negative_ttl: Option<Duration>,
    tombstone_ttl: Option<Duration>,
    ttl_jitter: Option<f64>,
}

impl Ttls {
    /// Checks the TTL keys set at `at` (`None`: not set there); a tombstone must outlast the
    /// longest load (`longest_load`).
    fn check(&self, at: &str, longest_load: Duration, bad: &mut impl FnMut(&str, String)) {
        let ttl = self;
        for (key, d) in [
            ("l1_ttl", ttl.l1_ttl),
            ("l2_ttl", ttl.l2_ttl),
            ("negative_ttl", ttl.negative_ttl),
            ("tombstone_ttl", ttl.tombstone_ttl),
        ] {
            if d.is_some_and(|d| d < Duration::from_millis(1)) {
                bad(&format!("{at}.{key}"), "must be at least 1ms".into());
            }
        }
        if ttl.ttl_jitter.is_some_and(|j| !(0.0..=0.5).contains(&j)) {
            bad(
                &format!("{at}.ttl_jitter"),
                "must be between 0.0 and 0.5".into(),
            );
        }
        if ttl.tombstone_ttl.is_some_and(|t| t <= longest_load) {
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

/// Whether `s` is `host:port` (a host, a colon, a port number).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// The database number in a `redis://host:port/N` URL, if it names one.
fn database_of(url: &str) -> Option<i64> {
    let rest = url.split_once("://")?.1;
    let path = rest.split_once('/')?.1;
    let db = path.split(['?', '#']).next()?;
    if db.is_empty() {
        return None;
    }
    Some(db.parse().unwrap_or(-1))
}
