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
//! another name (`PGBOUNCER_12`), the pooler keeps statements apart: fine. Not seen: each
//! connection has a session of its own, or the pooler lent the second one another server
//! session this time (PgBouncer lends the one freed last, so a pool that is not busy
//! answers truly); the errors a shared session gives are then classified with the same
//! explanation ([`super::classify`]).

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

/// Why [`check`] did not pass.
#[derive(Debug, thiserror::Error)]
pub enum PoolerError {
    /// The second connection found the first one's statement under the driver's name.
    #[error("{POOLER_HINT}")]
    SharesStatements,
    /// The check itself failed (Postgres or the pooler failing, or too slow).
    #[error("checking for a pooler in front of postgres")]
    Check(#[source] DbError),
}

/// How many times the second connection looks for the first one's statement: on a busy
/// pool each look may be lent another server session.
const LOOKS: usize = 3;

/// Checks that `first` (a connection to `config.url`) and the connections after it do not
/// share server sessions that keep the driver's statement names (see the module's docs).
/// Each statement is bounded by `postgres.statement_timeout`, the second connection by
/// `postgres.connect_timeout` (a full pool makes clients wait).
///
/// # Errors
/// [`PoolerError::SharesStatements`] when they do; [`PoolerError::Check`] when the check
/// could not be made.
pub async fn check(
    config: &PostgresConfig,
    first: &tokio_postgres::Client,
) -> Result<(), PoolerError> {
    let limit = config.statement_timeout;
    let bounded = |e: Option<tokio_postgres::Error>| {
        PoolerError::Check(match e {
            Some(e) => classify(e),
            None => DbError::Unavailable(format!("no answer within {limit:?}")),
        })
    };
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
    let _statement = within(limit, first.prepare(&marker))
        .await
        .map_err(bounded)?;
    let (second, connection) = connect_dedicated(config, None, "syncar")
        .await
        .map_err(PoolerError::Check)?;
    let driver = tokio::spawn(connection);
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] = [(&marker, Type::TEXT)];
    let looks = async {
        for _ in 0..LOOKS {
            // Typed: one message, unnamed, so the look itself cannot be sent astray.
            let look = second.query_typed(
                "SELECT name FROM pg_catalog.pg_prepared_statements \
                 WHERE statement OPERATOR(pg_catalog.=) $1::pg_catalog.text",
                &params,
            );
            if let Some(row) = within(limit, look).await?.first() {
                return Ok(Some(row.get::<_, String>(0)));
            }
        }
        Ok(None)
    };
    let seen = looks.await;
    // The second connection ends here, whatever the looks found.
    drop(second);
    let _ = driver.await;
    let seen = seen.map_err(bounded)?;
    match seen {
        Some(name) if is_driver_name(&name) => Err(PoolerError::SharesStatements),
        _ => Ok(()),
    }
}

/// `query` bounded by `limit`: its error, or `None` when it timed out.
async fn within<T>(
    limit: std::time::Duration,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Option<tokio_postgres::Error>> {
    match tokio::time::timeout(limit, query).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
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
