//! Connections to Postgres: the driver's settings (timeouts, keepalives, the statement
//! timeout, the primary among several hosts), TLS from the URL, and connections of their own
//! outside the pool. Runs no statement itself.

use std::time::Duration;

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresConfig;
use crate::tls::{with_hint, PostgresTls};

use super::error::DbError;

/// A dedicated connection (outside the pool) and its driver, which the caller must spawn or
/// poll: notifications arrive only through the driver.
pub type Dedicated = (
    tokio_postgres::Client,
    tokio_postgres::Connection<
        tokio_postgres::Socket,
        <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
    >,
);

/// The driver configuration: timeouts, keepalives and a server-side statement timeout, so no
/// call can hang forever; and the TLS connector the URL's `sslmode` and certificates call for
/// (see [`crate::tls`]).
///
/// # Errors
/// An unparsable URL, or TLS settings that cannot be used.
pub fn pg_config(
    config: &PostgresConfig,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), DbError> {
    let (url, tls) =
        PostgresTls::split(&config.url).map_err(|e| DbError::Internal(e.to_string()))?;
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Internal(e.to_string()))?;
    pg.connect_timeout(config.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(10));
    if pg.get_application_name().is_none() {
        pg.application_name("syncar");
    }
    // Several hosts (a primary and its standbys): syncar writes, so only the primary will do,
    // whichever host it is after a failover (libpq's `target_session_attrs=read-write`).
    if pg.get_hosts().len() > 1 && pg.get_target_session_attrs() == TargetSessionAttrs::Any {
        pg.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    let ms = config.statement_timeout.as_millis();
    let options = match pg.get_options() {
        Some(existing) => format!("{existing} -c statement_timeout={ms}"),
        None => format!("-c statement_timeout={ms}"),
    };
    pg.options(&options);
    let tls = tls
        .connector()
        .map_err(|e| DbError::Internal(e.to_string()))?;
    Ok((pg, tls))
}

/// Opens a connection of its own (outside the pool) with the same settings as the pool's,
/// named `application_name` in `pg_stat_activity`; `url` overrides `config.url` (a feed's
/// `postgres.listen_url`).
///
/// # Errors
/// An unparsable URL, or the connection failing; a connect past `connect_timeout` is
/// [`DbError::Unavailable`].
pub async fn connect_dedicated(
    config: &PostgresConfig,
    url: Option<&str>,
    application_name: &str,
) -> Result<Dedicated, DbError> {
    let mut config = config.clone();
    if let Some(url) = url {
        config.url = url.to_string();
    }
    let (mut pg, tls) = pg_config(&config)?;
    pg.application_name(application_name);
    // Dedicated connections do syncar's own work only (the relay, the feeds, migrations):
    // none of their commits may wait for a synchronous standby (see
    // [`crate::db::own_bookkeeping`]).
    let options = format!(
        "{} -c synchronous_commit=local",
        pg.get_options().unwrap_or_default()
    );
    pg.options(options.trim());
    match tokio::time::timeout(config.connect_timeout, pg.connect(tls)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(DbError::Unavailable(format!(
            "connect failed: {}",
            explained(&e)
        ))),
        Err(_) => Err(DbError::Unavailable("connect timed out".into())),
    }
}

/// `e` and its causes, one line, with what to check when it is a TLS failure: a handshake
/// error says little by itself.
pub(super) fn explained(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    with_hint(out, e)
}
