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
mod context;
mod driver;
mod error;
pub mod notify;
pub mod redis;
pub mod relayed;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::PostgresSource;

pub use context::FeedContext;
pub use driver::feed_id;
pub use error::FeedError;

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
