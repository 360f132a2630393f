//! One elected term, in order: the plain Postgres connection, the start-up checks, the
//! slot and its epoch, the guards against tiers that went back in time, START_REPLICATION,
//! then the stream until shutdown or a failure. Knows nothing of the election.

use crate::config::PostgresSource;
use crate::db::connect_dedicated;
use crate::resource::Catalog;
use crate::schema::capture::recorded_source;
use tokio_util::sync::CancellationToken;

use super::context::RelayContext;
use super::error::RelayError;
use super::replication::start_replication;
use super::slot;
use super::sql::Sql;
use super::stream::Stream;

/// One elected term: make sure of the slot and of what Redis holds, then stream until
/// shutdown (`Ok`) or a failure.
///
/// # Errors
/// Why the term ended: a start-up check failing, Postgres or Redis failing, the lease
/// lost, the slot in use, invalidated or gone.
pub(super) async fn serve(
    ctx: &RelayContext,
    catalog: &Catalog,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let postgres = &ctx.config.postgres;
    let (client, connection) = connect_dedicated(
        postgres,
        postgres.replication_url.as_deref(),
        "syncar-relay",
    )
    .await
    .map_err(RelayError::Connect)?;
    let _driver = AbortOnDrop(tokio::spawn(connection));
    let sql = Sql::new(&postgres.schema);
    let epoch = prepare(ctx, catalog, &client, &sql).await?;
    let repl = start_replication(&client, &ctx.config, catalog).await?;
    let mut stream = Stream::open(ctx, catalog, client, sql, repl, epoch).await?;
    let result = stream.run(shutdown).await;
    stream.end(result).await
}

/// Everything before the stream: the recorded source, the slot and its epoch, the tiers
/// secured, failover's guard recorded, the generations loaded, Redis brought to the slot.
/// Returns the slot's epoch.
async fn prepare(
    ctx: &RelayContext,
    catalog: &Catalog,
    client: &tokio_postgres::Client,
    sql: &Sql,
) -> Result<i64, RelayError> {
    let schema = &ctx.config.postgres.schema;
    let slot = &catalog.capture.slot;
    check_source(client, schema).await?;
    slot::ensure(client, schema, slot).await?;
    let gaps = slot::failover_gaps_logged(client, slot).await;
    slot::retention_gap_logged(client, slot).await;
    let epoch = slot::epoch(client, schema).await?;
    secure_tiers(ctx, catalog).await?;
    slot::record_failover_guarded(ctx, client, &gaps).await;
    // The tombstones below go under each resource's current generation, which this process
    // may never have read (`syncar relay` runs no feed).
    ctx.redis
        .load_generations()
        .await
        .map_err(|source| RelayError::Redis {
            doing: "reading generations",
            source,
        })?;
    slot::feed_redis_from(ctx, catalog, client, sql, epoch).await?;
    Ok(epoch)
}

/// Another instance may have migrated the schema to another source (or `syncar
/// uninstall` run): a slot created now would retain WAL for nobody.
async fn check_source(client: &tokio_postgres::Client, schema: &str) -> Result<(), RelayError> {
    let source = recorded_source(client, schema).await?;
    if source.as_deref() != Some(PostgresSource::Wal.as_str()) {
        return Err(RelayError::NotWal(source));
    }
    Ok(())
}

/// Never stream into a Redis incarnation that may hold older data than it should, nor
/// from a Postgres that went back in time unnoticed.
async fn secure_tiers(ctx: &RelayContext, catalog: &Catalog) -> Result<(), RelayError> {
    ctx.guards
        .secure_redis(catalog)
        .await
        .map_err(|e| RelayError::SecureRedis(e.into()))?;
    ctx.guards
        .secure_postgres()
        .await
        .map_err(|e| RelayError::SecurePostgres(e.into()))?;
    Ok(())
}

/// Aborts a spawned task (a connection driver) when the term ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
