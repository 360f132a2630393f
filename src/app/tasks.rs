//! The long-lived tasks start-up spawns besides the listeners and the feeds: the schema
//! task (migrate, load the catalog, follow the tables' shapes), the auditor, the Redis guard,
//! the changes log's pruning and the metrics' upkeep. Each ends on its shutdown token; none
//! is spawned here (start-up spawns them all, in one place).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::commands::with_connection;
use crate::backoff::{jitter, ticker, Backoff};
use crate::config::{Config, Stamp};
use crate::db::Db;
use crate::redact::Secrets;
use crate::resource::CatalogCell;
use crate::schema::{load_catalog, migrate};
use crate::telemetry::{error_chain, L1_BYTES, L1_ENTRIES};
use crate::tiers::{Guards, Tiers};

/// Longest pause between attempts to migrate and load the schema.
const SCHEMA_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Migrates (unless disabled) and loads the catalog, retrying with backoff until it works;
/// then follows the tables' shapes ([`follow_shapes`]).
pub(super) async fn schema_task(
    config: Arc<Config>,
    catalog: Arc<CatalogCell>,
    db: Db,
    tiers: Tiers,
    secrets: Secrets,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), SCHEMA_MAX_BACKOFF);
    let mut last_error = String::new();
    loop {
        let attempt = with_connection(&config, |mut client| {
            let config = config.clone();
            async move {
                let (changes, differences, warnings) = if config.postgres.migrate_on_start {
                    let migration = migrate(&mut client, &config).await?;
                    (migration.changes, Vec::new(), migration.warnings)
                } else {
                    // Installed by the DBA: say what differs from what this configuration
                    // needs, each difference by name.
                    let planned = crate::schema::plan(&mut client, &config).await?.0;
                    (Vec::new(), planned.changes, planned.warnings)
                };
                let catalog = load_catalog(&mut client, &config).await?;
                Ok((changes, differences, warnings, catalog))
            }
        });
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok((changes, differences, warnings, loaded)) => {
                for change in &changes {
                    tracing::info!(change = %change, "migrated");
                }
                for warning in &warnings {
                    tracing::warn!(warning = %warning, "the migration found what it may not change");
                }
                for difference in &differences {
                    tracing::warn!(
                        missing = %difference,
                        "postgres.migrate_on_start = false and the installed schema differs \
                         from what this configuration needs; `syncar migrate --print-sql` \
                         prints the SQL that fixes it"
                    );
                }
                for (resource, reason) in loaded.all_unavailable() {
                    tracing::error!(
                        resource,
                        reason = %secrets.scrub(reason),
                        "resource unavailable: its requests answer 503 until the table is fixed"
                    );
                }
                catalog.set(loaded);
                tracing::info!("schema ready; serving documents");
                return follow_shapes(&config, &catalog, &db, &tiers, &secrets, &shutdown).await;
            }
            Err(e) => {
                let message = secrets.scrub(&error_chain(&e));
                if message != last_error {
                    tracing::warn!(error = %message, "schema not ready; retrying");
                    last_error = message.clone();
                }
                catalog.not_ready(message);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
}

/// How long a C stamp that could not be mended waits for the next try.
const STAMP_RETRY: Duration = Duration::from_secs(1);

/// The shortest time between two shape rechecks.
const RECHECK_PAUSE: Duration = Duration::from_millis(50);

/// How often the tables' shapes are compared with the catalog's when nothing asked: a
/// safety net under the flushes that announce a change (see [`crate::schema::shape`]).
const SHAPES_RECHECK: Duration = Duration::from_secs(30);

/// Loads the catalog again whenever a configured table's live shape differs from the one
/// the catalog was read in: when asked ([`CatalogCell::request_recheck`]: a flush was heard,
/// a statement found a column missing), and every [`SHAPES_RECHECK`]. A resource whose table
/// no longer fits goes unavailable with the reason, one that fits again comes back; the
/// others are untouched. Copies of the old shape are retired by the flush the change was
/// announced with, not here. After each recheck: the `wal` publication kept to tables with
/// a replica identity ([`republish`]), syncar's triggers enabled always ([`rearm`]), the C
/// stamp mended where it does not load ([`heal_stamp`]), and syncar installed on tables that
/// came to fit ([`InstallNew`]).
async fn follow_shapes(
    config: &Config,
    catalog: &CatalogCell,
    db: &Db,
    tiers: &Tiers,
    secrets: &Secrets,
    shutdown: &CancellationToken,
) {
    // When a C stamp that could not be mended (or was looked at a moment ago) is looked at
    // again, and when it last was: at most once per STAMP_RETRY, since each look is an
    // error line in Postgres' log (a storm of statements failing on a changed table
    // suspects it at every recheck).
    let mut stamp_retry: Option<tokio::time::Instant> = None;
    let mut stamp_probed: Option<tokio::time::Instant> = None;
    let mut install = InstallNew::default();
    loop {
        let now = tokio::time::Instant::now();
        let wait = match stamp_retry {
            Some(at) => at.saturating_duration_since(now),
            None => jitter(SHAPES_RECHECK, 0.2),
        };
        // A failed install is tried again after its pause, not only at the next recheck.
        let wait = match install.not_before {
            Some(at) if at > now => wait.min(at - now),
            _ => wait,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = catalog.recheck_requested() => {}
            _ = tokio::time::sleep(wait) => {}
        };
        // A table that no longer fits is flushed at each write: at most one check per
        // RECHECK_PAUSE whatever asks (requests meanwhile are folded into this one).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECHECK_PAUSE) => {}
        }
        let covered = catalog.requests_made();
        let Ok(current) = catalog.get() else {
            continue;
        };
        let reloaded = match db.table_shapes(&config.resources).await {
            Ok(live) if live == current.shapes => Ok(None),
            Ok(_) => {
                // Told of the change by a trigger's flush (or a failed statement) before
                // the relay or a poller looked: announce it, so that a change undone
                // before they look is announced too, and every instance follows it back.
                if let Err(e) = db
                    .announce_shape_changes(config, current.capture.source)
                    .await
                {
                    tracing::warn!(error = %secrets.scrub(&crate::telemetry::error_chain(&e)), "announcing a table's new shape failed");
                }
                db.load_catalog(config).await.map(Some)
            }
            Err(e) => Err(e),
        };
        let mut check_stamp = catalog.take_stamp_suspect()
            || stamp_retry.is_some_and(|at| at <= tokio::time::Instant::now());
        match reloaded {
            Ok(Some(loaded)) => {
                check_stamp = true;
                for r in &config.resources {
                    let (was, now) = (current.unavailable(&r.name), loaded.unavailable(&r.name));
                    match (was, now) {
                        (_, Some(reason))
                            if was != now
                                && config.postgres.migrate_on_start
                                && loaded.uninstalled().contains(&r.name) =>
                        {
                            // Fixed by this task in a moment, not by the customer.
                            tracing::info!(
                                resource = %r.name,
                                reason = %secrets.scrub(reason),
                                "resource unavailable until syncar is installed on its table"
                            )
                        }
                        (_, Some(reason)) if was != now => tracing::error!(
                            resource = %r.name,
                            reason = %secrets.scrub(reason),
                            "resource unavailable after its table changed: its requests answer \
                             503 until the table fits again"
                        ),
                        (Some(_), None) => {
                            tracing::info!(resource = %r.name, "resource available again")
                        }
                        _ if current.shapes.get(&r.name) != loaded.shapes.get(&r.name) => {
                            tracing::info!(resource = %r.name, "resource reloaded: its table changed")
                        }
                        _ => {}
                    }
                }
                catalog.replace(loaded);
                // After the new catalog is in place: reads from now on name the new shape's
                // ETag, and what L1 holds may be of the old one.
                tiers.clear_l1_for_new_shapes();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %secrets.scrub(&crate::telemetry::error_chain(&e)), "checking the tables' shapes failed")
            }
        }
        republish(config, catalog, db, secrets).await;
        rearm(config, catalog, db, secrets).await;
        let now = tokio::time::Instant::now();
        match stamp_probed.map(|at| at + STAMP_RETRY) {
            Some(next) if check_stamp && next > now => stamp_retry = Some(next),
            _ if check_stamp => {
                stamp_probed = Some(now);
                // Not mended (Postgres failing, the migration's locks busy): tried again
                // after a pause rather than at once.
                stamp_retry = (!heal_stamp(config, db, secrets).await).then(|| now + STAMP_RETRY);
            }
            _ => {}
        }
        // After the stamp is mended: customers' writes may be failing on it, and this may
        // take up to INSTALL_LIMIT.
        install.run(config, catalog, secrets).await;
        catalog.rechecked(covered);
    }
}

/// Keeps the `wal` source's publication to the tables Postgres lets it publish
/// ([`crate::schema::republish`]): a table that lost its replica identity out (else the
/// customer's UPDATE and DELETE on it fail), one that has it again back, with a flush. The
/// catalog is read again after a change (the flush makes the other instances do the same).
async fn republish(config: &Config, catalog: &CatalogCell, db: &Db, secrets: &Secrets) {
    let Ok(current) = catalog.get() else {
        return;
    };
    if current.capture.source != crate::config::PostgresSource::Wal {
        return;
    }
    if !config.postgres.migrate_on_start {
        // The DBA's to change; the reason each resource is unavailable says what to do.
        return;
    }
    if current.all_unavailable().is_empty() {
        // Every table fits, its replica identity included, and is published: nothing to
        // do, and nothing asked of Postgres.
        return;
    }
    match db
        .republish(config, &current.capture.publication, current.unpublished())
        .await
    {
        Ok(changes) if changes.is_empty() => {}
        Ok(changes) => {
            for change in &changes {
                tracing::warn!(change = %change, "publication changed");
            }
            catalog.request_recheck();
        }
        Err(crate::db::CatalogError::Schema(e)) if e.is_lock_timeout() => {
            // A customer's transaction holds the table: again at once (a recheck is at
            // least RECHECK_PAUSE away), while its UPDATE and DELETE may be failing.
            tracing::debug!(error = %e, "the publication's table is locked; retrying");
            catalog.request_recheck();
        }
        Err(e) => tracing::error!(
            error = %secrets.scrub(&error_chain(&e)),
            "keeping the publication to tables with a replica identity failed; retrying at the \
             next recheck"
        ),
    }
}

/// Enables syncar's triggers `ALWAYS` again where they are enabled for some sessions only
/// ([`crate::resource::Catalog::disarmed`]: `ALTER TABLE ... ENABLE TRIGGER ALL` after a
/// bulk load leaves them so; [`crate::schema::rearm`]), with `postgres.migrate_on_start`;
/// the catalog is read again after a change (the change of shape makes the other instances
/// do the same). A disabled trigger is left alone: the customer disabled it, and the
/// resource stays unavailable until it is enabled.
async fn rearm(config: &Config, catalog: &CatalogCell, db: &Db, secrets: &Secrets) {
    let Ok(current) = catalog.get() else {
        return;
    };
    if current.disarmed().is_empty() || !config.postgres.migrate_on_start {
        // Nothing to do, or the DBA's to do: the reason each resource is unavailable says
        // what.
        return;
    }
    match db.rearm(config, current.disarmed()).await {
        Ok(changes) if changes.is_empty() => {}
        Ok(changes) => {
            for change in &changes {
                tracing::warn!(change = %change, "trigger changed");
            }
            catalog.request_recheck();
        }
        Err(crate::db::CatalogError::Schema(e)) if e.is_lock_timeout() => {
            // A customer's transaction holds the table: at the next recheck (one asked for
            // by a flush, or the periodic one), not at once, since each try queues the
            // table's writers behind it for up to lock_timeout.
            tracing::debug!(error = %e, "the table is locked; enabling its triggers later");
        }
        Err(e) => tracing::error!(
            error = %secrets.scrub(&error_chain(&e)),
            "enabling syncar's triggers always again failed; retrying at the next recheck"
        ),
    }
}

/// How long the schema task gives a migration installing a table that came to fit: the
/// tables' other changes wait for it meanwhile.
const INSTALL_LIMIT: Duration = Duration::from_secs(10);

/// The longest pause between two tries of [`InstallNew::run`] that failed.
const INSTALL_MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Installs syncar on configured tables that came to fit, with `postgres.migrate_on_start`
/// ([`InstallNew::run`]), pausing longer after each failure.
struct InstallNew {
    /// No try before this, after a failure.
    not_before: Option<tokio::time::Instant>,
    backoff: Backoff,
    /// The last failure said, so that a repeated one is not said again at error level.
    last_error: String,
}

impl Default for InstallNew {
    fn default() -> Self {
        InstallNew {
            not_before: None,
            backoff: Backoff::new(Duration::from_secs(1), INSTALL_MAX_BACKOFF),
            last_error: String::new(),
        }
    }
}

impl InstallNew {
    /// Runs the migration when a configured table fits but carries none of syncar's
    /// triggers ([`crate::resource::Catalog::uninstalled`]: created after the migration
    /// ran, as when the app's own schema migration runs beside syncar's rollout, dropped and
    /// created again, or made to fit since: a unique index on its key, `SET LOGGED`): what
    /// a restart would do, without one. Only where syncar is still installed (never after
    /// `syncar uninstall`, which also refuses while an instance is connected). The
    /// migration's lock makes the fleet run it once; the new triggers change the table's
    /// shape, so every instance reloads it with a flush. A failure (a customer's lock held
    /// past the migration's retries, the migration's own lock held by another session past
    /// `postgres.statement_timeout`, a role that may not alter the table) is tried again
    /// after a pause that doubles up to [`INSTALL_MAX_BACKOFF`] (the schema task wakes for
    /// it).
    async fn run(&mut self, config: &Config, catalog: &CatalogCell, secrets: &Secrets) {
        let Ok(current) = catalog.get() else {
            return;
        };
        if current.uninstalled().is_empty() || !config.postgres.migrate_on_start {
            // Nothing (left) to install: a later table starts from the first pause.
            self.not_before = None;
            self.backoff.reset();
            self.last_error.clear();
            return;
        }
        if self
            .not_before
            .is_some_and(|at| at > tokio::time::Instant::now())
        {
            return;
        }
        let migrated = with_connection(config, |mut client| async move {
            if !crate::schema::capture::installed(&client, &config.postgres.schema).await? {
                return Ok(None);
            }
            Ok(Some(migrate(&mut client, config).await?))
        });
        let failure = match tokio::time::timeout(INSTALL_LIMIT, migrated).await {
            Ok(Ok(migration)) => {
                for change in migration.iter().flat_map(|m| &m.changes) {
                    tracing::info!(change = %change, "migrated");
                }
                if migration.is_some_and(|m| !m.changes.is_empty()) {
                    catalog.request_recheck();
                }
                self.not_before = None;
                self.backoff.reset();
                self.last_error.clear();
                return;
            }
            Ok(Err(e)) => secrets.scrub(&error_chain(&e)),
            Err(_) => format!("the migration took longer than {INSTALL_LIMIT:?}"),
        };
        let pause = self.backoff.next_pause();
        self.not_before = Some(tokio::time::Instant::now() + pause);
        if failure != self.last_error {
            tracing::error!(
                resources = ?current.uninstalled(),
                error = %failure,
                retry_in_s = pause.as_secs(),
                "installing syncar on tables that came to fit failed; they stay unavailable \
                 until it succeeds"
            );
            self.last_error = failure;
        } else {
            tracing::debug!(error = %failure, "installing syncar on tables that came to fit failed again");
        }
    }
}

/// Puts the PL/pgSQL stamp back on the configured tables whose C stamp cannot run on this
/// Postgres server (README "The C stamp"): its library does not load, so every write to
/// them fails, the customer's own included (a promoted standby without the package). Checked
/// when the stamp is suspected ([`CatalogCell::suspect_stamp`]: Postgres moved to a new
/// timeline, or a write through syncar failed as on a changed table, which then retries)
/// and when a table changed shape; not at every recheck, since the probe is an error in
/// Postgres' log. Whatever `postgres.stamp` asks: a failing customer statement is worse
/// than a slower stamp.
///
/// Returns whether the stamp is known good or was mended (`false`: to try again).
async fn heal_stamp(config: &Config, db: &Db, secrets: &Secrets) -> bool {
    let why = match db.broken_c_stamp(config).await {
        Ok(Some(why)) => why,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(error = %secrets.scrub(&error_chain(&e)), "checking the C version stamp failed");
            return false;
        }
    };
    if !config.postgres.migrate_on_start {
        tracing::error!(
            why = %why,
            "the C version stamp's library does not load on this Postgres server: every write \
             to the tables it stamps fails, the customer's own included. With \
             postgres.migrate_on_start = false syncar changes nothing: run `syncar migrate` \
             with postgres.stamp = \"plpgsql\", or install the library on this server \
             (README \"The C stamp\")"
        );
        return true; // nothing syncar may do; said once per suspicion
    }
    tracing::error!(
        why = %why,
        "the C version stamp's library does not load on this Postgres server: every write to \
         the tables it stamps fails; putting the PL/pgSQL stamp on them"
    );
    let mut plpgsql = config.clone();
    plpgsql.postgres.stamp = Stamp::Plpgsql;
    let migrated = with_connection(&plpgsql, |mut client| {
        let plpgsql = plpgsql.clone();
        async move { Ok(migrate(&mut client, &plpgsql).await?) }
    })
    .await;
    match migrated {
        Ok(migration) => {
            for change in &migration.changes {
                tracing::info!(change = %change, "migrated");
            }
            true
        }
        Err(e) => {
            tracing::error!(
                error = %secrets.scrub(&error_chain(&e)),
                "putting the PL/pgSQL stamp back failed; retrying"
            );
            false
        }
    }
}

/// Re-checks sampled cached reads against Postgres ([`Tiers::audit`]), starting at most
/// `per_second` checks a second; samples that arrive while 32 checks wait out their lease are
/// dropped, never queued without bound.
pub(super) async fn audit_task(
    tiers: Tiers,
    mut samples: tokio::sync::mpsc::Receiver<crate::audit::Sample>,
    per_second: u32,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let pause = Duration::from_secs(1) / per_second.max(1);
    let mut checks = tokio::task::JoinSet::new();
    loop {
        let sample = tokio::select! {
            _ = shutdown.cancelled() => return,
            sample = samples.recv() => match sample {
                Some(sample) => sample,
                None => return,
            },
        };
        while checks.try_join_next().is_some() {}
        if checks.len() < AUDIT_CONCURRENT_CHECKS {
            let tiers = tiers.clone();
            checks.spawn(async move { tiers.audit(sample, lease).await });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Audit checks in flight at most (most finish at once; a suspicious one waits a lease).
const AUDIT_CONCURRENT_CHECKS: usize = 32;

/// Checks which Redis incarnation answers once per `every` (the lease: a restarted or
/// failed-over Redis is noticed within it even when no command failed), and at once when a
/// command failed or the Redis feed went down; reads skip Redis until it has (see
/// [`Guards::secure_redis`]). Then records this instance's high-water version in Redis (for
/// [`Guards::secure_postgres`] on instances that start later).
pub(super) async fn redis_guard(
    guards: Guards,
    catalog: Arc<CatalogCell>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), every);
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = guards.redis_distrusted() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        let Ok(catalog) = catalog.get() else {
            pause = Duration::from_millis(50);
            continue;
        };
        if let Err(e) = guards.follow_redis_master().await {
            tracing::debug!(error = %e, "asking the Redis Sentinels for the master failed");
        }
        pause = match guards.secure_redis(&catalog).await {
            Ok(_) => {
                guards.report_high_water().await;
                backoff.reset();
                jitter(every, 0.2)
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "checking redis' incarnation failed; retrying");
                backoff.next_pause()
            }
        };
    }
}

/// Prunes the changes log now and then; one instance at a time does the work.
pub(super) async fn prune_task(
    db: Db,
    catalog: Arc<CatalogCell>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jitter(every, 0.2)) => {}
        }
        match catalog.get() {
            // Nothing writes the log with the wal source: idle instances ask Postgres nothing.
            Ok(c) if c.capture.source == crate::config::PostgresSource::Wal => return,
            Ok(_) => {}
            Err(_) => continue,
        }
        match db.prune_changes(retention).await {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "pruned the changes log"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "pruning the changes log failed"),
        }
    }
}

/// The exporter starts no task of its own: keep its histograms fresh and publish L1's size.
pub(super) async fn upkeep_task(
    tiers: Tiers,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) {
    // The exporter keeps every histogram sample until upkeep folds them into buckets: at tens
    // of thousands of requests a second, five seconds' worth took a runtime thread for
    // hundreds of milliseconds. Often, and on a blocking thread, it never stalls requests.
    let mut tick = ticker(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let handle = metrics.clone();
        let _ = tokio::task::spawn_blocking(move || handle.run_upkeep()).await;
        if let Some((entries, bytes)) = tiers.l1_size() {
            metrics::gauge!(L1_ENTRIES).set(entries as f64);
            metrics::gauge!(L1_BYTES).set(bytes as f64);
        }
    }
}
