//! Coherence across instances: the feeds that tell this instance of changes made elsewhere,
//! and what a feed does when it goes down and comes back. [`driver`] holds the one run loop
//! every feed shares; the sources are [`changes`] (the changes-log poller, the default
//! Postgres source), [`notify`] (LISTEN/NOTIFY) and [`redis`] (pub/sub). Knows nothing about
//! HTTP.
//!
//! # A lost feed never means stale data
//! See [`crate::coherence`] for the rules readers follow. When a feed is back: replay the
//! changes log from shortly before the outage into Redis, empty L1, and only then use L1
//! again.

pub mod changes;
mod driver;
pub mod notify;
pub mod redis;
pub mod relayed;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::coherence::Coherence;
use crate::config::{Config, PostgresSource};
use crate::redact::Secrets;
use crate::resource::CatalogCell;
use crate::tiers::Tiers;

pub use driver::feed_id;

/// What a feed may use, and nothing more (the way a vector source gets a `SourceContext`).
pub struct FeedContext {
    pub config: Arc<Config>,
    /// The feeds' state, which this feed updates and every reader consults.
    pub coherence: Arc<Coherence>,
    /// Where changes are applied and replayed.
    pub tiers: Tiers,
    /// Messages name resources; none is applied before the catalog is loaded.
    pub catalog: Arc<CatalogCell>,
    /// Scrubbed from every reason a feed logs.
    pub secrets: Secrets,
    /// `{instance}-{feed_id}`: the sender of this instance's Redis messages, which it skips.
    pub instance_id: String,
    /// Random hex naming this process's heartbeat channels.
    pub feed_id: String,
}

/// Runs the Postgres feed until `shutdown`, with the source the schema was migrated for
/// (known once the catalog is loaded).
pub async fn run_postgres(ctx: Arc<FeedContext>, shutdown: CancellationToken) {
    let Some(catalog) = driver::wait_for_catalog(&ctx, &shutdown).await else {
        return;
    };
    match catalog.capture.source {
        PostgresSource::Notify => driver::run(notify::Notify::new(&ctx), ctx, shutdown).await,
        PostgresSource::Wal => driver::run(relayed::Relayed::new(&ctx), ctx, shutdown).await,
        PostgresSource::ChangesLog | PostgresSource::Auto => {
            driver::run(changes::ChangesLog::default(), ctx, shutdown).await
        }
    }
}

/// Runs the Redis feed until `shutdown`.
pub async fn run_redis(ctx: Arc<FeedContext>, shutdown: CancellationToken) {
    driver::run(redis::PubSub::new(&ctx), ctx, shutdown).await;
}
