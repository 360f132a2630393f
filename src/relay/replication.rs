//! The replication connection: which of the URL's hosts it goes to, its settings, and
//! START_REPLICATION on the slot. Knows nothing of what the stream carries.

use std::time::Duration;

use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig};
use tokio_postgres::error::SqlState;

use crate::config::Config;
use crate::resource::Catalog;
use crate::tls::PostgresTls;

use super::error::RelayError;

/// The least time between two standby status updates to Postgres (see
/// [`replication_config`]).
const STATUS_INTERVAL: Duration = Duration::from_millis(1);

/// Opens the replication connection to the host `client` reached (see [`connected_host`])
/// and starts streaming the catalog's slot, reporting its `confirmed_flush_lsn` as flushed
/// from the start (see [`confirmed_flush`]).
///
/// # Errors
/// The URL not parsing, the connection failing, Postgres refusing START_REPLICATION (the
/// slot still in use by the previous relay: [`RelayError::SlotInUse`]), or not answering
/// within `postgres.connect_timeout + feeds.lease`.
pub(super) async fn start_replication(
    client: &tokio_postgres::Client,
    config: &Config,
    catalog: &Catalog,
) -> Result<ReplicationClient, RelayError> {
    let host = connected_host(client, config).await;
    let mut settings = replication_config(config, catalog, host)?;
    if let Some(lsn) = confirmed_flush(client, &catalog.capture.slot).await? {
        settings = settings.with_ack_lsn(lsn);
    }
    let mut repl = ReplicationClient::connect(settings)
        .await
        .map_err(|source| RelayError::Replication {
            doing: "replication connect",
            source,
        })?;
    let limit = config.postgres.connect_timeout + config.feeds.lease;
    match tokio::time::timeout(limit, repl.wait_started()).await {
        Err(_) => {
            repl.abort();
            Err(RelayError::StartTimedOut)
        }
        Ok(Err(e)) if sqlstate(&e) == Some(SqlState::OBJECT_IN_USE.code()) => {
            Err(RelayError::SlotInUse(e))
        }
        Ok(Err(source)) => Err(RelayError::Replication {
            doing: "START_REPLICATION",
            source,
        }),
        Ok(Ok(())) => Ok(repl),
    }
}

/// The slot's `confirmed_flush_lsn`, which a new term reports as flushed before it confirms
/// anything itself. Without a flush position Postgres shows the walsender as `async` in
/// `pg_stat_replication` whatever `synchronous_standby_names` says, and counts it as no
/// standby yet (`pg_stat_get_wal_senders` and `SyncRepGetCandidateStandbys` in Postgres'
/// walsender.c and syncrep.c skip an invalid flush position): with it, the view says at once
/// whether Postgres waits for this relay, for the relay itself and for a strong write's
/// check. Everything up to that position was confirmed by an earlier term, so saying it
/// again releases nothing new. `None` when the slot is gone (START_REPLICATION then says so).
///
/// # Errors
/// Postgres failing.
async fn confirmed_flush(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Lsn>, RelayError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|source| RelayError::Postgres {
            doing: "reading the slot's confirmed_flush_lsn",
            source,
        })?;
    Ok(row
        .and_then(|row| row.get::<_, Option<String>>(0))
        .and_then(|text| Lsn::parse(&text).ok()))
}

/// The SQLSTATE of a server's error, as pgwire-replication (0.5) keeps it: a
/// `PgWireError::Server` carries only text, the message with the code appended as
/// ` (SQLSTATE xxxxx)` (`ErrorFields::to_error_string`), so the code is read from that
/// suffix alone, never from anywhere in the message. `None` for any other error.
fn sqlstate(e: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.strip_suffix(')')?.rsplit_once("(SQLSTATE ")?.1;
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(code)
}

/// The URL the relay connects with: `postgres.replication_url`, else `url`.
fn relay_url(config: &Config) -> &str {
    config
        .postgres
        .replication_url
        .as_deref()
        .unwrap_or(&config.postgres.url)
}

/// The host (its place in the URL's host list) `client` reached. A URL naming several hosts
/// (`postgres://u@db1,db2/app`) reaches the primary ([`crate::db::pg_config`] asks for a
/// read-write session), whichever it is since the last failover; the replication
/// connection, which takes one host, must go to the same one. Matched by the server's
/// address and port as the server sees them (`inet_server_addr()`); the first host when
/// the URL names one, or when nothing matches (a Unix socket, a proxy), with a warning.
async fn connected_host(client: &tokio_postgres::Client, config: &Config) -> usize {
    let Ok((url, _)) = PostgresTls::split(relay_url(config)) else {
        return 0;
    };
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return 0;
    };
    if pg.get_hosts().len() < 2 {
        return 0;
    }
    if let Some(i) = host_by_server_address(client, config, &pg).await {
        return i;
    }
    // Behind NAT, a Service or a proxy the server sees another address: ask each host.
    if let Some(i) = first_primary(config, &pg).await {
        return i;
    }
    tracing::warn!(
        "cannot tell which of the postgres url's hosts is the primary; streaming from the \
         first (set postgres.replication_url to the primary's address)"
    );
    0
}

/// The first of `pg`'s hosts that resolves to the address and port the server `client`
/// reached says it listens on.
async fn host_by_server_address(
    client: &tokio_postgres::Client,
    config: &Config,
    pg: &tokio_postgres::Config,
) -> Option<usize> {
    let (addr, server_port) = client
        .query_one("SELECT host(inet_server_addr()), inet_server_port()", &[])
        .await
        .ok()
        .and_then(|r| Some((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i32>>(1)?)))?;
    let addr: Option<std::net::IpAddr> = addr.parse().ok();
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let port = port_of(pg, i);
        let tokio_postgres::config::Host::Tcp(name) = host else {
            continue;
        };
        if i32::from(port) != server_port {
            continue;
        }
        let lookup = tokio::net::lookup_host((name.as_str(), port));
        let resolved: Vec<std::net::IpAddr> =
            match tokio::time::timeout(config.postgres.connect_timeout, lookup).await {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                _ => Vec::new(),
            };
        if addr.is_some_and(|a| resolved.contains(&a)) {
            return Some(i);
        }
    }
    None
}

/// The first of `pg`'s hosts that answers as a primary (`NOT pg_is_in_recovery()`), each
/// asked on a connection of its own with the URL's user, database and TLS.
async fn first_primary(config: &Config, pg: &tokio_postgres::Config) -> Option<usize> {
    let (_, tls) = PostgresTls::split(relay_url(config)).ok()?;
    let connector = tls.connector().ok()?;
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let mut one = tokio_postgres::Config::new();
        match host {
            tokio_postgres::config::Host::Tcp(h) => one.host(h),
            tokio_postgres::config::Host::Unix(p) => one.host_path(p),
        };
        one.port(port_of(pg, i))
            .connect_timeout(config.postgres.connect_timeout)
            .application_name("syncar-relay");
        if let Some(user) = pg.get_user() {
            one.user(user);
        }
        if let Some(password) = pg.get_password() {
            one.password(password);
        }
        if let Some(db) = pg.get_dbname() {
            one.dbname(db);
        }
        one.ssl_mode(pg.get_ssl_mode());
        let connect = one.connect(connector.clone());
        let Ok(Ok((client, connection))) =
            tokio::time::timeout(config.postgres.connect_timeout, connect).await
        else {
            continue;
        };
        let driver = tokio::spawn(connection);
        let primary = client
            .query_one("SELECT NOT pg_is_in_recovery()", &[])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0));
        drop(client);
        let _ = driver.await;
        if primary {
            return Some(i);
        }
    }
    None
}

/// The port of host `i` (libpq: one port for every host, or one each).
fn port_of(pg: &tokio_postgres::Config, i: usize) -> u16 {
    let ports = pg.get_ports();
    match ports.len() {
        0 => 5432,
        1 => ports[0],
        _ => ports.get(i).copied().unwrap_or(5432),
    }
}

/// The replication connection's settings, from [`relay_url`], to its host `at` (see
/// [`connected_host`]).
fn replication_config(
    config: &Config,
    catalog: &Catalog,
    at: usize,
) -> Result<ReplicationConfig, RelayError> {
    let (url, tls) = PostgresTls::split(relay_url(config)).map_err(RelayError::UrlTls)?;
    let pg: tokio_postgres::Config = url.parse().map_err(RelayError::Url)?;
    let host = match pg.get_hosts().get(at) {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => "localhost".into(),
    };
    let port = port_of(&pg, at);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_string();
    let feeds = &config.feeds;
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        catalog.capture.slot.clone(),
        catalog.capture.publication.as_str(),
    )
    .with_port(port)
    .with_tls(tls.replication())
    .with_options(format!(
        "-c wal_sender_timeout={}ms",
        feeds.wal_sender_timeout.as_millis()
    ))
    .with_application_name("syncar-relay")
    // A position is confirmed to Postgres as soon as it holds (the crate sends a raised
    // position once this long has passed since its last status): a commit that waits for
    // the relay as a synchronous standby waits for the relay's work, not for a timer.
    .with_status_interval(STATUS_INTERVAL)
    .with_wakeup_interval(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqlstate_is_read_from_the_suffix_pgwire_replication_writes() {
        let server = |text: &str| PgWireError::Server(text.to_string());
        let in_use = server("replication slot \"syncar\" is active for PID 42 (SQLSTATE 55006)");
        assert_eq!(sqlstate(&in_use), Some(SqlState::OBJECT_IN_USE.code()));
        // The code anywhere else in the text is no code.
        let quoted = server("slot \"SQLSTATE 55006\" does not exist (SQLSTATE 42704)");
        assert_eq!(sqlstate(&quoted), Some("42704"));
        assert_eq!(sqlstate(&server("SQLSTATE 55006")), None);
        assert_eq!(sqlstate(&server("error (SQLSTATE 55006) and more")), None);
        assert_eq!(sqlstate(&server("unknown server error")), None);
        assert_eq!(
            sqlstate(&PgWireError::Protocol("(SQLSTATE 55006)".into())),
            None
        );
    }
}
