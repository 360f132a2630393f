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
    /// The highest position published (everything up to it is in Redis, and what
    /// instances need of it on the channel).
    published: Option<Lsn>,
    /// The highest position a published message carried (a batch's last commit, a
    /// heartbeat): the positions instances report. Those between it and `published` changed
    /// nothing instances hold (commits of other tables).
    carried: Option<Lsn>,
    /// The highest position confirmed to Postgres.
    confirmed: Option<Lsn>,
    /// `Some(feeds.lease)` while the relay may be a synchronous standby
    /// (`pg_stat_replication.sync_state` `sync`, `quorum` or `potential`, or not known yet):
    /// positions are confirmed only once applied by every instance that reported within
    /// that lease.
    synchronous: Option<Duration>,
    /// Since when it is synchronous: for one lease after that, no report means "not heard
    /// yet", not "no instance", and nothing past what was confirmed then is confirmed.
    since: Option<Instant>,
    /// What was confirmed when it became synchronous.
    floor: Option<Lsn>,
    /// What each instance reported applying (an LSN as a number), and when the report came.
    reports: HashMap<String, (u64, Instant)>,
    /// How often, at the longest, the relay's loop looks at its confirmations when it runs
    /// (the lease's renewal); a longer gap between two looks means the relay itself did not
    /// run (starved of CPU, paused), see [`Confirmations::confirm`].
    turn: Duration,
    /// When the confirmations were last looked at.
    last_look: Option<Instant>,
}

impl Confirmations {
    /// A term's start: synchronous until Postgres is seen to say otherwise (a commit may be
    /// waiting for this relay already), instances reporting within `lease`; the relay's loop
    /// looks at least every `turn` while it runs.
    pub(super) fn new(lease: Duration, turn: Duration) -> Self {
        Confirmations {
            synchronous: Some(lease),
            since: Some(Instant::now()),
            turn,
            ..Confirmations::default()
        }
    }

    /// Whether the relay waits for the instances' reports.
    pub(super) fn is_synchronous(&self) -> bool {
        self.synchronous.is_some()
    }

    /// Starts (`Some(lease)`) or stops waiting for the instances' reports.
    pub(super) fn set_synchronous(&mut self, lease: Option<Duration>) {
        if lease.is_some() && self.synchronous.is_none() {
            self.since = Some(Instant::now());
            self.floor = self.confirmed;
        }
        self.synchronous = lease;
    }

    /// Everything up to `lsn` is in Redis and published (`carried`: by a message that
    /// instances report, else nothing was published for it): confirm it, now or (a
    /// synchronous standby) once the instances have applied it.
    pub(super) fn advance(&mut self, repl: &ReplicationClient, lsn: Lsn, carried: bool) {
        if self.published.is_none_or(|p| lsn > p) {
            self.published = Some(lsn);
        }
        if carried && self.carried.is_none_or(|c| lsn > c) {
            self.carried = Some(lsn);
        }
        self.confirm(repl);
    }

    /// Confirms to Postgres the highest position that may be (see [`confirmable`]). The
    /// crate sends a raised position within its status interval, and never moves it back.
    pub(super) fn confirm(&mut self, repl: &ReplicationClient) {
        let Some(published) = self.published else {
            return;
        };
        let now = Instant::now();
        self.look(now);
        let lsn = match self.synchronous {
            None => published.as_u64(),
            Some(lease) => {
                self.reports
                    .retain(|_, (_, seen)| now.saturating_duration_since(*seen) <= lease);
                let waiting = self.since.is_some_and(|s| now.duration_since(s) < lease);
                confirmable(
                    published.as_u64(),
                    self.carried.map(Lsn::as_u64),
                    self.reports.values().map(|r| r.0),
                    waiting.then(|| self.floor.map_or(0, Lsn::as_u64)),
                )
            }
        };
        if lsn > 0 && self.confirmed.is_none_or(|c| lsn > c.as_u64()) {
            self.confirmed = Some(Lsn::from_u64(lsn));
            repl.update_applied_lsn(Lsn::from_u64(lsn));
        }
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
        self.look(now);
        let entry = self.reports.entry(instance.to_string()).or_insert((0, now));
        *entry = (entry.0.max(lsn), now);
        self.confirm(repl);
    }
}

impl Confirmations {
    /// Notes that the relay looks at its confirmations at `now`. A relay that did not run
    /// for a while (its process starved of CPU or paused: more than two turns since its last
    /// look) has not read the reports sent meanwhile, so that time is not the instances'
    /// silence: every report is taken as that much younger. An instance is left out only
    /// after a lease of the relay's own running without a word from it; otherwise a relay
    /// waking from a stall would drop every instance at once and confirm what none has
    /// applied, while they still hold leases from its heartbeats.
    fn look(&mut self, now: Instant) {
        let stalled = self
            .last_look
            .map(|last| now.saturating_duration_since(last))
            .filter(|gap| *gap > 2 * self.turn);
        self.last_look = Some(now);
        if let Some(gap) = stalled {
            for (_, seen) in self.reports.values_mut() {
                *seen += gap;
            }
        }
    }
}

/// What a relay that is a synchronous standby may confirm:
/// - the least position applied by the instances that reported within their lease
///   (`applied`), and past it up to `published` once they have all applied what the last
///   carrying message carried (`carried`: the positions after it changed nothing they hold);
/// - with no instance reporting, `published`, unless the relay became synchronous less than
///   a lease ago (`waiting`: the reports may not have come yet), then what was confirmed
///   when it did.
///
/// An instance silent for its lease is left out: by then its own feed lease has run out
/// and it bypasses L1, so a change it missed is not served from it.
fn confirmable(
    published: u64,
    carried: Option<u64>,
    applied: impl Iterator<Item = u64>,
    waiting: Option<u64>,
) -> u64 {
    match applied.min() {
        None => waiting.unwrap_or(published),
        Some(least) if carried.is_none_or(|c| least >= c) => published,
        Some(least) => least.min(published),
    }
}

/// The walsender's `state` and `sync_state` of the slot named `$1`, for [`synchronous`]
/// (prepared once per relay term).
pub(super) const SYNC_STATE: &str = "SELECT r.state, r.sync_state FROM pg_replication_slots s \
     JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1";

/// Whether Postgres may wait for the stream of `slot` as a synchronous standby:
/// `sync_state` `sync`, `quorum` or `potential` in `pg_stat_replication` (a potential
/// standby takes over from a synchronous one without warning). `None` while the stream is
/// not `streaming` yet: Postgres counts only streaming standbys, so what it says then proves
/// nothing.
///
/// # Errors
/// Postgres failing.
pub(super) async fn synchronous(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    slot: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client.query_opt(statement, &[&slot]).await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (state, sync_state): (Option<String>, Option<String>) = (row.get(0), row.get(1));
    if state.as_deref() != Some("streaming") {
        return Ok(None);
    }
    Ok(Some(matches!(
        sync_state.as_deref(),
        Some("sync" | "quorum" | "potential")
    )))
}

#[cfg(test)]
mod tests {
    use super::{confirmable, Confirmations};
    use std::time::{Duration, Instant};

    #[test]
    fn a_stall_of_the_relay_is_not_the_instances_silence() {
        let lease = Duration::from_secs(1);
        let mut c = Confirmations::new(lease, Duration::from_millis(500));
        let t0 = Instant::now();
        c.look(t0);
        c.reports.insert("b".into(), (7, t0));
        // Looked at every turn: the report ages as time passes.
        c.look(t0 + Duration::from_millis(400));
        assert_eq!(c.reports["b"].1, t0);
        // Then 3 s without a look: the relay did not run; the report is taken as 3 s younger.
        let woke = t0 + Duration::from_millis(3400);
        c.look(woke);
        let seen = c.reports["b"].1;
        assert!(
            woke.saturating_duration_since(seen) <= lease,
            "b still waited for"
        );
        assert_eq!(
            woke.saturating_duration_since(seen),
            Duration::from_millis(400)
        );
    }

    #[test]
    fn a_synchronous_relay_confirms_what_every_reporting_instance_applied() {
        let at = |applied: &[u64]| confirmable(100, Some(90), applied.iter().copied(), None);
        assert_eq!(at(&[]), 100, "nobody to wait for");
        assert_eq!(
            at(&[90, 95]),
            100,
            "all have what was carried: the rest changed nothing"
        );
        assert_eq!(at(&[90, 40]), 40, "one is behind");
        assert_eq!(
            confirmable(100, Some(100), [140].into_iter(), None),
            100,
            "never past what is published"
        );
        assert_eq!(
            confirmable(100, None, [5].into_iter(), None),
            100,
            "nothing carried yet: nothing to wait for"
        );
    }

    #[test]
    fn a_relay_just_made_synchronous_waits_for_the_first_reports() {
        assert_eq!(
            confirmable(100, Some(90), [].into_iter(), Some(60)),
            60,
            "no report yet within the lease: what was confirmed before"
        );
        assert_eq!(confirmable(100, Some(90), [90].into_iter(), Some(60)), 100);
    }
}
