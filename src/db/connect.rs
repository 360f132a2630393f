//! Connections to Postgres: the driver's settings (timeouts, keepalives, the statement
//! timeout, the primary among several hosts), TLS from the URL, and connections of their own
//! outside the pool. Runs no statement itself.

use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresConfig;
use crate::locks::MutexExt;
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
/// statement_timeout=…`, after the URL's own `options`), which a pooler may refuse: the
/// connections syncar opens then go without it (see [`connect_dedicated`]).
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

/// Whether the server refused the connection for its startup `options` (SQLSTATE 08P01,
/// `protocol_violation`): PgBouncer before 1.20 takes no `options` at all ("unsupported
/// startup parameter: options"), later ones (and the poolers built like them) only the
/// parameters they track ("unsupported startup parameter in options: statement_timeout").
/// Postgres itself takes any `-c` a role may set. The text is matched because the code is
/// shared with every other startup refusal (a `replication` parameter included), and
/// PgBouncer's messages are not translated.
fn refused_options(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::PROTOCOL_VIOLATION
            && names_options(db.message())
    })
}

/// Whether a startup refusal's `message` is about the `options` parameter.
fn names_options(message: &str) -> bool {
    message.starts_with("unsupported startup parameter: options")
        || message.starts_with("unsupported startup parameter in options")
}

/// The URLs (`postgres.url`, `postgres.listen_url`) whose server refused syncar's startup
/// options, for the process' life: each is asked with them once, then connected to
/// without them (a pooler does not start taking them while syncar runs; a restart asks
/// again).
static REFUSED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn refused_before(url: &str) -> bool {
    REFUSED.locked().iter().any(|u| u == url)
}

/// Notes that `url`'s server refused syncar's startup options, warning the first time.
fn note_refusal(url: &str, e: &tokio_postgres::Error) {
    let mut refused = REFUSED.locked();
    if refused.iter().any(|u| u == url) {
        return;
    }
    refused.push(url.to_string());
    tracing::warn!(
        error = %e,
        "postgres (a pooler in front of it, such as PgBouncer) refused syncar's startup \
         options; connecting without them: syncar's sessions keep the role's \
         statement_timeout (postgres.statement_timeout is not applied) and its own commits \
         outside a transaction the role's synchronous_commit. Set them for syncar's role \
         (ALTER ROLE ... SET statement_timeout = '5s'); README \"Behind PgBouncer\""
    );
}

/// Connects with `pg`, or with `plain` (the URL's own options only) where the server at
/// `url` refuses syncar's startup options ([`refused_options`]): at once when it did before,
/// else after trying. Each try is bounded by `limit`.
async fn connect_or_without_options<T>(
    pg: &tokio_postgres::Config,
    plain: &tokio_postgres::Config,
    tls: T,
    url: &str,
    limit: Duration,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, T::Stream>,
    ),
    DbError,
>
where
    T: MakeTlsConnect<tokio_postgres::Socket> + Clone,
{
    let failed = |e: Option<tokio_postgres::Error>| match e {
        Some(e) => DbError::Unavailable(format!("connect failed: {}", explained(&e))),
        None => DbError::Unavailable("connect timed out".into()),
    };
    if !refused_before(url) {
        match try_connect(pg, tls.clone(), limit).await {
            Err(Some(e)) if refused_options(&e) => note_refusal(url, &e),
            other => return other.map_err(failed),
        }
    }
    try_connect(plain, tls, limit).await.map_err(failed)
}

/// One connect, bounded by `limit`: its error, or `None` when it timed out.
async fn try_connect<T>(
    config: &tokio_postgres::Config,
    tls: T,
    limit: Duration,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, T::Stream>,
    ),
    Option<tokio_postgres::Error>,
>
where
    T: MakeTlsConnect<tokio_postgres::Socket>,
{
    match tokio::time::timeout(limit, config.connect(tls)).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

/// How the pool opens its connections: with syncar's startup options, or without them where
/// a pooler refused them (see [`connect_or_without_options`]).
pub(super) struct PoolConnect {
    tls: MakeRustlsConnect,
    plain: tokio_postgres::Config,
    url: String,
}

impl PoolConnect {
    /// For the pool of `config`.
    ///
    /// # Errors
    /// As [`pg_config`].
    pub(super) fn new(config: &PostgresConfig) -> Result<Self, DbError> {
        let (plain, tls) = plain_config(config)?;
        Ok(PoolConnect {
            tls,
            plain,
            url: config.url.clone(),
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
            // The pool's create timeout bounds both tries.
            let (client, connection) = match refused_before(&self.url) {
                true => self.plain.connect(self.tls.clone()).await?,
                false => match pg_config.connect(self.tls.clone()).await {
                    Err(e) if refused_options(&e) => {
                        note_refusal(&self.url, &e);
                        self.plain.connect(self.tls.clone()).await?
                    }
                    other => other?,
                },
            };
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
/// [`crate::db::own_bookkeeping`]). A server that refuses startup options (a pooler such as
/// PgBouncer) gets a connection without them, warned once per URL.
///
/// # Errors
/// An unparsable URL, or the connection failing; a try past `connect_timeout` (two tries
/// where the options are refused the first time) is [`DbError::Unavailable`].
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
    let (mut plain, _) = plain_config(&config)?;
    pg.application_name(application_name);
    plain.application_name(application_name);
    // Dedicated connections do syncar's own work only (the relay, the feeds, migrations):
    // none of their commits may wait for a synchronous standby.
    add_option(&mut pg, "-c synchronous_commit=local");
    connect_or_without_options(&pg, &plain, tls, &config.url, config.connect_timeout).await
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

#[cfg(test)]
mod tests {
    use super::names_options;

    #[test]
    fn only_a_refusal_of_the_options_counts() {
        // PgBouncer 1.18, and 1.20 or later (and Neon's and Supabase's poolers).
        assert!(names_options("unsupported startup parameter: options"));
        assert!(names_options(
            "unsupported startup parameter in options: statement_timeout"
        ));
        // A replication connection through PgBouncer: not about the options.
        assert!(!names_options("unsupported startup parameter: replication"));
        assert!(!names_options("invalid startup packet layout"));
    }
}
