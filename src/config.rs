//! Configuration: the TOML file, environment overrides, defaults and validation. Everything is
//! checked here, and every problem reported at once, before any socket is bound. Knows nothing
//! about what the values are used for.
//!
//! `config/syncar.toml` documents every key with its default; keep the two in step.

mod model;
mod validate;

pub use model::*;

use std::path::{Path, PathBuf};

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
pub const ENV_RELAY: &str = "SYNCAR_RELAY";

/// The name of the built-in resource backed by `syncar_kv`.
pub const KV_RESOURCE: &str = "kv";

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
                Config::parse(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
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
    ///
    /// # Errors
    /// The TOML's mistake, with its line, column and the line itself.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
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
        if let Some(v) = var(ENV_RELAY) {
            match v.as_str() {
                "true" => self.feeds.relay = true,
                "false" => self.feeds.relay = false,
                _ => self.env_problems.push(format!(
                    "{ENV_RELAY}: {v:?} is neither \"true\" nor \"false\""
                )),
            }
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
            documented.cache.fill_lease,
            CacheConfig::default().fill_lease
        );
        assert_eq!(documented.audit, AuditConfig::default());
        assert_eq!(
            documented.feeds.write_default(),
            FeedsConfig::default().write_default()
        );
        assert_eq!(
            documented.redis.key_prefix,
            RedisConfig::default().key_prefix
        );
    }

    /// Asserts that the configuration `text` is refused with every one of `needles` in the
    /// error.
    fn refuses(text: &str, needles: &[&str]) {
        let err = Config::parse(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for needle in needles {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn sentinel_mode_needs_sentinels_and_a_master_name() {
        refuses(
            r#"
            [redis]
            mode = "sentinel"
            url = "rediss://h:6380"
            sentinels = ["s0:26379", "no port"]
        "#,
            &[
                "redis.sentinels: \"no port\" is not host:port",
                "redis.master_name",
            ],
        );
        let config = Config::parse(
            r#"
            [redis]
            mode = "sentinel"
            sentinels = ["s0:26379", "s1:26379"]
            master_name = "mymaster"
        "#,
        )
        .unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn cluster_mode_refuses_a_database_a_braced_prefix_and_stray_seeds() {
        refuses(
            r#"
            [redis]
            mode = "cluster"
            url = "redis://h:7000/3"
            nodes = ["h:7001", "h7002"]
            key_prefix = "app{1}:"
        "#,
            &[
                "redis.url: names a database other than 0",
                "redis.nodes: \"h7002\" is not host:port",
                "redis.key_prefix: must not contain '{' or '}'",
            ],
        );
        refuses(
            "[redis]\nnodes = [\"h:7001\"]\n",
            &["redis.nodes: is set, but redis.mode is not \"cluster\""],
        );
        let config = Config::parse(
            r#"
            [redis]
            mode = "cluster"
            url = "rediss://h:7000/0"
            nodes = ["h:7001", "h:7002"]
        "#,
        )
        .unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let text = r#"
            [server]
            listen = "not an address"
            max_key_bytes = 0
            max_batch_keys = 0
            listen_unix_mode = "rw-------"
            [audit]
            sample_ratio = 2.0
            [postgres]
            url = "postgres://u@h:notaport/db"
            [cache]
            ttl_jitter = 2.0
            tombstone_ttl = "1s"
            fill_lease = "1m"
            [redis]
            sentinels = ["nohost"]
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
        refuses(
            text,
            &[
                "server.listen",
                "server.max_key_bytes",
                "server.max_batch_keys",
                "server.listen_unix_mode",
                "audit.sample_ratio",
                "postgres.url",
                "cache.ttl_jitter",
                "cache.tombstone_ttl",
                "cache.fill_lease",
                "redis.sentinels",
                "resource[0].name",
                "resource[1].name",
                "resource[1].version_column",
            ],
        );
    }

    #[test]
    fn a_write_consistency_the_source_or_the_older_setting_contradicts_is_refused() {
        refuses(
            "[feeds]\nsynchronous_writes = true\nwrite_consistency = \"eventual\"\n",
            &["feeds.write_consistency", "older spelling"],
        );
        refuses(
            "[feeds]\npostgres_source = \"notify\"\nwrite_consistency = \"strong\"\n",
            &["feeds.write_consistency", "postgres_source = \"wal\""],
        );
        refuses(
            "[feeds]\npostgres_source = \"changes_log\"\nsynchronous_writes = true\n",
            &["feeds.synchronous_writes"],
        );
        for (text, default) in [
            ("", WriteConsistency::Default),
            (
                "[feeds]\nwrite_consistency = \"eventual\"\n",
                WriteConsistency::Eventual,
            ),
            (
                "[feeds]\nsynchronous_writes = true\n",
                WriteConsistency::Strong,
            ),
            (
                "[feeds]\nsynchronous_writes = true\nwrite_consistency = \"strong\"\n",
                WriteConsistency::Strong,
            ),
        ] {
            let config = Config::parse(text).unwrap();
            config.validate().unwrap();
            assert_eq!(config.feeds.write_default(), default, "{text}");
        }
        assert!(Config::parse("[feeds]\nwrite_consistency = \"weak\"\n").is_err());
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
    fn tls_settings_that_cannot_work_are_refused_up_front_with_their_key() {
        let mut config = Config::default();
        config.postgres.url = "postgres://u:pw@db/x?sslmode=require".into();
        config.validate().unwrap();
        config.postgres.url = "postgres://u:pw@db/x?sslmode=verify-full".into();
        config.postgres.listen_url = Some("host=db sslmode=verify-ca sslrootcert=/none.pem".into());
        config.redis.tls_ca_file = Some("/none.pem".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("postgres.url: sslmode=verify-full needs sslrootcert"),
            "{err}"
        );
        assert!(
            err.contains("postgres.listen_url: cannot read sslrootcert /none.pem"),
            "{err}"
        );
        assert!(
            err.contains("redis.tls_ca_file: is set, but redis.url is not rediss://"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
        config.postgres.url = "postgres://u:pw@db/x?sslmode=prefer".into();
        config.postgres.listen_url = None;
        config.redis.url = "rediss://cache:6379".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("redis.url: cannot read redis.tls_ca_file /none.pem"),
            "{err}"
        );
        config.redis.tls_ca_file = None;
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
        let err = Config::parse("[server]\nlisten_addr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn a_toml_mistake_is_reported_at_the_key_s_line() {
        let text = "[cache]\nl1 = true\nl1_ttl = \"5 sex\"\n[server]\nlisten = \"127.0.0.1:1\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("at line 3, column 10"), "{err}");
        assert!(err.contains("l1_ttl = \"5 sex\""), "{err}");
        let err = Config::parse("[cache]\nl1 = true\n\nttl_jitter = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at line 4"), "{err}");
        let err = Config::parse("[cache]\nl1 = true\nl1_tll = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at line 3"), "{err}");
        assert!(
            err.contains("unknown field `l1_tll`, expected one of"),
            "{err}"
        );
        let config = Config::parse("[cache]\nl1_ttl = \"5s\"\n").unwrap();
        assert_eq!(config.cache.ttl.l1_ttl, std::time::Duration::from_secs(5));
        assert_eq!(config.cache.ttl.l2_ttl, TtlConfig::default().l2_ttl);
    }

    #[test]
    fn an_inherited_ttl_mistake_is_reported_once_under_cache() {
        let text = r#"
            [cache]
            ttl_jitter = 2.0
            tombstone_ttl = "1ms"
            [[resource]]
            name = "a"
            table = "a"
            key = "id"
            [[resource]]
            name = "b"
            table = "b"
            key = "id"
            l2_ttl = "0s"
        "#;
        let err = Config::parse(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(err.matches("ttl_jitter").count(), 1, "{err}");
        assert!(err.contains("cache.ttl_jitter: must be between"), "{err}");
        assert_eq!(err.matches("tombstone_ttl").count(), 1, "{err}");
        assert!(err.contains("cache.tombstone_ttl: must exceed"), "{err}");
        // A resource's own mistake is still its own.
        assert!(
            err.contains("resource[1].l2_ttl: must be at least 1ms"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 4, "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::default();
        config.apply_env(|name| match name {
            ENV_LISTEN => Some("127.0.0.1:9999".into()),
            ENV_REDIS_URL => Some("redis://127.0.0.1:1".into()),
            ENV_INSTANCE => Some("pod-7".into()),
            ENV_RELAY => Some("false".into()),
            ENV_LOG_FORMAT => Some("yaml".into()),
            _ => None,
        });
        assert_eq!(config.server.listen, "127.0.0.1:9999");
        assert_eq!(config.redis.url, "redis://127.0.0.1:1");
        assert_eq!(config.instance_name(), "pod-7");
        assert!(!config.feeds.relay);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("SYNCAR_LOG_FORMAT"), "{err}");
    }
}
