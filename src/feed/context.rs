//! What a feed is handed at start: the narrow context every source and the driver share.

use std::sync::Arc;

use crate::coherence::Coherence;
use crate::config::Config;
use crate::redact::Secrets;
use crate::resource::CatalogCell;
use crate::tiers::{FeedTiers, Guards};

/// What a feed may use, and nothing more (the way a vector source gets a `SourceContext`).
pub struct FeedContext {
    pub config: Arc<Config>,
    /// The feeds' state, which this feed updates and every reader consults.
    pub coherence: Arc<Coherence>,
    /// Its subscriptions and publications; where changes are applied and replayed.
    pub tiers: FeedTiers,
    /// Checks Redis and Postgres when the feed comes back (and the poller when
    /// transaction ids went back).
    pub guards: Guards,
    /// Messages name resources; none is applied before the catalog is loaded.
    pub catalog: Arc<CatalogCell>,
    /// Scrubbed from every reason a feed logs.
    pub secrets: Secrets,
    /// `{instance}-{feed_id}`: the sender of this instance's Redis messages, which it skips.
    pub instance_id: String,
    /// Random hex naming this process's heartbeat channels.
    pub feed_id: String,
}
