//! syncar's own rows and reads through the pool, beside the documents: the version
//! sequence, the state table, the changes log, which server answers, and tables' shapes and
//! the catalog read again. Every commit here is `local`: it never waits for a synchronous
//! standby (see [`own_bookkeeping`]). Client documents are the other rooms'.

use std::time::Duration;

use bytes::Bytes;

use crate::coherence::Message;
use crate::model::Version;
use crate::resource::{quote_ident, KeyParam, Resource};
use crate::schema::capture::STATE_TABLE;
use crate::schema::{changes_since, prune_changes, VERSION_SEQUENCE};

use super::error::{classify, CatalogError, DbError};
use super::{typed_key, versioned_doc, Db, PostgresIdentity, ResetFailed};

impl Db {
    /// `SELECT 1` through the pool, for `/readyz`.
    ///
    /// # Errors
    /// Why Postgres cannot be used.
    pub async fn ping(&self) -> Result<(), DbError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(classify)?;
        Ok(())
    }

    /// The newest logged change of every key changed within the last `ago` (see
    /// [`crate::schema::changes_since`]).
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn changes_since(&self, ago: Duration) -> Result<Vec<Message>, DbError> {
        let client = self.client().await?;
        changes_since(&**client, &self.schema, ago)
            .await
            .map_err(classify)
    }

    /// Prunes the changes log past `retention`, unless another instance is doing it; returns
    /// the rows deleted.
    ///
    /// A publication of the customer's that publishes deletes of the changes log (`FOR ALL
    /// TABLES`) makes Postgres refuse the prune, since the log has no replica identity unless
    /// the migration gave it one (`schema::capture::changes_log_identity`): said at warn
    /// level, with what to run, at most every `PRUNE_REFUSED_EVERY` (10 min).
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn prune_changes(&self, retention: Duration) -> Result<u64, DbError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let pruned = match prune_changes(&*tx, &self.schema, retention).await {
            Ok(pruned) => pruned,
            Err(e) => {
                if lacks_replica_identity(&e) {
                    self.say_prune_refused(&e);
                }
                return Err(classify(e));
            }
        };
        tx.commit().await.map_err(classify)?;
        Ok(pruned)
    }

    /// The warning of [`Db::prune_changes`] when Postgres refuses it for want of a replica
    /// identity, at most every [`PRUNE_REFUSED_EVERY`] per process.
    fn say_prune_refused(&self, e: &tokio_postgres::Error) {
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = crate::coherence::mono_ms().max(1);
        let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < PRUNE_REFUSED_EVERY.as_millis() as u64 {
            return;
        }
        LAST.store(now, std::sync::atomic::Ordering::Relaxed);
        let table = format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(crate::schema::CHANGES_TABLE)
        );
        tracing::warn!(
            error = %crate::telemetry::error_chain(e),
            "a publication publishes deletes of syncar's changes log, which has no replica \
             identity, so Postgres refuses its pruning and the log grows without end: run \
             `syncar migrate` (it gives the log REPLICA IDENTITY FULL where such a publication \
             exists), or ALTER TABLE {table} REPLICA IDENTITY FULL as its owner, or leave the \
             table out of the publication (README \"Other publications\")"
        );
    }

    /// Takes a fresh version from the sequence row of its own. `nextval` takes a
    /// transaction id whenever it logs the sequence, so its commit would wait for a
    /// synchronous standby: this is syncar's own bookkeeping, committed `local` (see
    /// [`own_bookkeeping`]) in the same round trip.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn next_version(&self) -> Result<Version, DbError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT pg_catalog.nextval({}::pg_catalog.regclass), {LOCAL_COMMIT}",
                    self.sequence_literal()
                ),
                &[],
            )
            .await
            .map_err(classify)?;
        Ok(Version(row.get(0)))
    }

    /// Which Postgres answers, and how far its version sequence is: see [`PostgresIdentity`].
    ///
    /// # Errors
    /// A classified [`DbError`] (functions this role may not run are `None`, not errors).
    pub async fn identity(&self) -> Result<PostgresIdentity, DbError> {
        let client = self.client().await?;
        let last_version: i64 = client
            .query_one(
                &format!(
                    "SELECT last_value FROM {}.{}",
                    quote_ident(&self.schema),
                    quote_ident(VERSION_SEQUENCE)
                ),
                &[],
            )
            .await
            .map_err(classify)?
            .get(0);
        // Managed services may refuse these to ordinary roles.
        let system = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get::<_, String>(0));
        let timeline = client
            .query_one(
                "SELECT ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get::<_, i32>(0));
        Ok(PostgresIdentity {
            system,
            timeline,
            last_version: Version(last_version),
        })
    }

    /// Whether the logical replication slot `slot` on this server was synchronized from a
    /// primary (`pg_replication_slots.synced`, Postgres 17 and later; see "Logical
    /// Replication Failover" in the Postgres docs): on a promoted standby, the slot that
    /// followed the relay's position. `false` when there is no such slot or the server
    /// predates failover slots.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn slot_synced(&self, slot: &str) -> Result<bool, DbError> {
        let client = self.client().await?;
        // Through jsonb: the column does not exist before Postgres 17.
        let synced: Option<bool> = client
            .query_opt(
                "SELECT (pg_catalog.to_jsonb(s) ->> 'synced')::bool FROM pg_replication_slots s \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(classify)?
            .and_then(|r| r.get(0));
        Ok(synced == Some(true))
    }

    /// Moves the version sequence to `past` if it is below: every version it hands out from
    /// now on is above `past`. Returns whether it moved.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn advance_sequence(&self, past: Version) -> Result<bool, DbError> {
        let client = self.client().await?;
        let seq = self.sequence_literal();
        let moved = client
            .query_opt(
                &format!(
                    "SELECT pg_catalog.setval({seq}::pg_catalog.regclass, $1), {LOCAL_COMMIT} FROM {}.{} WHERE last_value < $1",
                    quote_ident(&self.schema),
                    quote_ident(VERSION_SEQUENCE)
                ),
                &[&past.0],
            )
            .await
            .map_err(classify)?;
        Ok(moved.is_some())
    }

    /// Gives the row `key` a fresh version (see [`Resource::restamp_sql`]); `None` when the
    /// row is gone.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn restamp(
        &self,
        resource: &Resource,
        key: &KeyParam,
    ) -> Result<Option<(Version, Bytes)>, DbError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let row = tx
            .query_typed_opt(resource.restamp_sql().as_str(), &[typed_key(key)])
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(row.as_ref().map(versioned_doc))
    }

    /// Runs `reset` at most once per value of the state `name` across the fleet: when the
    /// state table records another value for `name`, under that row's lock, with a fresh
    /// version from the sequence; then records `value`. Nothing recorded yet (a fresh
    /// install): records `value` without `reset`. Instances that come second wait for the
    /// lock, find `value` recorded and run nothing. Returns the version `reset` ran with, if
    /// it ran, and what was recorded before (empty: nothing).
    ///
    /// # Errors
    /// A classified [`DbError`]; `reset`'s error, said, as [`DbError::Internal`] (nothing
    /// recorded, so the next attempt runs it again).
    pub async fn once_per_state<F, Fut>(
        &self,
        name: &str,
        value: &str,
        reset: F,
    ) -> Result<(Option<Version>, String), DbError>
    where
        F: FnOnce(Version) -> Fut,
        Fut: std::future::Future<Output = Result<(), ResetFailed>>,
    {
        let state = format!("{}.{STATE_TABLE}", quote_ident(&self.schema));
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        // Another instance holds the row while it resets Redis: wait a bounded time (the
        // caller retries), never a pool connection's life.
        tx.batch_execute("SET LOCAL lock_timeout = '5s'")
            .await
            .map_err(classify)?;
        tx.execute(
            &format!(
                "INSERT INTO {state} (name, value) VALUES ($1, '') ON CONFLICT (name) DO NOTHING"
            ),
            &[&name],
        )
        .await
        .map_err(classify)?;
        let before: String = tx
            .query_one(
                &format!("SELECT value FROM {state} WHERE name = $1 FOR UPDATE"),
                &[&name],
            )
            .await
            .map_err(classify)?
            .get(0);
        if before == value {
            tx.commit().await.map_err(classify)?;
            return Ok((None, before));
        }
        // Nothing recorded (a fresh install): record only.
        let version = if before.is_empty() {
            None
        } else {
            let version = Version(
                tx.query_one(
                    &format!(
                        "SELECT pg_catalog.nextval({}::pg_catalog.regclass)",
                        self.sequence_literal()
                    ),
                    &[],
                )
                .await
                .map_err(classify)?
                .get(0),
            );
            reset(version)
                .await
                .map_err(|e| DbError::Internal(e.to_string()))?;
            Some(version)
        };
        tx.execute(
            &format!("UPDATE {state} SET value = $2 WHERE name = $1"),
            &[&name, &value],
        )
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok((version, before))
    }

    /// The configured tables' live fingerprints (see [`crate::schema::shape`]), on a pooled
    /// connection.
    ///
    /// # Errors
    /// No connection, or Postgres failing.
    pub async fn table_shapes(
        &self,
        resources: &[crate::config::ResourceConfig],
    ) -> Result<crate::schema::shape::Shapes, CatalogError> {
        let client = self.client().await?;
        Ok(crate::schema::shape::fingerprints(&**client, &self.schema, resources).await?)
    }

    /// Announces each configured table whose shape changed since last announced (see
    /// [`crate::schema::shape::announce_changes`]), on a pooled connection.
    ///
    /// # Errors
    /// No connection, or Postgres failing.
    pub async fn announce_shape_changes(
        &self,
        config: &crate::config::Config,
        source: crate::config::PostgresSource,
    ) -> Result<Vec<String>, CatalogError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let announced = crate::schema::shape::announce_changes(
            &*tx,
            &config.postgres.schema,
            source,
            &config.resources,
        )
        .await?;
        tx.commit().await.map_err(classify)?;
        Ok(announced)
    }

    /// Why the C version stamp cannot run on this server, when a configured table or
    /// `syncar_kv` has it as its stamp (see [`crate::schema::broken_c_stamp`]: every write to
    /// such a table fails until the PL/pgSQL stamp replaces it); `None` otherwise. On a pooled
    /// connection, in a transaction that changes nothing.
    ///
    /// # Errors
    /// No connection, or Postgres failing.
    pub async fn broken_c_stamp(
        &self,
        config: &crate::config::Config,
    ) -> Result<Option<String>, CatalogError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        let tables: Vec<(String, String)> = config
            .resources
            .iter()
            .map(|r| (r.schema.clone(), r.table.clone()))
            .chain([(config.postgres.schema.clone(), "syncar_kv".to_string())])
            .collect();
        let broken = crate::schema::broken_c_stamp(&*tx, &tables).await?;
        tx.rollback().await.map_err(classify)?;
        Ok(broken)
    }

    /// Keeps the `wal` source's publication to the tables Postgres lets it publish (see
    /// [`crate::schema::republish`]): returns a line per change. On a pooled connection, in
    /// a transaction of syncar's own bookkeeping.
    ///
    /// # Errors
    /// No connection, or Postgres failing.
    pub async fn republish(
        &self,
        config: &crate::config::Config,
        publication: &str,
        unpublished: &[String],
    ) -> Result<Vec<String>, CatalogError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let changes = crate::schema::republish(&tx, config, publication, unpublished).await?;
        tx.commit().await.map_err(classify)?;
        Ok(changes)
    }

    /// syncar's triggers on the tables of `disarmed` enabled `ALWAYS` again (see
    /// [`crate::schema::rearm`]), in a transaction of its own on a pooled connection.
    /// Returns a line per trigger.
    ///
    /// # Errors
    /// No connection, or Postgres failing (a lock timeout included).
    pub async fn rearm(
        &self,
        config: &crate::config::Config,
        disarmed: &[String],
    ) -> Result<Vec<String>, CatalogError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let changes = crate::schema::rearm(&tx, config, disarmed).await?;
        tx.commit().await.map_err(classify)?;
        Ok(changes)
    }

    /// The catalog read again (see [`crate::schema::load_catalog`]), on a pooled connection.
    ///
    /// # Errors
    /// No connection, Postgres failing, or the schema no longer migrated.
    pub async fn load_catalog(
        &self,
        config: &crate::config::Config,
    ) -> Result<crate::resource::Catalog, CatalogError> {
        let mut client = self.client().await?;
        Ok(crate::schema::load_catalog(&mut client, config).await?)
    }
}

/// A select-list item that makes the statement's own (implicit) transaction commit without
/// waiting for a synchronous standby, as [`own_bookkeeping`] does for a transaction, in the
/// same round trip.
const LOCAL_COMMIT: &str = "set_config('synchronous_commit', 'local', true)";

/// A transaction for syncar's own bookkeeping (the state table, the changes log's pruning,
/// restamps, shape announcements) that never waits for a synchronous standby at its commit
/// (`SET LOCAL synchronous_commit = local`): with the relay named in
/// `synchronous_standby_names`, such a commit would wait for the relay's confirmation, which
/// may itself wait on this instance, or on a relay that is only starting. Writes made for a
/// client keep the session's `synchronous_commit`. See Postgres' "Synchronous Replication".
///
/// # Errors
/// A classified [`DbError`].
async fn own_bookkeeping(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, DbError> {
    let tx = client.transaction().await.map_err(classify)?;
    tx.batch_execute("SET LOCAL synchronous_commit = local")
        .await
        .map_err(classify)?;
    Ok(tx)
}

/// How often a prune refused for want of a replica identity is said at warn level.
const PRUNE_REFUSED_EVERY: Duration = Duration::from_secs(600);

/// Whether `e` is Postgres refusing a DELETE on a table that is published with deletes
/// and has no replica identity (SQLSTATE 55000, "... does not have a replica identity and
/// publishes deletes").
fn lacks_replica_identity(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
            && db.message().contains("replica identity")
    })
}
