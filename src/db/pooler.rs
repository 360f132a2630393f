//! Whether `postgres.url` leads to a pooler that lends one server session to several client
//! connections and passes their prepared statements' names through to it: PgBouncer in
//! transaction or statement pooling before 1.21, or with `max_prepared_statements = 0`.
//!
//! Behind such a pooler syncar cannot run safely, not merely slowly. The driver
//! (tokio-postgres) prepares every statement under a name of its own (`s0`, `s1`, ... per
//! process) and executes it later by that name, in a message of its own: the pooler may send
//! the execution to another server session, where the name is missing ("prepared statement
//! does not exist", a failed request) or, worse, names another client's statement (another
//! instance's `s5`, prepared from other SQL), which would then run with syncar's parameters.
//! PgBouncer 1.21 and later with `max_prepared_statements` above 0 keeps each client's
//! statements apart (it renames them on the server), as session pooling and Postgres itself
//! do. See PgBouncer's "Prepared statements" in its `pgbouncer.ini` documentation.
//!
//! [`check`] finds out before anything runs: a statement prepared on one connection, looked
//! for from a second one in `pg_prepared_statements`. Seen there under the driver's name,
//! the two connections share a session that keeps the driver's names: refused. Seen under
//! another name (`PGBOUNCER_12`), the pooler keeps statements apart: fine. Not seen: each connection has a
//! session of its own, or the pooler gave the second one another server session this time
//! (PgBouncer reuses the one freed last, so a pool that is not busy answers truly); the
//! errors a shared session gives are then classified with the same explanation
//! ([`super::classify`]).

use tokio_postgres::types::Type;

use crate::config::PostgresConfig;

use super::connect::connect_dedicated;
use super::error::{classify, DbError};

/// What to do about a pooler that passes statement names through, said wherever it shows.
pub const POOLER_HINT: &str = "postgres.url seems to lead to a pooler that lends one server \
     session to several connections and passes prepared statements' names through \
     (PgBouncer in transaction or statement pooling before 1.21, or max_prepared_statements \
     = 0): syncar's statements could run on another client's session. Point postgres.url at \
     a session pool or at Postgres, or use PgBouncer 1.21 or later with \
     max_prepared_statements above 0 (README \"Behind PgBouncer\")";

/// How many times the second connection looks for the first one's statement.
const LOOKS: usize = 3;

/// Checks that `first` (a connection to `config.url`) and the connections after it do not
/// share server sessions that keep the driver's statement names (see the module's docs).
///
/// # Errors
/// [`DbError::Unavailable`] with [`POOLER_HINT`] when they do; Postgres failing.
pub async fn check(config: &PostgresConfig, first: &tokio_postgres::Client) -> Result<(), DbError> {
    // Unique, so that nothing else's statement can be taken for it.
    let marker = format!(
        "SELECT 1 /* syncar session probe {} {} */",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    // Kept until the end: dropping it closes it.
    let _statement = first.prepare(&marker).await.map_err(classify)?;
    let (second, connection) = connect_dedicated(config, None, "syncar").await?;
    let driver = tokio::spawn(connection);
    let mut seen = None;
    for _ in 0..LOOKS {
        // Typed: one message, unnamed, so the look itself cannot be sent astray.
        let rows = second
            .query_typed(
                "SELECT name FROM pg_catalog.pg_prepared_statements \
                 WHERE statement OPERATOR(pg_catalog.=) $1::pg_catalog.text",
                &[(&marker, Type::TEXT)],
            )
            .await
            .map_err(classify)?;
        if let Some(row) = rows.first() {
            seen = Some(row.get::<_, String>(0));
            break;
        }
    }
    drop(second);
    let _ = driver.await;
    match seen {
        Some(name) if is_driver_name(&name) => Err(DbError::Unavailable(POOLER_HINT.into())),
        _ => Ok(()),
    }
}

/// Whether `name` is one tokio-postgres gives a statement (`s` and a number): a pooler that
/// keeps statements apart prepares them on the server under names of its own
/// (`PGBOUNCER_12`).
fn is_driver_name(name: &str) -> bool {
    name.strip_prefix('s')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drivers_names_are_told_from_a_poolers() {
        assert!(is_driver_name("s0"));
        assert!(is_driver_name("s1234"));
        assert!(!is_driver_name("s"));
        assert!(!is_driver_name("PGBOUNCER_3"));
        assert!(!is_driver_name("s1x"));
        assert!(!is_driver_name("stmt1"));
    }
}
