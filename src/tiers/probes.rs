//! What the readiness checks ask of the stores: does Postgres answer, does Redis answer,
//! which Redis node, may reads use it. Changes nothing; knows nothing of documents.

use crate::db::{Db, DbError};
use crate::l2::{L2Error, L2};

/// The stores' health, for `/readyz` and [`crate::App::ready`]. Cheap to clone; built once
/// at start-up (see [`crate::tiers::Tiers::probes`]).
#[derive(Clone)]
pub struct Probes {
    l2: L2,
    db: Db,
}

impl Probes {
    pub(crate) fn new(l2: L2, db: Db) -> Self {
        Probes { l2, db }
    }

    /// `SELECT 1` through the pool.
    ///
    /// # Errors
    /// Why Postgres cannot be used.
    pub async fn ping_postgres(&self) -> Result<(), DbError> {
        self.db.ping().await
    }

    /// `PING` on the command connection.
    ///
    /// # Errors
    /// Why Redis cannot be used.
    pub async fn ping_redis(&self) -> Result<(), L2Error> {
        self.l2.ping().await
    }

    /// The Redis node commands go to (`host:port`), and why the Sentinels were last asked in
    /// vain, if they were.
    pub fn redis_node(&self) -> (String, Option<String>) {
        (self.l2.node(), self.l2.sentinel_error())
    }

    /// Why Redis' `maxmemory-policy` may evict what syncar needs kept, if it may (see
    /// [`crate::l2::L2::eviction_warning`]).
    pub fn redis_eviction_warning(&self) -> Option<String> {
        self.l2.eviction_warning()
    }

    /// Whether reads may use Redis now (see [`crate::tiers::Guards::secure_redis`]).
    pub fn redis_trusted(&self) -> bool {
        self.l2.trusted()
    }
}
