//! What the relay tells Postgres it has done: a position is confirmed (the slot may move
//! past it, and a commit that waits for this relay as a synchronous standby returns) once
//! everything up to it is in Redis and published, and, while Postgres counts the relay as a
//! synchronous standby, once every live instance has applied it too ("committed means
//! evicted"; see ARCHITECTURE "Synchronous mode" and Postgres' "Synchronous Replication").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient};

/// The positions of one relay term: published, and reported applied by instances.
#[derive(Default)]
pub(super) struct Confirmations {
    /// The highest position published (everything up to it is in Redis and on the
    /// channel).
    published: Option<Lsn>,
    /// `Some(feeds.lease)` while Postgres counts this relay as a synchronous standby
    /// (`pg_stat_replication.sync_state` `sync` or `quorum`): positions are confirmed only
    /// once applied by every instance that reported within that lease.
    synchronous: Option<Duration>,
    /// What each instance reported applying (an LSN as a number), and when the report came.
    reports: HashMap<String, (u64, Instant)>,
}

impl Confirmations {
    /// Whether the relay waits for the instances' reports.
    pub(super) fn is_synchronous(&self) -> bool {
        self.synchronous.is_some()
    }

    /// Starts (`Some(lease)`) or stops waiting for the instances' reports; the reports heard
    /// so far are forgotten.
    pub(super) fn set_synchronous(&mut self, lease: Option<Duration>) {
        self.synchronous = lease;
        self.reports.clear();
    }

    /// Everything up to `lsn` is in Redis and published: confirm it, now or (a synchronous
    /// standby) once the instances have applied it.
    pub(super) fn advance(&mut self, repl: &ReplicationClient, lsn: Lsn) {
        if self.published.is_none_or(|p| lsn > p) {
            self.published = Some(lsn);
        }
        self.confirm(repl);
    }

    /// Confirms to Postgres the highest position that may be: what is published, and, while
    /// the relay is a synchronous standby, what every instance which reported within its
    /// lease has applied (see [`synchronous_position`]). The crate sends a raised position
    /// within its status interval, and never moves it back.
    pub(super) fn confirm(&mut self, repl: &ReplicationClient) {
        let Some(published) = self.published else {
            return;
        };
        let lsn = match self.synchronous {
            None => published,
            Some(lease) => {
                let now = Instant::now();
                self.reports
                    .retain(|_, (_, seen)| now.duration_since(*seen) <= lease);
                synchronous_position(published.as_u64(), self.reports.values().map(|r| r.0)).into()
            }
        };
        repl.update_applied_lsn(lsn);
    }

    /// An instance's report of the position it applied (`"{instance} {lsn}"`, see
    /// [`crate::feed::relayed::applied_channel`]); anything else is ignored.
    pub(super) fn reported(&mut self, repl: &ReplicationClient, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let Some((instance, lsn)) = text.split_once(' ') else {
            return;
        };
        let Ok(lsn) = lsn.parse::<u64>() else {
            return;
        };
        let now = Instant::now();
        let entry = self.reports.entry(instance.to_string()).or_insert((0, now));
        *entry = (entry.0.max(lsn), now);
        self.confirm(repl);
    }
}

/// What a relay that is a synchronous standby may confirm: the position published
/// (`published`), but no further than the least position applied by the instances that
/// reported within their lease (`applied`). An instance silent for its lease is left out: by
/// then its own feed lease has run out and it bypasses L1, so a change it missed is not
/// served from it. No instance reporting: only what is published bounds it.
fn synchronous_position(published: u64, applied: impl Iterator<Item = u64>) -> u64 {
    applied.fold(published, u64::min)
}

/// Whether Postgres counts the stream of `slot` as a synchronous standby (`sync_state`
/// `sync` or `quorum` in `pg_stat_replication`).
///
/// # Errors
/// Postgres failing.
pub(super) async fn synchronous(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    let state: Option<String> = client
        .query_opt(
            "SELECT r.sync_state FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    Ok(matches!(state.as_deref(), Some("sync" | "quorum")))
}

#[cfg(test)]
mod tests {
    use super::synchronous_position;

    #[test]
    fn a_synchronous_relay_confirms_what_every_reporting_instance_applied() {
        assert_eq!(
            synchronous_position(100, [].into_iter()),
            100,
            "nobody to wait for"
        );
        assert_eq!(synchronous_position(100, [100, 120].into_iter()), 100);
        assert_eq!(synchronous_position(100, [100, 40].into_iter()), 40);
        assert_eq!(
            synchronous_position(100, [140].into_iter()),
            100,
            "never past what is published"
        );
    }
}
