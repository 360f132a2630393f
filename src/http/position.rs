//! How fresh an answer is: the position of the change stream this instance had applied when
//! it answered (`wal`: an LSN in Postgres' `X/Y` form), and `min_lsn`, read-your-writes for
//! writers that never talk to syncar. A writer takes `pg_current_wal_lsn()` after its commit
//! and reads with `?min_lsn=` that value: this instance waits, bounded by
//! `feeds.min_lsn_wait`, until it has applied that position, else reads Postgres. The
//! cache-side twin of Postgres 19's `WAIT FOR LSN`.
//!
//! Headers on every document read (GET, HEAD, batch get):
//! - `X-Syncar-LSN: 16/B374D848`: every change committed up to this WAL position had been
//!   applied here (evicted or replaced its copies) when the answer was made;
//! - `X-Syncar-LSN-Age-Ms: 120`: how long ago that position last moved (the relay's
//!   heartbeats move it every `feeds.heartbeat_interval` when nothing else does);
//! - `X-Syncar-Min-LSN: unmet` when a `min_lsn` was not reached in time: the answer comes
//!   from Postgres (`X-Cache: db`);
//! - `X-Syncar-Min-Version: unmet` when the version served is below `min_version`: Postgres
//!   itself holds nothing newer.
//!
//! Only the `wal` source has a position: with the other sources there are no position
//! headers, and a `min_lsn` read goes to Postgres.

use http::{HeaderMap, HeaderValue};
use pgwire_replication::Lsn;

use super::state::HttpState;
use crate::config::PostgresSource;
use crate::tiers::ReadOptions;

/// The header naming the applied position.
pub const LSN_HEADER: &str = "x-syncar-lsn";
/// The header with the position's age, in ms.
pub const LSN_AGE_HEADER: &str = "x-syncar-lsn-age-ms";
/// Set to `unmet` when `min_lsn` was not reached within `feeds.min_lsn_wait`.
pub const MIN_LSN_HEADER: &str = "x-syncar-min-lsn";
/// Set to `unmet` when the version served is below `min_version`.
pub const MIN_VERSION_HEADER: &str = "x-syncar-min-version";

/// What a read asked of the stream's position, once waited for, and the position as it
/// stood then: taken before the tiers are read, so the header never claims a change
/// applied while the answer was being read (the answer may be newer than the header says,
/// never older).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Waited {
    /// `min_lsn` was asked and not reached in time: the read went to Postgres.
    pub unmet: bool,
    /// The applied position and its age in ms, when it was taken.
    position: Option<(u64, u64)>,
}

impl Waited {
    /// Nothing waited for; the position as it stands now.
    pub(super) fn now(state: &HttpState) -> Waited {
        Waited {
            unmet: false,
            position: state.coherence.applied_position(),
        }
    }
}

/// Waits for `options.min_lsn`, if any, for at most `feeds.min_lsn_wait`; when it is not
/// reached (or this source has no position), the read goes to Postgres (`strong`).
pub(super) async fn wait_for_position(
    state: &HttpState,
    mut options: ReadOptions,
) -> (ReadOptions, Waited) {
    let Some(min) = options.min_lsn else {
        return (options, Waited::now(state));
    };
    let wal = state
        .catalog
        .get()
        .is_ok_and(|c| c.capture.source == PostgresSource::Wal);
    let reached = wal
        && state
            .coherence
            .wait_applied(min, state.config.feeds.min_lsn_wait)
            .await;
    if !reached {
        options.strong = true;
    }
    let waited = Waited {
        unmet: !reached,
        ..Waited::now(state)
    };
    (options, waited)
}

/// Adds the position headers (see the module doc) to an answer.
pub(super) fn add_headers(headers: &mut HeaderMap, waited: Waited) {
    if let Some((lsn, age_ms)) = waited.position {
        if let Ok(value) = HeaderValue::from_str(&Lsn::from_u64(lsn).to_string()) {
            headers.insert(LSN_HEADER, value);
        }
        headers.insert(LSN_AGE_HEADER, HeaderValue::from(age_ms));
    }
    if waited.unmet {
        headers.insert(MIN_LSN_HEADER, HeaderValue::from_static("unmet"));
    }
}
