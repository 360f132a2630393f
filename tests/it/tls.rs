//! TLS to Postgres and Redis against real servers that require it, with certificates the
//! test makes (`openssl`, Debian's): `sslmode` from `disable` to `verify-full`, client
//! certificates, the relay's replication connection, `rediss://`; and a clear error for each
//! way it can be wrong.

use std::time::Duration;

use syncar::config::PostgresSource;

use crate::support::{eventually, query_value, tls_servers, Env, TlsServers};

/// The TLS servers, started once for this binary.
fn tls() -> &'static TlsServers {
    tls_servers()
}

/// An env whose database lives on the TLS Postgres, with `params` added to its URL, and whose
/// Redis is the plain one (or the TLS one with `rediss`).
async fn env_on_tls(params: &str, rediss: bool) -> (Env, syncar::Config) {
    let env = Env::new_on_tls("localhost").await;
    let mut config = env.config();
    config.postgres.url = format!("{}?{params}", env.pg_url);
    if rediss {
        config.redis.url = format!("rediss://localhost:{}", tls().redis_port);
        config.redis.tls_ca_file = Some(tls().certs.join("ca.pem"));
    }
    (env, config)
}

/// `/readyz`'s Postgres and schema checks, as one string, once the schema task has tried.
async fn postgres_problem(config: syncar::Config) -> String {
    crate::support::init_logging();
    let app = syncar::App::start(config).await.expect("starts");
    let state = app.state().clone();
    let reason = eventually(Duration::from_secs(20), "a reason", || async {
        let reason = state.catalog().err()?.to_string();
        (reason != "not ready: connecting to postgres").then_some(reason)
    })
    .await;
    app.shutdown().await;
    reason
}

#[tokio::test]
async fn verify_full_with_the_right_ca_works_end_to_end() {
    let ca = tls().certs.join("ca.pem");
    let (env, mut config) = env_on_tls(
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        true,
    )
    .await;
    config.feeds.postgres_source = PostgresSource::Wal;
    let a = env.start_with(config.clone()).await;
    let b = env.start_with(config).await;
    let v = a.put("/v1/kv/t", "1").await.etag_version();
    b.sees("/v1/kv/t", v, Duration::from_secs(10)).await;
    // Plain SQL through the relay (replication over TLS) and Redis pub/sub over TLS.
    let v2: i64 = query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 't' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        i.sees("/v1/kv/t", v2, Duration::from_secs(10)).await;
    }
    let pg = env.pg().await;
    let encrypted: i64 = query_value(
        &pg,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.application_name LIKE 'syncar%'",
    )
    .await;
    assert!(encrypted >= 2, "syncar's connections use TLS: {encrypted}");
    let unencrypted: i64 = query_value(
        &pg,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE NOT s.ssl AND a.application_name LIKE 'syncar%'",
    )
    .await;
    assert_eq!(unencrypted, 0);
}

#[tokio::test]
async fn the_wrong_ca_or_host_name_is_a_clear_error() {
    let other = tls().certs.join("other-ca.pem");
    let (_env, config) = env_on_tls(
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
        false,
    )
    .await;
    let reason = postgres_problem(config).await;
    assert!(
        reason.contains("not signed by a CA in sslrootcert"),
        "{reason}"
    );

    // The certificate names localhost; 127.0.0.1 passes verify-ca, not verify-full.
    let ca = tls().certs.join("ca.pem");
    let (env, mut config) = env_on_tls(
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        false,
    )
    .await;
    config.postgres.url = config.postgres.url.replace("localhost", "127.0.0.1");
    let reason = postgres_problem(config.clone()).await;
    assert!(reason.contains("does not name the host"), "{reason}");
    config.postgres.url = config.postgres.url.replace("verify-full", "verify-ca");
    let a = env.start_with(config).await;
    assert_eq!(a.put("/v1/kv/ca", "1").await.status, 201);
}

#[tokio::test]
async fn a_server_that_requires_tls_refuses_sslmode_disable_clearly() {
    let (_env, config) = env_on_tls("sslmode=disable", false).await;
    let reason = postgres_problem(config).await;
    assert!(reason.contains("only over TLS"), "{reason}");
}

#[tokio::test]
async fn a_client_certificate_authenticates() {
    let certs = &tls().certs;
    let (env, mut config) = env_on_tls(
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            certs.join("ca.pem").display(),
            certs.join("client.pem").display(),
            certs.join("client.key").display()
        ),
        false,
    )
    .await;
    // pg_hba: certuser may log in only with a certificate naming it.
    env.pg()
        .await
        .batch_execute(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'certuser') \
             THEN CREATE ROLE certuser LOGIN SUPERUSER; END IF; END$$",
        )
        .await
        .unwrap();
    config.postgres.url = config.postgres.url.replace("postgres@", "certuser@");
    let a = env.start_with(config.clone()).await;
    assert_eq!(a.put("/v1/kv/c", "1").await.status, 201);
    a.shutdown().await;
    let without: Vec<&str> = vec!["sslcert", "sslkey"];
    let mut url = config.postgres.url.clone();
    for key in without {
        let start = url.find(&format!("&{key}=")).unwrap();
        let end = url[start + 1..]
            .find('&')
            .map_or(url.len(), |e| start + 1 + e);
        url.replace_range(start..end, "");
    }
    config.postgres.url = url;
    let reason = postgres_problem(config).await;
    assert!(reason.contains("certificate"), "{reason}");
}

#[tokio::test]
async fn redis_over_tls_with_the_wrong_ca_is_reported_and_reads_go_to_postgres() {
    let ca = tls().certs.join("ca.pem");
    let (env, mut config) = env_on_tls(
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        true,
    )
    .await;
    config.redis.tls_ca_file = Some(tls().certs.join("other-ca.pem"));
    // No feeds (TTLs only): readiness does not wait for Redis, which this instance cannot use.
    config.feeds.redis = false;
    config.feeds.postgres = false;
    let a = env.start_with(config).await;
    assert_eq!(a.put("/v1/kv/r", "1").await.status, 201);
    assert_eq!(a.get("/v1/kv/r").await.status, 200);
    let ready = a.readyz().await;
    let redis = ready["checks"]["redis"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(redis.contains("not signed by a CA"), "{redis}");
}
