//! The one-off commands (`syncar migrate`, `migrate --print-sql`, `check-config --db`,
//! `uninstall`), each on a Postgres connection of its own, and that connection's helper,
//! which the schema task shares. Starts no long-lived task.

use crate::config::Config;
use crate::db::connect_dedicated;
use crate::schema::{migrate, Migration, SchemaError};

/// Why a migration run (or a plan, a check, an uninstall) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to postgres")]
    Connect(#[source] crate::db::DbError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// `postgres.url` leads to a pooler syncar cannot run behind, or the check failed.
    #[error(transparent)]
    Pooler(#[from] crate::db::PoolerError),
}

/// Runs `syncar uninstall` once, on a connection of its own; `force` goes on although
/// connections named syncar are open (see [`crate::schema::uninstall`]).
///
/// # Errors
/// Postgres unreachable, the slot still streamed, syncar still connected (without
/// `force`), syncar's publication owned by another role, or Postgres failing.
pub async fn run_uninstall(config: &Config, force: bool) -> Result<Vec<String>, MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::uninstall(&mut client, config, force)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// Checks the configuration against the database, changing nothing: see
/// [`crate::schema::check`].
///
/// # Errors
/// Postgres unreachable or failing.
pub async fn run_check(config: &Config) -> Result<crate::schema::Check, MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::check(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// What the migration would run, changing nothing ([`crate::schema::plan`]), on a connection
/// of its own.
///
/// # Errors
/// Postgres unreachable, or the schema cannot serve the configuration.
pub async fn run_plan(config: &Config) -> Result<(Migration, crate::schema::Script), MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::plan(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// Runs the migration once, on a connection of its own.
///
/// # Errors
/// Postgres unreachable, or the schema cannot serve the configuration.
pub async fn run_migration(config: &Config) -> Result<Migration, MigrateError> {
    with_connection(config, |mut client| async move {
        migrate(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// Runs `f` on a Postgres connection of its own, then closes it.
pub(super) async fn with_connection<T, F, Fut>(config: &Config, f: F) -> Result<T, MigrateError>
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, MigrateError>>,
{
    let (client, connection) = connect_dedicated(&config.postgres, None, "syncar")
        .await
        .map_err(MigrateError::Connect)?;
    let driver = tokio::spawn(connection);
    // Before anything runs through it: not behind a pooler that would send syncar's
    // statements to other clients' sessions.
    if let Err(e) = crate::db::check_pooler(&config.postgres, &client).await {
        drop(client);
        let _ = driver.await;
        return Err(e.into());
    }
    let result = f(client).await;
    // The client was moved into `f` and dropped there, which ends the connection.
    let _ = driver.await;
    result
}
