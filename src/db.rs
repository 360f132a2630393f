//! Postgres as the source of truth: the pool ([`Db`]) and the types its rooms share. Knows
//! nothing about caches.
//!
//! `Db`'s methods live in rooms, one concept each: `read.rs` document reads, `write.rs`
//! document writes and transactions, `bookkeeping.rs` syncar's own rows (the sequence, the
//! state table, the changes log, shapes). Beside them, leaves the rooms share: `error.rs`
//! the one place a Postgres error is classified ([`DbError`], [`classify`]), `connect.rs`
//! the driver's settings, TLS and connections of their own ([`connect_dedicated`]),
//! `commit.rs` how a client's write commits ([`Commit`]), `pooler.rs` whether a pooler in
//! front of Postgres mixes up sessions' prepared statements ([`check_pooler`]).

mod bookkeeping;
mod commit;
mod connect;
mod error;
mod pooler;
mod read;
mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;

use crate::config::PostgresConfig;
use crate::model::{JsonText, Version};
use crate::resource::{quote_literal, KeyParam, Precondition, Resource};
use crate::schema::VERSION_SEQUENCE;

pub use commit::{relay_waited_for, Commit, NotSynchronous};
pub use connect::{connect_dedicated, pg_config, Dedicated};
pub use error::{classify, CatalogError, DbError};
pub use pooler::{check as check_pooler, PoolerError, POOLER_HINT};

use connect::explained;

/// The pooled connection to Postgres.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    schema: String,
    /// For a connection of its own (a read retried after its connection died).
    config: Arc<PostgresConfig>,
    /// Reads retried on a connection of their own at once, at most.
    retries: Arc<tokio::sync::Semaphore>,
    /// Each resource's share of the pool: at most [`Db::share`] of its connections at once
    /// for one resource's reads and writes (see [`Db::client_for`]), by resource name.
    shares: Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
    /// Connections one resource may hold at once: the pool but a quarter of it (rounded
    /// down) kept for the others; the whole pool up to 3 connections.
    share: usize,
}

/// A pooled connection taken for one resource's read or write, with one of the resource's
/// shares of the pool (given back with the connection). Derefs to the connection.
pub(crate) struct Leased {
    client: deadpool_postgres::Object,
    _share: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Leased {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for Leased {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
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

/// What a put did.
#[derive(Clone, Debug)]
pub enum WriteOutcome {
    /// Committed.
    Written(Written),
    /// Its `If-Match` / `If-None-Match` did not hold: nothing was written.
    PreconditionFailed,
}

/// What a delete did.
#[derive(Clone, Debug)]
pub enum DeleteOutcome {
    /// Deleted; `version` is the fresh version the delete took (its tombstone's).
    Deleted { version: Version },
    /// No such key, and no precondition.
    NotFound,
    /// A precondition was given and did not hold (an absent key holds none).
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

/// Why the `reset` of [`Db::once_per_state`] failed: the caller's own error, whatever its
/// type (kept as a source; a message converts too).
pub type ResetFailed = Box<dyn std::error::Error + Send + Sync>;

/// One operation of a transaction ([`Db::transact`]).
pub struct TxItem<'a> {
    pub resource: &'a Resource,
    pub key: &'a KeyParam,
    pub op: &'a TxOp,
}

/// What an operation does.
#[derive(Clone, Debug)]
pub enum TxOp {
    Put { body: JsonText, pre: Precondition },
    Delete { pre: Precondition },
}

/// What an operation of a committed transaction did.
#[derive(Clone, Debug)]
pub enum TxDone {
    /// A put, committed.
    Written(Written),
    /// A delete, committed with this fresh version (its tombstone's).
    Deleted { version: Version },
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

/// What made a transaction's operation fail.
#[derive(Clone, Debug)]
pub enum TxWhy {
    /// Its `If-Match` / `If-None-Match` did not hold.
    Precondition,
    /// Postgres refused it, or failed.
    Db(DbError),
}

/// A key as the bind parameter of its column's type.
pub fn key_param(key: &KeyParam) -> &(dyn ToSql + Sync) {
    match key {
        KeyParam::Text(s) => s,
        KeyParam::Int(i) => i,
    }
}

/// A bind parameter with the type its SQL casts it to (every `$n` of syncar's statements
/// carries a cast), so an unnamed statement is parsed, bound and executed in one round trip
/// (tokio-postgres' `query_typed`) instead of being prepared first, a round trip of its own.
pub(crate) type Typed<'a> = (&'a (dyn ToSql + Sync), tokio_postgres::types::Type);

/// The key as syncar's statements cast it: `$n::text` or `$n::int8`.
pub(crate) fn typed_key(key: &KeyParam) -> Typed<'_> {
    let ty = match key {
        KeyParam::Text(_) => tokio_postgres::types::Type::TEXT,
        KeyParam::Int(_) => tokio_postgres::types::Type::INT8,
    };
    (key_param(key), ty)
}

impl Db {
    /// Builds the pool; connections open lazily, so Postgres may still be down.
    ///
    /// # Errors
    /// Only an unusable URL, which config validation already rules out.
    pub fn new(config: &PostgresConfig) -> Result<Self, DbError> {
        let (pg, _) = pg_config(config)?;
        let manager = Manager::from_connect(
            pg,
            connect::PoolConnect::new(config)?,
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
            shares: Arc::default(),
            share: (config.pool_size - config.pool_size / 4).max(1),
        })
    }

    /// A connection from the pool for a read or write of `resource`, within its share: a
    /// quarter of the pool is always left to the other resources. A customer's lock on a
    /// table (a `LOCK TABLE`, an `ALTER TABLE` waiting for its own) holds every statement on
    /// it until `postgres.statement_timeout`; without a share, the reads of one locked table
    /// took every connection and the other resources' misses and writes timed out waiting
    /// for one (the bulkhead of "Release It!", applied per table).
    ///
    /// # Errors
    /// [`DbError::Unavailable`]: the resource's share stayed taken, or no connection could be
    /// had, within `postgres.pool_timeout`.
    async fn client_for(&self, resource: &str) -> Result<Leased, DbError> {
        let share = {
            let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
            shares
                .entry(resource.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.share)))
                .clone()
        };
        let permit =
            match tokio::time::timeout(self.config.pool_timeout, share.acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    metrics::counter!(crate::telemetry::POSTGRES_ERRORS, "class" => "unavailable")
                        .increment(1);
                    return Err(DbError::Unavailable(format!(
                    "all {} connections resource {resource} may hold (the pool but a quarter kept \
                     for the others) stayed busy \
                     for postgres.pool_timeout ({} ms): a lock on its table?",
                    self.share,
                    self.config.pool_timeout.as_millis()
                )));
                }
            };
        Ok(Leased {
            client: self.client().await?,
            _share: permit,
        })
    }

    /// A connection from the pool.
    ///
    /// # Errors
    /// [`DbError::Unavailable`]: no connection could be had within `postgres.pool_timeout`.
    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| {
            metrics::counter!(crate::telemetry::POSTGRES_ERRORS, "class" => "unavailable")
                .increment(1);
            // Whatever stops a connection from opening (refused, auth, TLS, database not
            // accepting connections) means Postgres cannot serve us now.
            DbError::Unavailable(explained(&e))
        })
    }

    /// The version sequence as a `regclass` literal, for `nextval`, `currval`, `setval`.
    fn sequence_literal(&self) -> String {
        quote_literal(&format!("{}.{VERSION_SEQUENCE}", self.schema))
    }

    /// `SELECT currval(...)` of the version sequence, qualified: an unqualified `currval`
    /// with a string literal would prefer a `currval(text)` planted on the session's
    /// `search_path` to the catalog's `currval(regclass)` (CVE-2018-1058).
    fn currval_sql(&self) -> String {
        format!(
            "SELECT pg_catalog.currval({}::pg_catalog.regclass)",
            self.sequence_literal()
        )
    }
}

/// Reads retried on a connection of their own at once, at most (see [`Db::get`]).
const READ_RETRIES: usize = 4;

/// `(version, document)` of a row selected as `version, document, ...`.
fn versioned_doc(row: &tokio_postgres::Row) -> (Version, Bytes) {
    let doc: String = row.get(1);
    (Version(row.get(0)), Bytes::from(doc))
}
