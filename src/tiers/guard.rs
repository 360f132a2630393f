//! The guards against tiers that went back in time: a Redis that is a new incarnation, a
//! Postgres restored, failed over or with its sequence set back. A handle of its own,
//! [`Guards`], shared by the Redis guard task, the feeds, the relay and the auditor. Knows
//! nothing of reads, writes or feeds' messages.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::coherence::{Message, Op};
use crate::db::{Db, PostgresIdentity};
use crate::l1::L1;
use crate::l2::{L2Error, L2};
use crate::model::{now_us, Version};
use crate::resource::{Catalog, CatalogCell};
use crate::telemetry::TIER_RESETS;
use crate::watch::WatchHub;

use super::error::GuardError;
use super::shared::HighWater;

/// What [`Guards::secure_redis`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisCheck {
    /// The incarnation trusted already.
    Same,
    /// A new incarnation another instance already made safe.
    Adopted,
    /// A new incarnation: every resource's generation raised to this version.
    Reset(Version),
    /// Redis refuses `INFO`: trusted without knowing.
    Unknown,
}

/// The guards against a Redis or a Postgres that went back in time, over the pieces they
/// reset: L1, Redis' generations and trust, the version sequence, the watchers. Cheap to
/// clone; built once at start-up (see [`crate::tiers::Tiers::guards`]).
#[derive(Clone)]
pub struct Guards {
    pub(super) l1: Option<L1>,
    pub(super) l2: L2,
    pub(super) db: Db,
    pub(super) high_water: HighWater,
    /// The high-water version last recorded in Redis by this instance.
    pub(super) reported_high_water: Arc<AtomicI64>,
    /// Told when a reset empties L1.
    pub(super) watch: Arc<WatchHub>,
    /// The resources whose generations a reset raises, and the slot the relay streams.
    pub(super) catalog: Arc<CatalogCell>,
    /// The sender of the flushes a reset announces on the Redis feed.
    pub(super) instance_id: Arc<str>,
}

/// Why Postgres, as `now` describes it, went back in time against what was recorded
/// (`system`, `timeline`) and the highest version seen (`high`); empty when it did not.
///
/// A new timeline alone is a promoted standby or a point-in-time recovery, either of which
/// may have lost commits the caches hold copies of. It is no reason when `slot_followed`:
/// the relay's failover slot was synchronized to this server, so the stream continues from
/// a position the relay had applied, and the old timeline's primary was recorded holding
/// decoding back for its standby (`synchronized_standby_slots`), so nothing was ever
/// relayed that this server lacks. See README "Failover to a standby".
fn went_back(
    now: &PostgresIdentity,
    system: Option<&str>,
    timeline: Option<&str>,
    high: Version,
    slot_followed: bool,
) -> Vec<String> {
    let mut why = Vec::new();
    if now.last_version < high {
        why.push(format!(
            "its version sequence is at {} but version {} was seen",
            now.last_version.0, high.0
        ));
    }
    if let (Some(now), Some(was)) = (&now.system, system) {
        if now != was {
            why.push(format!(
                "its system identifier changed from {was} to {now} (another cluster)"
            ));
        }
    }
    if let Some(was) = timeline_moved(now, timeline) {
        if !slot_followed {
            why.push(format!(
                "its timeline changed from {was} to {} (a promoted standby or a point-in-time \
                 recovery, which may have lost commits) and no replication slot synchronized \
                 to it proves the relay's continuity (a failover slot needs Postgres 17 or \
                 later, sync_replication_slots on the standby and the wal source)",
                now.timeline.unwrap_or_default()
            ));
        }
    }
    why
}

/// The recorded timeline when Postgres, as `now` describes it, is on another one.
fn timeline_moved<'a>(now: &PostgresIdentity, timeline: Option<&'a str>) -> Option<&'a str> {
    match (now.timeline, timeline) {
        (Some(now), Some(was)) if now.to_string() != was => Some(was),
        _ => None,
    }
}

impl Guards {
    /// The highest version this instance has seen (see [`Guards::secure_postgres`]).
    pub fn high_water(&self) -> Version {
        self.high_water.get()
    }

    /// Raises the high-water version recorded in Redis to this instance's, if it moved since
    /// the last report, so that instances starting later know it too. Failures are left for
    /// the next report.
    pub async fn report_high_water(&self) {
        let high = self.high_water.get().0;
        if high > self.reported_high_water.load(Ordering::Relaxed)
            && self.l2.raise_high_water(high).await.is_ok()
        {
            self.reported_high_water.fetch_max(high, Ordering::Relaxed);
        }
    }

    /// With Sentinel, moves to the master the Sentinels name if it changed (see
    /// [`L2::follow_master`]); Redis is then distrusted until [`Guards::secure_redis`] has
    /// checked it. Whether it moved.
    ///
    /// # Errors
    /// No Sentinel named a master that answers as one.
    pub async fn follow_redis_master(&self) -> Result<bool, L2Error> {
        self.l2.follow_master().await
    }

    /// Completes when Redis has been distrusted (one waiter: the Redis guard).
    pub async fn redis_distrusted(&self) {
        self.l2.distrusted().await;
    }

    /// Makes sure Redis is an incarnation reads may trust, and trusts it; see
    /// [`RedisCheck`]. A new incarnation (a restart, perhaps from an older RDB or AOF; a
    /// failover, perhaps to a lagging replica) may hold copies older than writes already
    /// acknowledged, which the version rule would then protect. So, once per incarnation
    /// across the fleet (under a row lock in the state table, which records the `run_id`
    /// handled last), every resource's generation is raised to a fresh version: nothing
    /// Redis held before is reachable. Every instance then re-reads the generations and
    /// empties its L1, which may hold copies read from the new incarnation before it was
    /// noticed. Reads skip Redis from a failure until this has run.
    ///
    /// # Errors
    /// Redis or Postgres failing: Redis stays distrusted, and the guard retries.
    pub async fn secure_redis(&self, catalog: &Catalog) -> Result<RedisCheck, GuardError> {
        // A failure after this point may come from yet another incarnation: then the trust
        // below is not granted, and the guard checks again.
        let checked = self.l2.distrusts();
        let id = self.l2.identity().await?;
        if self.l2.follows_sentinel() && (!self.l2.master_named() || id.role != "master") {
            // A demoted master keeps its run_id: without this, it would pass as the same
            // incarnation while the Sentinels have moved on.
            return Err(GuardError::NotMaster {
                node: self.l2.node(),
                role: id.role,
            });
        }
        let Some(run_id) = id.run_id.clone() else {
            if !self.l2.trusted() {
                tracing::debug!("redis refuses INFO: a new incarnation cannot be detected");
            }
            self.l2.trust(None, checked);
            return Ok(RedisCheck::Unknown);
        };
        let known = self.l2.incarnation();
        if known.as_deref() == Some(run_id.as_str()) {
            self.l2.trust(Some(&run_id), checked);
            return Ok(RedisCheck::Same);
        }
        let resources = catalog.all_names();
        let l2 = self.l2.clone();
        let name = format!("redis_run_id:{}", self.l2.prefix());
        let (raised, before) = self
            .db
            .once_per_state(&name, &run_id, |version| async move {
                for resource in &resources {
                    l2.raise_generation(resource, version.0)
                        .await
                        .map_err(|source| GuardError::RaiseGeneration {
                            resource: resource.clone(),
                            source,
                        })?;
                }
                Ok(())
            })
            .await?;
        self.l2
            .load_generations()
            .await
            .map_err(GuardError::Generations)?;
        if known.is_some() {
            if let Some(l1) = &self.l1 {
                l1.clear();
            }
            self.watch
                .reset("redis is a new incarnation; L1 was emptied");
        }
        self.l2.trust(Some(&run_id), checked);
        match raised {
            Some(version) => {
                metrics::counter!(TIER_RESETS, "tier" => "redis", "reason" => "new_incarnation")
                    .increment(1);
                tracing::error!(
                    run_id = %run_id,
                    was = %before,
                    role = %id.role,
                    replid = %id.replid,
                    repl_offset = id.repl_offset,
                    generation = version.0,
                    "redis is a new incarnation (a restart or a failover): what it holds may be \
                     older than acknowledged writes, so every resource's generation was raised \
                     and nothing it held before is read"
                );
                Ok(RedisCheck::Reset(version))
            }
            None if before.is_empty() => {
                tracing::info!(run_id = %run_id, "recorded redis' incarnation");
                Ok(RedisCheck::Adopted)
            }
            None => {
                if known.is_some() {
                    tracing::warn!(run_id = %run_id, "redis is a new incarnation, already made safe by another instance; emptied L1");
                }
                Ok(RedisCheck::Adopted)
            }
        }
    }

    /// Checks that Postgres has not gone back in time since this instance (or, through
    /// Redis' `{prefix}postgres` record, any instance) last looked: the same system and
    /// timeline, and a version sequence at or past every version seen. Run when a Postgres
    /// feed (re)connects and when the relay starts, never on an idle timer. When it went
    /// back, see [`Guards::postgres_went_back`]. Then records what it found. With Redis down
    /// only this instance's memory is compared.
    ///
    /// # Errors
    /// Postgres failing, or the reset failing (the caller retries).
    pub async fn secure_postgres(&self) -> Result<Option<Version>, GuardError> {
        // Everything seen before the sequence is read cannot be above it, unless it went
        // back: the high-water mark first (read after, a write committed meanwhile would look
        // like a sequence gone back).
        let record = self.l2.postgres_record().await.ok();
        let recorded = |field: &str| record.as_ref().and_then(|r| r.get(field)).cloned();
        let recorded_high: i64 = recorded("high_water")
            .and_then(|h| h.parse().ok())
            .unwrap_or(0);
        let high = self.high_water.get().max(Version(recorded_high));
        let id = self.db.identity().await?;
        let timeline = recorded("timeline");
        let moved = timeline_moved(&id, timeline.as_deref());
        // The slot followed, and on the timeline left the primary held decoding back for
        // its standby: nothing relayed is missing here.
        let guarded =
            moved.is_some_and(|was| recorded(&format!("failover_guarded:{was}")).is_some());
        let followed = guarded && self.slot_followed().await;
        let why = went_back(
            &id,
            recorded("system").as_deref(),
            timeline.as_deref(),
            high,
            followed,
        );
        if moved.is_some() || !why.is_empty() {
            // Another server answers: its version stamp's library may not load there
            // (README "The C stamp"); the schema task checks and mends it.
            self.catalog.suspect_stamp();
        }
        if let (Some(was), true) = (moved, why.is_empty()) {
            tracing::warn!(
                from = %was,
                to = ?id.timeline,
                "postgres is on a new timeline (a promoted standby): the relay's replication \
                 slot was synchronized to it, so the caches are kept and the relay continues \
                 from the slot"
            );
        }
        let reset = if why.is_empty() {
            None
        } else {
            Some(self.postgres_went_back(high, &why.join("; ")).await?)
        };
        self.high_water.saw(id.last_version);
        if record.is_some() {
            let _ = self
                .l2
                .record_postgres(id.system.as_deref(), id.timeline, self.high_water.get().0)
                .await;
        }
        Ok(reset)
    }

    /// Whether the relay's replication slot on this server was synchronized from the primary
    /// it replaced (see [`went_back`]); `false` for the other sources, whose position no
    /// slot keeps, and when it cannot be read.
    async fn slot_followed(&self) -> bool {
        let Ok(catalog) = self.catalog.get() else {
            return false;
        };
        if catalog.capture.source != crate::config::PostgresSource::Wal {
            return false;
        }
        self.db
            .slot_synced(&catalog.capture.slot)
            .await
            .unwrap_or(false)
    }

    /// Postgres went back in time (`why`): caches may hold versions it will hand out again
    /// for other data, or copies of commits it lost. Moves the version sequence past `high`,
    /// raises every resource's generation to a fresh version (nothing cached in Redis is
    /// reachable), tells every instance to empty L1 (a flush message per resource on the
    /// Redis feed), empties this one's. Counted in `syncar_tier_resets_total{tier="postgres"}`,
    /// logged at error level. Returns the generation.
    ///
    /// # Errors
    /// Postgres or Redis failing: the caches are not known clean, so the caller retries.
    pub async fn postgres_went_back(
        &self,
        high: Version,
        why: &str,
    ) -> Result<Version, GuardError> {
        self.db.advance_sequence(high).await?;
        let version = self.db.next_version().await?;
        let catalog = self.catalog.get()?;
        for resource in catalog.all_names() {
            self.l2
                .raise_generation(&resource, version.0)
                .await
                .map_err(|source| GuardError::RaiseGeneration {
                    resource: resource.clone(),
                    source,
                })?;
            let flush = Message {
                resource: resource.clone(),
                key: None,
                version: version.0,
                op: Op::Flush,
                ts_us: Some(now_us()),
                instance: Some(self.instance_id.to_string()),
            };
            if let Ok(text) = serde_json::to_string(&flush) {
                let _ = self.l2.publish(&self.l2.invalidation_channel(), text).await;
            }
        }
        if let Some(l1) = &self.l1 {
            l1.clear();
        }
        self.watch
            .reset("postgres went back in time; every cache was reset");
        self.high_water.saw(version);
        let _ = self.l2.raise_high_water(version.0).await;
        metrics::counter!(TIER_RESETS, "tier" => "postgres", "reason" => "went_back").increment(1);
        tracing::error!(
            why,
            generation = version.0,
            "postgres went back in time: moved its version sequence past every version seen, \
             and made every cached copy unreachable"
        );
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres(system: &str, timeline: i32, last: i64) -> PostgresIdentity {
        PostgresIdentity {
            system: Some(system.into()),
            timeline: Some(timeline),
            last_version: Version(last),
        }
    }

    #[test]
    fn postgres_went_back_by_sequence_cluster_or_timeline() {
        let same = postgres("71", 1, 100);
        assert!(went_back(&same, Some("71"), Some("1"), Version(100), false).is_empty());
        assert!(
            went_back(&same, None, None, Version(0), false).is_empty(),
            "nothing recorded yet"
        );
        let behind = went_back(&same, Some("71"), Some("1"), Version(101), false);
        assert!(behind[0].contains("sequence is at 100"), "{behind:?}");
        let other = went_back(
            &postgres("72", 1, 500),
            Some("71"),
            Some("1"),
            Version(100),
            true,
        );
        assert!(other[0].contains("another cluster"), "{other:?}");
        let promoted = went_back(
            &postgres("71", 2, 500),
            Some("71"),
            Some("1"),
            Version(100),
            false,
        );
        assert!(
            promoted[0].contains("timeline changed from 1 to 2"),
            "{promoted:?}"
        );
        assert!(
            went_back(
                &postgres("71", 2, 500),
                Some("71"),
                Some("1"),
                Version(100),
                true
            )
            .is_empty(),
            "a promoted standby the relay's slot was synchronized to continues"
        );
        let promoted_behind = went_back(
            &postgres("71", 2, 90),
            Some("71"),
            Some("1"),
            Version(100),
            true,
        );
        assert!(
            promoted_behind.len() == 1 && promoted_behind[0].contains("sequence is at 90"),
            "a synchronized slot does not excuse a sequence that went back: {promoted_behind:?}"
        );
        let unreadable = PostgresIdentity {
            system: None,
            timeline: None,
            last_version: Version(500),
        };
        assert!(
            went_back(&unreadable, Some("71"), Some("1"), Version(100), false).is_empty(),
            "a role that may not read pg_control_* compares the sequence only"
        );
    }
}
