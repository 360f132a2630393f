//! Postgres as the source of truth: the pool, document reads and writes, and the one place
//! Postgres errors are classified. Knows nothing about caches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::coherence::Message;
use crate::config::PostgresConfig;
use crate::model::Version;
use crate::resource::{quote_literal, KeyParam, Param, Precondition, Resource, Shape, WriteSql};
use crate::schema::capture::STATE_TABLE;
use crate::schema::{changes_since, prune_changes, VERSION_SEQUENCE};
use crate::tls::{with_hint, PostgresTls};

/// A dedicated connection (outside the pool) and its driver, which the caller must spawn or
/// poll: notifications arrive only through the driver.
pub type Dedicated = (
    tokio_postgres::Client,
    tokio_postgres::Connection<
        tokio_postgres::Socket,
        <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
    >,
);

/// A failed Postgres call, classified for the client. Cloneable, so one load's error can be
/// shared by every reader waiting on it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres cannot be reached or is overloaded: retry later (503).
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// The document does not fit the table: wrong type, constraint, bad value (422).
    #[error("{0}")]
    Rejected(String),
    /// Another row already holds a unique value this document has (409).
    #[error("{0}")]
    Conflict(String),
    /// The table changed under the resource: a column or the table named by syncar's SQL is
    /// gone, or a type no longer fits (503 after one retry on the catalog read again).
    #[error("the table changed under syncar: {0}")]
    SchemaChanged(String),
    /// The body names a field that is no column of the table as the catalog knows it (422
    /// after one retry on the catalog read again: the column may be new).
    #[error("{0}")]
    UnknownColumn(String),
    /// A write asked to wait for every instance, and the relay is not a synchronous
    /// standby (see [`relay_waited_for`]); rolled back (503 `not_synchronous`).
    #[error("{0}")]
    NotSynchronous(String),
    /// Anything else: a bug (500).
    #[error("postgres error: {0}")]
    Internal(String),
}

impl DbError {
    /// Whether the failure may come from a table that changed since the catalog was read:
    /// worth one retry once the catalog has been read again.
    pub fn may_be_schema_change(&self) -> bool {
        matches!(self, DbError::SchemaChanged(_) | DbError::UnknownColumn(_))
    }
}

impl From<crate::resource::BodyError> for DbError {
    fn from(e: crate::resource::BodyError) -> Self {
        match e {
            crate::resource::BodyError::NotAColumn(..) => DbError::UnknownColumn(e.to_string()),
            crate::resource::BodyError::Invalid(m) => DbError::Rejected(m),
        }
    }
}

/// A committed write.
#[derive(Clone, Debug)]
pub struct Written {
    pub version: Version,
    /// The document as Postgres stores and renders it.
    pub doc: Bytes,
    pub created: bool,
}

#[derive(Clone, Debug)]
pub enum WriteOutcome {
    Written(Written),
    PreconditionFailed,
}

#[derive(Clone, Debug)]
pub enum DeleteOutcome {
    /// Deleted; `version` is the fresh version the delete took (its tombstone's).
    Deleted {
        version: Version,
    },
    NotFound,
    PreconditionFailed,
}

/// Which Postgres answers and how far its sequence is. A different `system` is another
/// cluster (a dump restored elsewhere, a new instance); a different `timeline` is a
/// point-in-time recovery or a promoted replica (Postgres docs, "Timelines"); a
/// `last_version` below a version already seen is a sequence that went back. Each can mean
/// that commits syncar acknowledged, or cached, are gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresIdentity {
    /// `pg_control_system().system_identifier`; `None` where this role may not read it.
    pub system: Option<String>,
    /// The timeline of the WAL Postgres writes now (the first 8 hex digits of
    /// `pg_walfile_name(pg_current_wal_lsn())`): it moves at once when a standby is promoted,
    /// where `pg_control_checkpoint()` follows only at the next checkpoint. `None` where it
    /// cannot be read.
    pub timeline: Option<i32>,
    /// The version sequence's `last_value`.
    pub last_version: Version,
}

/// `(version, document)` of a row selected as `version, document, ...`.
fn versioned_doc(row: &tokio_postgres::Row) -> (Version, Bytes) {
    let doc: String = row.get(1);
    (Version(row.get(0)), Bytes::from(doc))
}

/// What a write's `RETURNING version, document, created` says.
fn written(row: &tokio_postgres::Row) -> Written {
    let (version, doc) = versioned_doc(row);
    Written {
        version,
        doc,
        created: row.get(2),
    }
}

/// The versions `If-Match` names (none, unused, without one).
fn if_versions(pre: &Precondition) -> &[i64] {
    match pre {
        Precondition::Versions(v) => v,
        _ => &[],
    }
}

/// A write's bind parameters, in the order its SQL takes them.
fn write_params<'a>(
    write: &WriteSql,
    key: &'a KeyParam,
    doc: &'a String,
    versions: &'a &[i64],
) -> Vec<&'a (dyn ToSql + Sync)> {
    write
        .params
        .iter()
        .map(|p| match p {
            Param::Key => key_param(key),
            Param::Doc => doc as &(dyn ToSql + Sync),
            Param::Versions => versions as &(dyn ToSql + Sync),
        })
        .collect()
}

/// Reads retried on a connection of their own at once, at most (see [`Db::get`]).
const READ_RETRIES: usize = 4;

/// One read of `resource`'s document `key`, on `client`.
async fn get_on(
    client: &deadpool_postgres::ClientWrapper,
    resource: &Resource,
    key: &KeyParam,
) -> Result<Option<(Version, Bytes)>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(resource.get_sql()).await?;
    let row = client.query_opt(&stmt, &[key_param(key)]).await?;
    Ok(row.as_ref().map(versioned_doc))
}

/// Whether `e` says the connection itself is gone (closed, reset, the backend terminated or
/// shutting down), as opposed to the statement failing.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now; 08xxx
        // connection exceptions.
        Some(db) => {
            let code = db.code().code();
            matches!(code, "57P01" | "57P02" | "57P03") || code.starts_with("08")
        }
        // No server error at all: the socket failed.
        None => true,
    }
}

/// One operation of a transaction ([`Db::transact`]).
pub struct TxItem<'a> {
    pub resource: &'a Resource,
    pub key: &'a KeyParam,
    pub op: &'a TxOp,
}

/// What an operation does.
#[derive(Clone, Debug)]
pub enum TxOp {
    Put {
        body: crate::model::JsonText,
        pre: Precondition,
    },
    Delete {
        pre: Precondition,
    },
}

/// What an operation of a committed transaction did.
#[derive(Clone, Debug)]
pub enum TxDone {
    Written(Written),
    Deleted {
        version: Version,
    },
    /// A delete of an absent key, without a precondition.
    NotFound,
}

/// Why a transaction was rolled back.
#[derive(Clone, Debug)]
pub struct TxFailed {
    /// The operation that failed; `None` for the connection or the commit.
    pub index: Option<usize>,
    pub why: TxWhy,
}

#[derive(Clone, Debug)]
pub enum TxWhy {
    /// Its `If-Match` / `If-None-Match` did not hold.
    Precondition,
    Db(DbError),
}

/// The pooled connection to Postgres.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    schema: String,
    /// For a connection of its own (a read retried after its connection died).
    config: Arc<PostgresConfig>,
    /// Reads retried on a connection of their own at once, at most.
    retries: Arc<tokio::sync::Semaphore>,
}

impl Db {
    /// Builds the pool; connections open lazily, so Postgres may still be down.
    ///
    /// # Errors
    /// Only an unusable URL, which config validation already rules out.
    pub fn new(config: &PostgresConfig) -> Result<Self, DbError> {
        let (pg, tls) = pg_config(config)?;
        let manager = Manager::from_config(
            pg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.pool_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| DbError::Internal(e.to_string()))?;
        Ok(Db {
            pool,
            schema: config.schema.clone(),
            config: Arc::new(config.clone()),
            retries: Arc::new(tokio::sync::Semaphore::new(READ_RETRIES)),
        })
    }

    /// Reads one document: its version and canonical JSON, or `None` when absent.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn get(
        &self,
        resource: &Resource,
        key: &KeyParam,
    ) -> Result<Option<(Version, Bytes)>, DbError> {
        let client = self.client().await?;
        match get_on(&client, resource, key).await {
            // The backend died under the read (terminated, restarted, failed over): a read is
            // idempotent, so it is tried once more, on a connection opened for it (the pool's
            // others may have died with this one and not know it yet). Writes never are.
            // At most a few at once, outside the pool: a failover must not turn every read
            // in flight into a connection of its own.
            Err(e) if connection_lost(&e) && self.retries.available_permits() > 0 => {
                let Ok(_permit) = self.retries.try_acquire() else {
                    return Err(classify(e));
                };
                drop(client);
                metrics::counter!(crate::telemetry::POSTGRES_READ_RETRIES).increment(1);
                tracing::debug!(error = %e, "a read lost its connection; retrying once on a new one");
                let (fresh, connection) = connect_dedicated(&self.config, None, "syncar").await?;
                // Ends once `fresh` is dropped, below.
                tokio::spawn(connection);
                let row = fresh
                    .query_opt(resource.get_sql(), &[key_param(key)])
                    .await
                    .map_err(classify)?;
                Ok(row.as_ref().map(versioned_doc))
            }
            other => other.map_err(classify),
        }
    }

    /// Reads the documents `keys` of `resource` in one query: each found one's canonical key
    /// text (see [`KeyParam`]'s `Display`) with its version and canonical JSON; absent keys
    /// are not in the map.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn get_many(
        &self,
        resource: &Resource,
        keys: &[&KeyParam],
    ) -> Result<std::collections::HashMap<String, (Version, Bytes)>, DbError> {
        let client = self.client().await?;
        let ints: Vec<i64>;
        let texts: Vec<&str>;
        let param: &(dyn ToSql + Sync) = if keys.iter().all(|k| matches!(k, KeyParam::Int(_))) {
            ints = keys
                .iter()
                .filter_map(|k| match k {
                    KeyParam::Int(i) => Some(*i),
                    KeyParam::Text(_) => None,
                })
                .collect();
            &ints
        } else {
            texts = keys
                .iter()
                .filter_map(|k| match k {
                    KeyParam::Text(s) => Some(s.as_str()),
                    KeyParam::Int(_) => None,
                })
                .collect();
            &texts
        };
        let stmt = client
            .prepare_cached(&resource.get_many_sql())
            .await
            .map_err(classify)?;
        let rows = client.query(&stmt, &[param]).await.map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let doc: String = row.get(2);
                (row.get(0), (Version(row.get(1)), Bytes::from(doc)))
            })
            .collect())
    }

    /// Writes one document in its own transaction; returns once it is committed.
    ///
    /// # Errors
    /// A classified [`DbError`]; [`DbError::Rejected`] carries Postgres' reason.
    pub async fn put(
        &self,
        resource: &Resource,
        key: &KeyParam,
        body: crate::model::JsonText,
        pre: Precondition,
        commit: Commit,
    ) -> Result<WriteOutcome, DbError> {
        let (doc, write) = resource
            .prepare_write(key, &body, &pre)
            .map_err(DbError::from)?;
        let versions = if_versions(&pre);
        let params = write_params(&write, key, &doc, &versions);
        let mut client = self.client().await?;
        let row = match &commit {
            Commit::AsConfigured if matches!(resource.shape, Shape::Kv) => {
                let stmt = client.prepare_cached(&write.sql).await.map_err(classify)?;
                client.query_opt(&stmt, &params).await.map_err(classify)?
            }
            // A table write's SQL depends on which columns the body has: an unnamed statement,
            // so clients cannot grow the statement caches without bound.
            Commit::AsConfigured => client
                .query_opt(write.sql.as_str(), &params)
                .await
                .map_err(classify)?,
            Commit::Synchronous { .. } => {
                let tx = client.transaction().await.map_err(classify)?;
                commit.apply(&tx).await?;
                let row = tx
                    .query_opt(write.sql.as_str(), &params)
                    .await
                    .map_err(classify)?;
                tx.commit().await.map_err(classify)?;
                row
            }
        };
        Ok(match row {
            Some(row) => WriteOutcome::Written(written(&row)),
            None => WriteOutcome::PreconditionFailed,
        })
    }

    /// Deletes one document; returns once it is committed, with the delete's own version.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn delete(
        &self,
        resource: &Resource,
        key: &KeyParam,
        pre: Precondition,
        commit: Commit,
    ) -> Result<DeleteOutcome, DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        commit.apply(&tx).await?;
        let deleted = match &pre {
            Precondition::Versions(versions) => {
                let stmt = tx
                    .prepare_cached(&resource.delete_sql(true))
                    .await
                    .map_err(classify)?;
                tx.query_opt(&stmt, &[key_param(key), versions])
                    .await
                    .map_err(classify)?
            }
            _ => {
                let stmt = tx
                    .prepare_cached(&resource.delete_sql(false))
                    .await
                    .map_err(classify)?;
                tx.query_opt(&stmt, &[key_param(key)])
                    .await
                    .map_err(classify)?
            }
        };
        if deleted.is_none() {
            tx.rollback().await.map_err(classify)?;
            return Ok(match pre {
                Precondition::None => DeleteOutcome::NotFound,
                _ => DeleteOutcome::PreconditionFailed,
            });
        }
        // The notify trigger took the delete's version with nextval() in this session, after
        // the row was gone: currval() is that version.
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT currval({})",
                quote_literal(&format!("{}.{VERSION_SEQUENCE}", self.schema))
            ))
            .await
            .map_err(classify)?;
        let tombstone: i64 = tx.query_one(&stmt, &[]).await.map_err(classify)?.get(0);
        tx.commit().await.map_err(classify)?;
        Ok(DeleteOutcome::Deleted {
            version: Version(tombstone),
        })
    }

    /// Runs `ops` in one transaction, in order, all or nothing: the first that cannot be done
    /// (its precondition fails, Postgres rejects its document) rolls everything back and is
    /// named by its index. A delete of an absent key without a precondition is not a failure:
    /// [`TxDone::NotFound`].
    ///
    /// # Errors
    /// [`TxFailed`] with the index of the operation that failed (`None`: the connection or
    /// the commit); nothing was committed.
    pub async fn transact(
        &self,
        ops: &[TxItem<'_>],
        commit: Commit,
    ) -> Result<Vec<TxDone>, TxFailed> {
        let at = |index| {
            move |e: DbError| TxFailed {
                index,
                why: TxWhy::Db(e),
            }
        };
        let mut client = self.client().await.map_err(at(None))?;
        let tx = client
            .transaction()
            .await
            .map_err(classify)
            .map_err(at(None))?;
        commit.apply(&tx).await.map_err(at(None))?;
        let mut done = Vec::with_capacity(ops.len());
        for (i, item) in ops.iter().enumerate() {
            let here = at(Some(i));
            let failed = || TxFailed {
                index: Some(i),
                why: TxWhy::Precondition,
            };
            match item.op {
                TxOp::Put { body, pre } => {
                    let (doc, write) = item
                        .resource
                        .prepare_write(item.key, body, pre)
                        .map_err(|e| here(DbError::from(e)))?;
                    let versions = if_versions(pre);
                    let params = write_params(&write, item.key, &doc, &versions);
                    let row = tx
                        .query_opt(write.sql.as_str(), &params)
                        .await
                        .map_err(|e| here(classify(e)))?
                        .ok_or_else(failed)?;
                    done.push(TxDone::Written(written(&row)));
                }
                TxOp::Delete { pre } => {
                    let conditional = matches!(pre, Precondition::Versions(_));
                    let sql = item.resource.delete_sql(conditional);
                    let deleted = match pre {
                        Precondition::Versions(v) => {
                            tx.query_opt(sql.as_str(), &[key_param(item.key), v]).await
                        }
                        _ => tx.query_opt(sql.as_str(), &[key_param(item.key)]).await,
                    }
                    .map_err(|e| here(classify(e)))?;
                    match (deleted, pre) {
                        (None, Precondition::None) => done.push(TxDone::NotFound),
                        (None, _) => return Err(failed()),
                        (Some(_), _) => {
                            // The delete trigger took the delete's version in this session.
                            let version: i64 = tx
                                .query_one(
                                    &format!("SELECT currval({})", self.sequence_literal()),
                                    &[],
                                )
                                .await
                                .map_err(|e| here(classify(e)))?
                                .get(0);
                            done.push(TxDone::Deleted {
                                version: Version(version),
                            });
                        }
                    }
                }
            }
        }
        tx.commit().await.map_err(classify).map_err(at(None))?;
        Ok(done)
    }

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
    /// # Errors
    /// A classified [`DbError`].
    pub async fn prune_changes(&self, retention: Duration) -> Result<u64, DbError> {
        let mut client = self.client().await?;
        let tx = own_bookkeeping(&mut client).await?;
        let pruned = prune_changes(&*tx, &self.schema, retention)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(pruned)
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
                    "SELECT nextval({}), {LOCAL_COMMIT}",
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
                    crate::resource::quote_ident(&self.schema),
                    crate::resource::quote_ident(VERSION_SEQUENCE)
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
                "SELECT (to_jsonb(s) ->> 'synced')::bool FROM pg_replication_slots s \
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
                    "SELECT setval({seq}, $1), {LOCAL_COMMIT} FROM {}.{} WHERE last_value < $1",
                    crate::resource::quote_ident(&self.schema),
                    crate::resource::quote_ident(VERSION_SEQUENCE)
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
            .query_opt(resource.restamp_sql().as_str(), &[key_param(key)])
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(row.as_ref().map(versioned_doc))
    }

    fn sequence_literal(&self) -> String {
        quote_literal(&format!("{}.{VERSION_SEQUENCE}", self.schema))
    }

    /// Runs `reset` at most once per value of the state `name` across the fleet: when the
    /// state table records another value for `name`, under that row's lock, with a fresh
    /// version from the sequence; then records `value`. Nothing recorded yet (a fresh
    /// install): records `value` without `reset`. Instances that come second wait for the
    /// lock, find `value` recorded and run nothing. Returns the version `reset` ran with, if
    /// it ran, and what was recorded before (empty: nothing).
    ///
    /// # Errors
    /// A classified [`DbError`]; `reset`'s error as [`DbError::Internal`] (nothing recorded,
    /// so the next attempt runs it again).
    pub async fn once_per_state<F, Fut>(
        &self,
        name: &str,
        value: &str,
        reset: F,
    ) -> Result<(Option<Version>, String), DbError>
    where
        F: FnOnce(Version) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let state = format!(
            "{}.{STATE_TABLE}",
            crate::resource::quote_ident(&self.schema)
        );
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
                tx.query_one(&format!("SELECT nextval({})", self.sequence_literal()), &[])
                    .await
                    .map_err(classify)?
                    .get(0),
            );
            reset(version).await.map_err(DbError::Internal)?;
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
    /// Postgres failing, as a message.
    pub async fn table_shapes(
        &self,
        resources: &[crate::config::ResourceConfig],
    ) -> Result<crate::schema::shape::Shapes, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        crate::schema::shape::fingerprints(&**client, &self.schema, resources)
            .await
            .map_err(|e| crate::telemetry::error_chain(&e))
    }

    /// Announces each configured table whose shape changed since last announced (see
    /// [`crate::schema::shape::announce_changes`]), on a pooled connection.
    ///
    /// # Errors
    /// Postgres failing, as a message.
    pub async fn announce_shape_changes(
        &self,
        config: &crate::config::Config,
        source: crate::config::PostgresSource,
    ) -> Result<Vec<String>, String> {
        let mut client = self.client().await.map_err(|e| e.to_string())?;
        let tx = own_bookkeeping(&mut client)
            .await
            .map_err(|e| e.to_string())?;
        let announced = crate::schema::shape::announce_changes(
            &*tx,
            &config.postgres.schema,
            source,
            &config.resources,
        )
        .await
        .map_err(|e| crate::telemetry::error_chain(&e))?;
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok(announced)
    }

    /// The catalog read again (see [`crate::schema::load_catalog`]), on a pooled connection.
    ///
    /// # Errors
    /// Postgres failing, or the schema no longer migrated, as a message.
    pub async fn load_catalog(
        &self,
        config: &crate::config::Config,
    ) -> Result<crate::resource::Catalog, String> {
        let client = self.client().await.map_err(|e| e.to_string())?;
        crate::schema::load_catalog(&**client, config)
            .await
            .map_err(|e| crate::telemetry::error_chain(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| {
            metrics::counter!(crate::telemetry::POSTGRES_ERRORS, "class" => "unavailable")
                .increment(1);
            // Whatever stops a connection from opening (refused, auth, TLS, database not
            // accepting connections) means Postgres cannot serve us now.
            DbError::Unavailable(explained(&e))
        })
    }
}

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

/// `e` and its causes, one line, with what to check when it is a TLS failure: a handshake
/// error says little by itself.
fn explained(e: &dyn std::error::Error) -> String {
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
    with_hint(out)
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
    // none of their commits may wait for a synchronous standby (see [`own_bookkeeping`]).
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

/// How a client's write commits: whether it waits for the relay as a synchronous standby,
/// which confirms a position only once every live instance has applied it ("committed
/// means evicted", ARCHITECTURE "Synchronous mode"). See Postgres' `synchronous_commit` in
/// "Write Ahead Log" and "Synchronous Replication".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Commit {
    /// The session's `synchronous_commit`: the server's, the database's or the role's
    /// setting (`ALTER ROLE syncar SET synchronous_commit = ...`).
    #[default]
    AsConfigured,
    /// `synchronous_commit = on` for the write's transaction, once Postgres says, in the
    /// same transaction, that the relay streaming from `slot` is a synchronous standby
    /// (see [`relay_waited_for`]); else the transaction is rolled back with
    /// [`DbError::NotSynchronous`].
    Synchronous {
        /// The `wal` source's replication slot, whose walsender is the relay's.
        slot: String,
        /// The relay this instance heard last said it was a synchronous standby (its
        /// heartbeat's `sync`): counts only while no relay streams (one is being replaced).
        heard_synchronous: bool,
    },
}

impl Commit {
    /// Prepares the transaction for this choice: for [`Commit::Synchronous`], sets
    /// `synchronous_commit` and checks the relay in one round trip.
    async fn apply(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), DbError> {
        let Commit::Synchronous {
            slot,
            heard_synchronous,
        } = self
        else {
            return Ok(());
        };
        let row = tx
            .query_one(
                "SELECT set_config('synchronous_commit', 'on', true), \
                        r.state, r.sync_state \
                 FROM (SELECT 1) AS one LEFT JOIN (pg_replication_slots s \
                       JOIN pg_stat_replication r ON r.pid = s.active_pid) \
                   ON s.slot_name = $1",
                &[slot],
            )
            .await
            .map_err(classify)?;
        relay_waited_for(
            row.get::<_, Option<String>>(1).as_deref(),
            row.get::<_, Option<String>>(2).as_deref(),
            *heard_synchronous,
        )
        .map_err(DbError::NotSynchronous)
    }
}

/// Whether a commit with `synchronous_commit = on` waits for the relay, from its walsender's
/// `state` and `sync_state` in `pg_stat_replication` (both `None`: no relay streams from the
/// slot now):
/// - streaming and `sync`: Postgres waits for its confirmation;
/// - streaming and anything else (`async`, `potential`, `quorum`: another standby's
///   confirmation may be enough): it does not; the error says what to change;
/// - no relay streaming (one is being replaced, or catching up): Postgres holds a commit
///   until enough synchronous standbys confirm it, so it waits for the next relay, if the
///   last one heard was synchronous (`heard_synchronous`);
/// - streaming without a visible `sync_state`: the role cannot see it (it needs
///   `pg_read_all_stats`, or to be the relay's role).
///
/// # Errors
/// Why the commit would not wait for the relay, for the client (503 `not_synchronous`).
pub fn relay_waited_for(
    state: Option<&str>,
    sync_state: Option<&str>,
    heard_synchronous: bool,
) -> Result<(), String> {
    const NAME_IT: &str = "name the relay in synchronous_standby_names (application_name \
                           syncar-relay, e.g. '\"syncar-relay\"'); see the README's \
                           \"Committed means evicted\"";
    match (state, sync_state) {
        (Some("streaming"), Some("sync")) => Ok(()),
        (Some("streaming"), Some(other)) => Err(format!(
            "consistency=strong needs the relay to be a synchronous standby, and Postgres \
             counts it {other}: {NAME_IT}"
        )),
        (Some("streaming"), None) => Err(
            "consistency=strong: this role cannot see the relay's sync_state in \
             pg_stat_replication; grant it pg_read_all_stats, or run the relay as this role"
                .into(),
        ),
        _ if heard_synchronous => Ok(()),
        _ => Err(format!(
            "consistency=strong: no relay streams now, and the last one heard was not a \
             synchronous standby (or none was heard yet): {NAME_IT}"
        )),
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

/// A key as the bind parameter of its column's type.
pub fn key_param(key: &KeyParam) -> &(dyn ToSql + Sync) {
    match key {
        KeyParam::Text(s) => s,
        KeyParam::Int(i) => i,
    }
}

/// The one place a Postgres error gets its meaning for clients.
pub fn classify(e: tokio_postgres::Error) -> DbError {
    let class = |c: &str| {
        metrics::counter!(crate::telemetry::POSTGRES_ERRORS, "class" => c.to_string()).increment(1)
    };
    let Some(db) = e.as_db_error() else {
        class("unavailable");
        return DbError::Unavailable(e.to_string());
    };
    let code = db.code();
    let sqlstate = code.code();
    let reason = match db.detail() {
        Some(detail) => format!("{} ({detail})", db.message()),
        None => db.message().to_string(),
    };
    if [
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::DATATYPE_MISMATCH,
    ]
    .contains(code)
    {
        // 42703, 42P01, 42883, 42804: syncar's SQL names what the catalog said, and the
        // table no longer has it (a column renamed or dropped, the table renamed, a type
        // changed so that an operator or cast is gone).
        class("schema_changed");
        DbError::SchemaChanged(format!("{reason} [{sqlstate}]"))
    } else if *code == SqlState::UNIQUE_VIOLATION {
        class("rejected");
        DbError::Conflict(reason)
    } else if *code == SqlState::STATEMENT_TOO_COMPLEX {
        // 54001 "stack depth limit exceeded": a document nested deeper than Postgres' parser
        // goes (its limit is max_stack_depth); nothing syncar could serve back either.
        class("rejected");
        DbError::Rejected(format!(
            "{reason}: the document nests deeper than Postgres accepts (its max_stack_depth \
             setting bounds the depth; about 10 000 levels at the default 2MB)"
        ))
    } else if sqlstate.starts_with("22") || sqlstate.starts_with("23") {
        class("rejected");
        DbError::Rejected(reason)
    } else if sqlstate.starts_with("08")
        || sqlstate.starts_with("53")
        || sqlstate.starts_with("57")
        || sqlstate.starts_with("40")
    {
        class("unavailable");
        DbError::Unavailable(reason)
    } else {
        class("internal");
        DbError::Internal(format!("{reason} [{sqlstate}]"))
    }
}

#[cfg(test)]
mod tests {
    use super::relay_waited_for;

    #[test]
    fn a_strong_write_commits_only_where_postgres_waits_for_the_relay() {
        let streaming = Some("streaming");
        assert!(relay_waited_for(streaming, Some("sync"), false).is_ok());
        for state in ["async", "potential", "quorum"] {
            let e = relay_waited_for(streaming, Some(state), true).unwrap_err();
            assert!(
                e.contains(state) && e.contains("synchronous_standby_names"),
                "{state}: {e}"
            );
        }
        let e = relay_waited_for(streaming, None, true).unwrap_err();
        assert!(e.contains("pg_read_all_stats"), "{e}");
        // No relay streaming: Postgres holds the commit for the next one only if the last
        // was synchronous.
        for state in [None, Some("catchup"), Some("startup")] {
            assert!(relay_waited_for(state, None, true).is_ok(), "{state:?}");
            assert!(relay_waited_for(state, None, false).is_err(), "{state:?}");
        }
    }
}
