//! Connections to Postgres: the driver's settings (timeouts, keepalives, the statement
//! timeout, the primary among several hosts), TLS from the URL, and connections of their own
//! outside the pool. Runs no statement itself.

use std::sync::atomic::{AtomicBool, Ordering};
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
/// (see [`crate::tls`]). The statement timeout travels as a startup option (`-c
/// statement_timeout=…`, after the URL's own `options`); [`without_own_options`] gives the
/// same configuration without it, for a pooler that refuses it (see [`refused_options`]).
///
/// # Errors
/// An unparsable URL, or TLS settings that cannot be used.
pub fn pg_config(
    config: &PostgresConfig,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), DbError> {
    let (mut pg, tls) = plain_config(config)?;
    let ms = config.statement_timeout.as_millis();
    add_option(&mut pg, &format!("-c statement_timeout={ms}"));
    Ok((pg, tls))
}

/// [`pg_config`] without the startup options syncar adds: the URL's own `options` only.
///
/// # Errors
/// As [`pg_config`].
fn without_own_options(
    config: &PostgresConfig,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), DbError> {
    plain_config(config)
}

fn plain_config(
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
    let tls = tls
        .connector()
        .map_err(|e| DbError::Internal(e.to_string()))?;
    Ok((pg, tls))
}

/// Appends `option` (`-c name=value`) to the configuration's startup `options`.
fn add_option(pg: &mut tokio_postgres::Config, option: &str) {
    let options = match pg.get_options() {
        Some(existing) => format!("{existing} {option}"),
        None => option.to_string(),
    };
    pg.options(options.trim());
}

/// Whether the server refused the connection for its startup `options`: PgBouncer before
/// 1.20 takes no `options` at all ("unsupported startup parameter: options"), later ones
/// only the parameters it tracks ("unsupported options startup parameter: …"), both with
/// SQLSTATE 08P01 (`protocol_violation`). Postgres itself takes any `-c` a role may set.
pub(super) fn refused_options(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::PROTOCOL_VIOLATION
            && db.message().contains("startup parameter")
    })
}

/// Says once per process that syncar's sessions run without the settings it sends at
/// startup, and what to do instead.
fn warn_options_refused(e: &tokio_postgres::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            error = %e,
            "postgres (a pooler in front of it, such as PgBouncer) refused syncar's startup \
             options; connecting without them: syncar's sessions keep the role's \
             statement_timeout (postgres.statement_timeout is not applied) and its own \
             commits outside a transaction the role's synchronous_commit. Set them for \
             syncar's role (ALTER ROLE ... SET statement_timeout = '5s'), or let PgBouncer \
             pass them (track_extra_parameters = statement_timeout, synchronous_commit)"
        );
    });
}

/// Connects with `pg`; when a pooler refuses its startup options ([`refused_options`]),
/// once more with `plain` (the URL's own options only), warning once. `refused` remembers
/// the answer, so a pool tries its options once, not on every connection.
async fn connect_or_without_options<T>(
    pg: &tokio_postgres::Config,
    plain: &tokio_postgres::Config,
    tls: T,
    refused: &AtomicBool,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, T::Stream>,
    ),
    tokio_postgres::Error,
>
where
    T: MakeTlsConnect<tokio_postgres::Socket> + Clone,
{
    if !refused.load(Ordering::Relaxed) {
        match pg.connect(tls.clone()).await {
            Err(e) if refused_options(&e) => {
                warn_options_refused(&e);
                refused.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    plain.connect(tls).await
}

/// How the pool opens its connections: with syncar's startup options, or without them once a
/// pooler refused them (see [`connect_or_without_options`]).
pub(super) struct PoolConnect {
    pub(super) tls: MakeRustlsConnect,
    pub(super) plain: tokio_postgres::Config,
    pub(super) refused: AtomicBool,
}

impl PoolConnect {
    /// For the pool of `config`.
    ///
    /// # Errors
    /// As [`pg_config`].
    pub(super) fn new(config: &PostgresConfig) -> Result<Self, DbError> {
        let (plain, tls) = without_own_options(config)?;
        Ok(PoolConnect {
            tls,
            plain,
            refused: AtomicBool::new(false),
        })
    }
}

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = connect_or_without_options(
                &pg_config,
                &self.plain,
                self.tls.clone(),
                &self.refused,
            )
            .await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(target: "deadpool.postgres", "Connection error: {}", e);
                }
            });
            Ok((client, task))
        })
    }
}

/// Opens a connection of its own (outside the pool) with the same settings as the pool's,
/// named `application_name` in `pg_stat_activity`; `url` overrides `config.url` (a feed's
/// `postgres.listen_url`). Its commits never wait for a synchronous standby
/// (`synchronous_commit=local` among its startup options; see
/// [`crate::db::own_bookkeeping`]); a pooler that refuses startup options gets a connection
/// without them ([`refused_options`], warned once).
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
    let (mut plain, _) = without_own_options(&config)?;
    pg.application_name(application_name);
    plain.application_name(application_name);
    // Dedicated connections do syncar's own work only (the relay, the feeds, migrations):
    // none of their commits may wait for a synchronous standby.
    add_option(&mut pg, "-c synchronous_commit=local");
    // One connection: ask with the options each time (the pool remembers instead).
    let refused = AtomicBool::new(false);
    let connect = connect_or_without_options(&pg, &plain, tls, &refused);
    match tokio::time::timeout(config.connect_timeout, connect).await {
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
