//! What the relay tells Postgres it has done: a position is confirmed (the slot may move
//! past it, and a commit that waits for this relay as a synchronous standby returns) once
//! everything up to it is in Redis and published, and, while Postgres counts the relay as a
//! synchronous standby, once every live instance has applied it too ("committed means
//! evicted"; see ARCHITECTURE "Synchronous mode" and Postgres' "Synchronous Replication").

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// Since when it is synchronous: for one lease after that, an instance that may hold a
    /// lease has perhaps not reported yet, and nothing past what was confirmed then is
    /// confirmed, unless every instance the last relay listed (`expected`) has reported.
    since: Option<Instant>,
    /// The instances the previous synchronous relay listed (read from Redis at the term's
    /// start, see [`Confirmations::expect`]): only they may hold a lease it granted. `None`
    /// when not known (none recorded, or this relay was asynchronous until now and its own
    /// heartbeats vouched for every instance): then the wait lasts the whole lease.
    expected: Option<HashSet<String>>,
    /// What was confirmed when it became synchronous.
    floor: Option<Lsn>,
    /// What each instance reported: the position it applied, its report's number, and when
    /// the report came.
    reports: HashMap<String, Report>,
    /// The position of the last heartbeat published: the first report of each instance
    /// at or past it calls for an echo (see [`Confirmations::reported`]).
    beat: u64,
    /// How often, at the longest, the relay's loop looks at its confirmations when it runs
    /// (the lease's renewal); a longer gap between two looks means the relay itself did not
    /// run (starved of CPU, paused), see [`Confirmations::confirm`].
    turn: Duration,
    /// When the confirmations were last looked at.
    last_look: Option<Instant>,
}

/// An instance's last report.
#[derive(Clone, Copy, Debug)]
struct Report {
    /// The highest position it reported applying (an LSN as a number).
    applied: u64,
    /// The number of its last report (see [`crate::coherence::ReportAnchors`]); 0 from an
    /// instance of an earlier release, which numbers none.
    seq: u64,
    /// When the relay read it.
    seen: Instant,
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

    /// Starts (`Some(lease)`) or stops waiting for the instances' reports. Starting, it
    /// waits a lease for every instance (its asynchronous heartbeats vouched for them all).
    pub(super) fn set_synchronous(&mut self, lease: Option<Duration>) {
        if lease.is_some() && self.synchronous.is_none() {
            self.since = Some(Instant::now());
            self.floor = self.confirmed;
            self.expected = None;
        }
        self.synchronous = lease;
    }

    /// The instances the previous synchronous relay listed, as recorded in Redis (`None`:
    /// nothing recorded). The term's first lease ends early once each has reported.
    pub(super) fn expect(&mut self, listed: Option<Vec<String>>) {
        self.expected = listed.map(|l| l.into_iter().collect());
    }

    /// What a heartbeat lists while synchronous (`None` otherwise): every instance waited
    /// for, with the number of its last report (see [`crate::coherence::ReportAnchors`]).
    pub(super) fn listed(&mut self) -> Option<BTreeMap<String, u64>> {
        let lease = self.synchronous?;
        let now = Instant::now();
        self.look(now);
        self.forget_silent(now, lease);
        Some(
            self.reports
                .iter()
                .map(|(id, r)| (id.clone(), r.seq))
                .collect(),
        )
    }

    /// The instances that may hold a lease while this relay is synchronous, to record in
    /// Redis for a successor: those it lists, and while its first lease lasts, those its
    /// predecessor listed that have not reported yet.
    pub(super) fn to_record(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.reports.keys().cloned().collect();
        if self.waiting(Instant::now()) {
            if let Some(expected) = &self.expected {
                ids.extend(
                    expected
                        .iter()
                        .filter(|id| !self.reports.contains_key(*id))
                        .cloned(),
                );
            }
        }
        ids.sort();
        ids
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
                self.forget_silent(now, lease);
                let waiting = self.waiting(now);
                confirmable(
                    published.as_u64(),
                    self.carried.map(Lsn::as_u64),
                    self.reports.values().map(|r| r.applied),
                    waiting.then(|| self.floor.map_or(0, Lsn::as_u64)),
                )
            }
        };
        if lsn > 0 && self.confirmed.is_none_or(|c| lsn > c.as_u64()) {
            tracing::trace!(
                lsn,
                published = published.as_u64(),
                carried = ?self.carried.map(Lsn::as_u64),
                synchronous = self.synchronous.is_some(),
                instances = self.reports.len(),
                "confirming a position to postgres"
            );
            self.confirmed = Some(Lsn::from_u64(lsn));
            repl.update_applied_lsn(Lsn::from_u64(lsn));
        }
    }

    /// An instance's report of the position it applied (`"{instance} {lsn} {seq}"`, see
    /// [`crate::feed::relayed::applied_channel`]; an earlier release sends no `seq`);
    /// anything else is ignored.
    ///
    /// Returns whether an echo is due: the relay is synchronous and this is the
    /// instance's first report of the last heartbeat's position (it counts its lease from
    /// the report once echoed, see [`crate::coherence::ReportAnchors`]).
    pub(super) fn reported(&mut self, repl: &ReplicationClient, payload: &[u8]) -> bool {
        let Some(reached_beat) = self.note_report(payload, Instant::now()) else {
            return false;
        };
        self.confirm(repl);
        reached_beat && self.is_synchronous()
    }

    /// A heartbeat at `lsn` was published.
    pub(super) fn beat(&mut self, lsn: Lsn) {
        self.beat = self.beat.max(lsn.as_u64());
    }
}

impl Confirmations {
    /// Records a report read at `now`: whether it is the instance's first to reach the
    /// last heartbeat's position, `None` if it is not a report.
    fn note_report(&mut self, payload: &[u8], now: Instant) -> Option<bool> {
        let text = String::from_utf8_lossy(payload);
        let mut parts = text.split(' ');
        let (Some(instance), Some(Ok(applied))) =
            (parts.next(), parts.next().map(str::parse::<u64>))
        else {
            return None;
        };
        let seq = parts
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        self.look(now);
        let report = self.reports.entry(instance.to_string()).or_insert(Report {
            applied: 0,
            seq,
            seen: now,
        });
        let before = report.applied;
        tracing::trace!(instance, applied, seq, "an instance's report");
        // Reports come in the order the instance sent them (one connection): the last
        // one's number is the one to echo.
        *report = Report {
            applied: report.applied.max(applied),
            seq,
            seen: now,
        };
        Some(self.beat > 0 && before < self.beat && applied >= self.beat)
    }

    /// Stops waiting for instances silent for `lease`: by then their own leases ran out.
    fn forget_silent(&mut self, now: Instant, lease: Duration) {
        self.reports
            .retain(|_, r| now.saturating_duration_since(r.seen) <= lease);
    }

    /// Whether the term's (or the synchronous mode's) first lease still holds back
    /// confirmations: it has not elapsed, and some instance that may hold a lease from an
    /// earlier relay has not reported yet (all of them, when which ones is not known).
    fn waiting(&self, now: Instant) -> bool {
        let (Some(since), Some(lease)) = (self.since, self.synchronous) else {
            return false;
        };
        if now.saturating_duration_since(since) >= lease {
            return false;
        }
        match &self.expected {
            None => true,
            Some(expected) => !expected.iter().all(|id| self.reports.contains_key(id)),
        }
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
            for report in self.reports.values_mut() {
                report.seen += gap;
            }
        }
    }
}

/// What a relay that is a synchronous standby may confirm:
/// - while it waits for the first reports of its term (`waiting`: an instance holding a
///   lease from an earlier relay has not reported yet), what was confirmed before;
/// - else the least position applied by the instances that reported within their lease
///   (`applied`), and past it up to `published` once they have all applied what the last
///   carrying message carried (`carried`: the positions after it changed nothing they hold);
/// - with no instance reporting, `published`.
///
/// An instance silent for its lease is left out: by then its own feed lease has run out
/// and it bypasses L1, so a change it missed is not served from it.
fn confirmable(
    published: u64,
    carried: Option<u64>,
    applied: impl Iterator<Item = u64>,
    waiting: Option<u64>,
) -> u64 {
    if let Some(floor) = waiting {
        return floor.min(published);
    }
    match applied.min() {
        None => published,
        Some(least) if carried.is_none_or(|c| least >= c) => published,
        Some(least) => least.min(published),
    }
}

/// The walsender's `state`, `sync_state` and whether its flush position is valid, for the
/// slot named `$1` (see [`synchronous`]; prepared once per relay term).
pub(super) const SYNC_STATE: &str = "SELECT r.state, r.sync_state, r.flush_lsn IS NOT NULL \
     FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
     WHERE s.slot_name = $1";

/// Whether Postgres may wait for the stream of `slot` as a synchronous standby (see
/// [`says_synchronous`]); `None` when what `pg_stat_replication` shows of it proves nothing.
///
/// # Errors
/// Postgres failing.
pub(super) async fn synchronous(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    slot: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client.query_opt(statement, &[&slot]).await?;
    Ok(row.and_then(|row| {
        let (state, sync_state, flushed): (Option<String>, Option<String>, bool) =
            (row.get(0), row.get(1), row.get(2));
        says_synchronous(state.as_deref(), sync_state.as_deref(), flushed)
    }))
}

/// What a walsender's row of `pg_stat_replication` says of whether Postgres may wait for it
/// as a synchronous standby: `sync_state` `sync`, `quorum` or `potential` (a potential
/// standby takes over from a synchronous one without warning). `None` when the row proves
/// nothing:
/// - `state` is not `streaming`: Postgres counts only streaming standbys;
/// - no flush position was reported yet (`flushed` false: `flush_lsn` is NULL): Postgres
///   shows such a walsender as `async` whatever `synchronous_standby_names` says
///   (`pg_stat_get_wal_senders` in walsender.c gives it priority 0, meant for
///   pg_basebackup), yet takes it as a synchronous standby the moment it reports one. A
///   relay's new term reports none before its first confirmation: taking that `async` at
///   its word, it confirmed on publish for a whole renewal, commits returning before the
///   instances had applied them.
fn says_synchronous(state: Option<&str>, sync_state: Option<&str>, flushed: bool) -> Option<bool> {
    if state != Some("streaming") || !flushed {
        return None;
    }
    Some(matches!(sync_state, Some("sync" | "quorum" | "potential")))
}

#[cfg(test)]
mod tests {
    use super::{confirmable, says_synchronous, Confirmations, Report};
    use std::time::{Duration, Instant};

    #[test]
    fn a_walsender_that_reported_no_flush_position_proves_nothing() {
        let streaming = Some("streaming");
        for sync_state in ["sync", "quorum", "potential"] {
            assert_eq!(
                says_synchronous(streaming, Some(sync_state), true),
                Some(true)
            );
        }
        assert_eq!(
            says_synchronous(streaming, Some("async"), true),
            Some(false)
        );
        assert_eq!(
            says_synchronous(streaming, Some("async"), false),
            None,
            "Postgres shows a walsender without a flush position as async"
        );
        assert_eq!(says_synchronous(Some("catchup"), Some("sync"), true), None);
        assert_eq!(says_synchronous(None, None, false), None);
    }

    #[test]
    fn a_stall_of_the_relay_is_not_the_instances_silence() {
        let lease = Duration::from_secs(1);
        let mut c = Confirmations::new(lease, Duration::from_millis(500));
        let t0 = Instant::now();
        c.look(t0);
        c.reports.insert(
            "b".into(),
            Report {
                applied: 7,
                seq: 1,
                seen: t0,
            },
        );
        // Looked at every turn: the report ages as time passes.
        c.look(t0 + Duration::from_millis(400));
        assert_eq!(c.reports["b"].seen, t0);
        // Then 3 s without a look: the relay did not run; the report is taken as 3 s younger.
        let woke = t0 + Duration::from_millis(3400);
        c.look(woke);
        let seen = c.reports["b"].seen;
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
        assert_eq!(
            confirmable(100, Some(90), [90].into_iter(), Some(60)),
            60,
            "some reported, not every one that may hold a lease"
        );
        assert_eq!(confirmable(100, Some(90), [90].into_iter(), None), 100);
    }

    #[test]
    fn a_new_term_waits_for_the_instances_its_predecessor_listed() {
        let lease = Duration::from_secs(1);
        let mut c = Confirmations::new(lease, Duration::from_millis(500));
        let t0 = c.since.unwrap();
        assert!(c.waiting(t0), "nothing known: the whole lease");
        c.expect(Some(vec!["a".into(), "b".into()]));
        assert!(c.note_report(b"a 50 7", t0).is_some());
        assert!(c.waiting(t0), "b may still hold a lease");
        assert_eq!(c.to_record(), ["a", "b"], "b passed on to a successor");
        assert!(c.note_report(b"b 40 3", t0).is_some());
        assert!(!c.waiting(t0), "every listed instance reported");
        assert_eq!(c.to_record(), ["a", "b"]);
        // Nothing recorded: the lease runs out before anything new is confirmed.
        let mut c = Confirmations::new(lease, Duration::from_millis(500));
        let t0 = c.since.unwrap();
        c.note_report(b"a 50 7", t0);
        assert!(c.waiting(t0 + Duration::from_millis(999)));
        assert!(!c.waiting(t0 + lease));
        // Becoming synchronous within a term: every instance may hold an asynchronous lease.
        let mut c = Confirmations::new(lease, Duration::from_millis(500));
        c.expect(Some(vec![]));
        c.set_synchronous(None);
        c.set_synchronous(Some(lease));
        assert!(c.waiting(c.since.unwrap()));
    }

    #[test]
    fn a_heartbeat_lists_the_last_report_of_every_instance_heard_within_the_lease() {
        let lease = Duration::from_secs(1);
        let mut c = Confirmations::new(lease, Duration::from_secs(5));
        let now = Instant::now();
        assert_eq!(
            c.note_report(b"a 50 7", now),
            Some(false),
            "no heartbeat yet"
        );
        assert!(
            c.note_report(b"a 40 8", now).is_some(),
            "a lower position is still a report"
        );
        assert!(
            c.note_report(b"old 60", now).is_some(),
            "an earlier release numbers none"
        );
        assert_eq!(c.note_report(b"garbage", now), None);
        assert_eq!(c.note_report(b"b x 1", now), None);
        let listed = c.listed().unwrap();
        assert_eq!(listed.get("a"), Some(&8), "the last report's number");
        assert_eq!(c.reports["a"].applied, 50, "applied never moves back");
        assert_eq!(listed.get("old"), Some(&0));
        // The first report of each instance to reach a heartbeat's position calls for an
        // echo, once.
        c.beat(pgwire_replication::Lsn::from_u64(55));
        assert_eq!(c.note_report(b"a 55 9", now), Some(true));
        assert_eq!(c.note_report(b"a 56 10", now), Some(false));
        c.reports.get_mut("old").unwrap().seen = now - 2 * lease;
        assert!(
            !c.listed().unwrap().contains_key("old"),
            "silent for its lease"
        );
        c.set_synchronous(None);
        assert_eq!(c.listed(), None, "an asynchronous relay lists nobody");
    }
}
