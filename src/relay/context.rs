//! What the relay is handed at start: the narrow context every room of the relay shares.
//! Knows nothing of the stream.

use std::sync::Arc;

use crate::config::Config;
use crate::redact::Secrets;
use crate::resource::CatalogCell;
use crate::tiers::{Guards, RelayRedis};

/// What the relay may use.
pub struct RelayContext {
    pub config: Arc<Config>,
    /// Its lease, its records in Redis, where changes are applied (Redis) and published.
    pub redis: RelayRedis,
    /// Checks Redis and Postgres before a term streams anything.
    pub guards: Guards,
    pub catalog: Arc<CatalogCell>,
    pub secrets: Secrets,
    /// This instance's id: the lease's holder, and the heartbeats' author.
    pub instance_id: String,
}
