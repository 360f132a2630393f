//! Start-up and shutdown: builds every component from a validated [`Config`], binds the
//! listener, and spawns every long-lived task in one place, each stopped by one cancellation
//! token and awaited on shutdown. Knows nothing about requests.
//!
//! # Start-up
//! The socket is bound first so `/healthz` answers at once. Postgres may not be reachable yet
//! (a sidecar often starts before its database is): the schema task retries the migration
//! and the catalog load with backoff, `/readyz` says why it is not ready, and document
//! requests get 503 with `Retry-After` until it is.
//!
//! # Shutdown
//! Stop accepting; let in-flight requests finish within `server.shutdown_grace`, then close
//! the connections left; then stop the feeds and the other long-lived tasks; wait for spawned
//! writes (their commit is acknowledged only once caches are updated); then stop the Redis
//! repair loop, which makes a last attempt at what is queued.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditTap;
use crate::backoff::{jitter, ticker, Backoff};
use crate::coherence::Coherence;
use crate::config::{Config, KV_RESOURCE};
use crate::db::{connect_dedicated, Db};
use crate::feed::{feed_id, FeedContext};
use crate::http::{HttpMetrics, HttpState, Listener};
use crate::l1::L1;
use crate::l2::L2;
use crate::redact::{redact_url, Secrets};
use crate::relay::RelayContext;
use crate::resource::CatalogCell;
use crate::schema::{load_catalog, migrate, Migration, SchemaError};
use crate::telemetry::{error_chain, metrics_handle, L1_BYTES, L1_ENTRIES};
use crate::tiers::Tiers;

/// What a process is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `syncar serve`: the API, L1, the feeds, and (with `feeds.relay`) a candidate relay.
    Sidecar,
    /// `syncar relay`: only the `wal` source's relay (always a candidate), the schema task
    /// and the admin listener; no API, no L1, no feeds.
    Relay,
}

/// A running instance.
pub struct App {
    state: Arc<HttpState>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// Stops the listeners; their tasks end once in-flight requests are drained.
    stop_accepting: CancellationToken,
    listeners: TaskTracker,
    /// Stops the feeds and the other long-lived tasks, after the drain.
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Stops the tasks that must outlive in-flight writes (Redis repair), after them.
    background: CancellationToken,
    background_tasks: TaskTracker,
}

/// Why the instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {message}")]
    Setup { what: &'static str, message: String },
}

/// Why a migration run failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to postgres")]
    Connect(#[source] crate::db::DbError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl App {
    /// Builds the components, binds the listener and spawns the tasks.
    ///
    /// # Errors
    /// The listen address cannot be bound.
    pub async fn start(config: Config) -> Result<App, StartError> {
        App::start_as(config, Role::Sidecar).await
    }

    /// [`App::start`] for `role`.
    ///
    /// # Errors
    /// A listen address cannot be bound.
    pub async fn start_as(mut config: Config, role: Role) -> Result<App, StartError> {
        crate::tls::install_crypto_provider();
        if role == Role::Relay {
            // A relay caches nothing and hears nothing: it only streams the WAL into Redis.
            config.cache.l1 = false;
            config.feeds.relay = true;
        }
        let config = Arc::new(config);
        let secrets = Secrets::new(&config.postgres.url, &config.redis.url)
            .with(config.server.auth_token.as_ref().map(|t| t.0.as_str()));
        let setup = |what| {
            move |e: &dyn std::fmt::Display| StartError::Setup {
                what,
                message: e.to_string(),
            }
        };
        // Installed first: metric handles registered before it would be no-ops.
        let metrics = metrics_handle();
        let db = Db::new(&config.postgres).map_err(|e| setup("postgres")(&e))?;
        let l2 = L2::new(&config.redis).map_err(|e| setup("redis")(&e))?;
        // With Sentinel, the master before anything is sent; if no Sentinel answers yet,
        // Redis is not trusted (reads skip it) until one does: the Redis guard keeps asking.
        if let Err(e) = l2.follow_master().await {
            tracing::warn!(error = %e, "asking the Redis Sentinels for the master failed");
        }
        let l1 = config.cache.l1.then(|| L1::new(config.cache.l1_max_bytes));
        let instance = config.instance_name();
        let feed_id = feed_id();
        let instance_id = format!("{instance}-{feed_id}");
        let coherence = Arc::new(
            Coherence::new(
                role == Role::Sidecar && config.feeds.postgres,
                role == Role::Sidecar && config.feeds.redis,
                config.feeds.trust_redis_when_postgres_feed_down,
            )
            .serving_cached_while_postgres_unreachable(
                config.feeds.serve_cached_while_postgres_unreachable,
            ),
        );
        let catalog = Arc::new(CatalogCell::new("connecting to postgres"));
        // The schema task reloads the catalog through the pool when a table changes.
        let schema_db = db.clone();
        let mut tiers = Tiers::new(
            l1,
            l2,
            db,
            coherence.clone(),
            &instance_id,
            config.redis.repair_queue_max,
            catalog.clone(),
        )
        .with_watch_buffer(config.server.watch_buffer)
        .with_fill_lease(config.cache.fill_lease);
        let audit = &config.audit;
        let samples =
            if role == Role::Sidecar && audit.sample_ratio > 0.0 && audit.max_per_second > 0 {
                let (tap, samples) = AuditTap::new(audit.sample_ratio);
                tiers = tiers.with_audit(tap);
                Some(samples)
            } else {
                None
            };

        let (listener, local) = match role {
            Role::Sidecar => {
                let (listener, local) = bind(&config.server.listen).await?;
                (Some(listener), local)
            }
            Role::Relay => (None, SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        let admin = match &config.server.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let unix = match (&config.server.listen_unix, role) {
            (Some(path), Role::Sidecar) => Some(bind_unix(path, &config.server.listen_unix_mode)?),
            _ => None,
        };
        if listener.is_some() && !local.ip().is_loopback() {
            tracing::warn!(addr = %local, "listening on a non-loopback address: anyone who can reach it can read and write documents");
        }

        let state = Arc::new(HttpState {
            instance: instance.clone(),
            coherence: coherence.clone(),
            config: config.clone(),
            tiers: tiers.clone(),
            catalog: catalog.clone(),
            metrics: metrics.clone(),
            http_metrics: HttpMetrics::new(),
            openapi: crate::http::openapi_for(
                &std::iter::once(KV_RESOURCE.to_string())
                    .chain(config.resources.iter().map(|r| r.name.clone()))
                    .collect::<Vec<_>>(),
            ),
            secrets: secrets.clone(),
            writes: TaskTracker::new(),
            inflight: tokio::sync::Semaphore::new(config.server.max_concurrent_requests),
            admin_inflight: tokio::sync::Semaphore::new(ADMIN_CONCURRENT_REQUESTS),
        });
        let stop_accepting = CancellationToken::new();
        let listeners = TaskTracker::new();
        if let Some(listener) = listener {
            listeners.spawn(crate::http::serve(
                listener,
                Listener::Api,
                state.clone(),
                stop_accepting.clone(),
            ));
        }
        if let Some(listener) = unix {
            listeners.spawn(crate::http::serve(
                listener,
                Listener::Api,
                state.clone(),
                stop_accepting.clone(),
            ));
        }
        let admin_addr = admin.map(|(listener, addr)| {
            listeners.spawn(crate::http::serve(
                listener,
                Listener::Admin,
                state.clone(),
                stop_accepting.clone(),
            ));
            addr
        });
        listeners.close();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(schema_task(
            config.clone(),
            catalog.clone(),
            schema_db,
            tiers.clone(),
            secrets.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(upkeep_task(tiers.clone(), metrics, shutdown.clone()));
        if let Some(samples) = samples {
            tasks.spawn(audit_task(
                tiers.clone(),
                samples,
                config.audit.max_per_second,
                config.feeds.lease,
                shutdown.clone(),
            ));
        }
        tasks.spawn(redis_guard(
            tiers.clone(),
            catalog.clone(),
            config.feeds.lease,
            shutdown.clone(),
        ));
        // The triggers log every change whatever the feeds: always prune.
        tasks.spawn(prune_task(
            tiers.clone(),
            catalog.clone(),
            config.feeds.changes_retention,
            shutdown.clone(),
        ));
        if config.feeds.postgres && config.feeds.relay {
            let relay = Arc::new(RelayContext {
                config: config.clone(),
                tiers: tiers.clone(),
                catalog: catalog.clone(),
                secrets: secrets.clone(),
                instance_id: instance_id.clone(),
            });
            tasks.spawn(crate::relay::run(relay, shutdown.clone()));
        }
        let feeds = Arc::new(FeedContext {
            config: config.clone(),
            coherence,
            tiers: tiers.clone(),
            catalog,
            secrets,
            instance_id,
            feed_id,
        });
        if role == Role::Sidecar && config.feeds.postgres {
            tasks.spawn(crate::feed::run_postgres(feeds.clone(), shutdown.clone()));
        }
        if role == Role::Sidecar && config.feeds.redis {
            tasks.spawn(crate::feed::run_redis(feeds, shutdown.clone()));
        }
        tasks.close();
        let background = CancellationToken::new();
        let background_tasks = TaskTracker::new();
        {
            let (background, grace) = (background.clone(), config.server.shutdown_grace);
            background_tasks.spawn(async move { tiers.run_repairs(background, grace).await });
        }
        background_tasks.close();

        tracing::info!(
            addr = %local,
            admin = ?admin_addr,
            unix = ?config.server.listen_unix,
            instance = %instance,
            postgres = %redact_url(&config.postgres.url),
            redis = %redact_url(&config.redis.url),
            "syncar listening"
        );
        Ok(App {
            state,
            addr: local,
            admin_addr,
            stop_accepting,
            listeners,
            shutdown,
            tasks,
            background,
            background_tasks,
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of `server.admin_listen`, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// What the HTTP layer sees: the tiers, the catalog, the feeds' state.
    pub fn state(&self) -> &Arc<HttpState> {
        &self.state
    }

    /// Waits until the schema is loaded, every enabled feed is up and, unless Redis cannot
    /// be reached (without a Redis feed), Redis' incarnation has been checked (reads use
    /// Redis).
    ///
    /// # Errors
    /// The last reason it was not ready, once `timeout` passed.
    pub async fn ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = match self.state.catalog.get() {
                Ok(_) if !self.state.coherence.all_up() => "a feed is not up yet".to_string(),
                Ok(_)
                    if !self.state.tiers.redis_trusted()
                        && (self.state.config.feeds.redis
                            || self.state.tiers.ping_redis().await.is_ok()) =>
                {
                    "redis' incarnation is not checked yet".to_string()
                }
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops gracefully: see the module docs.
    pub async fn shutdown(self) {
        // Requests still in flight keep their feeds (and so L1) until they are answered;
        // watch streams end at once (their clients resume elsewhere).
        self.stop_accepting.cancel();
        self.state.tiers.watch().close();
        self.listeners.wait().await;
        if let Some(path) = &self.state.config.server.listen_unix {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("connections drained; stopping feeds");
        self.shutdown.cancel();
        self.tasks.wait().await;
        self.state.writes.close();
        self.state.writes.wait().await;
        self.background.cancel();
        self.background_tasks.wait().await;
        tracing::info!("syncar stopped");
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// Binds the Unix socket `path` with file `mode` (octal text, validated): bound under a
/// temporary name, given its mode, then renamed into place, so it is never reachable with
/// the process umask's looser mode. A stale socket at `path` (a previous process's) is
/// replaced; any other file there is an error.
fn bind_unix(path: &str, mode: &str) -> Result<tokio::net::UnixListener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let failed = |source| StartError::Bind {
        addr: path.to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(failed(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
    }
    let temporary = format!("{path}.{}", std::process::id());
    let _ = std::fs::remove_file(&temporary);
    let listener = tokio::net::UnixListener::bind(&temporary).map_err(failed)?;
    let mode = u32::from_str_radix(mode, 8).unwrap_or(0o600);
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    Ok(listener)
}

/// Longest pause between attempts to migrate and load the schema.
const SCHEMA_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Requests the admin listener handles at once: probes and scrapes need a handful.
const ADMIN_CONCURRENT_REQUESTS: usize = 16;

/// Runs `syncar uninstall` once, on a connection of its own.
///
/// # Errors
/// Postgres unreachable, the slot still streamed, or Postgres failing.
pub async fn run_uninstall(config: &Config) -> Result<Vec<String>, MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::uninstall(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// Checks the configuration against the database, changing nothing: see
/// [`crate::schema::check`].
///
/// # Errors
/// Postgres unreachable or failing.
pub async fn run_check(config: &Config) -> Result<crate::schema::Check, MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::check(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// What the migration would run, changing nothing ([`crate::schema::plan`]), on a connection
/// of its own.
///
/// # Errors
/// Postgres unreachable, or the schema cannot serve the configuration.
pub async fn run_plan(config: &Config) -> Result<(Migration, crate::schema::Script), MigrateError> {
    with_connection(config, |mut client| async move {
        crate::schema::plan(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

/// Runs the migration once, on a connection of its own.
///
/// # Errors
/// Postgres unreachable, or the schema cannot serve the configuration.
pub async fn run_migration(config: &Config) -> Result<Migration, MigrateError> {
    with_connection(config, |mut client| async move {
        migrate(&mut client, config)
            .await
            .map_err(MigrateError::from)
    })
    .await
}

async fn with_connection<T, F, Fut>(config: &Config, f: F) -> Result<T, MigrateError>
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, MigrateError>>,
{
    let (client, connection) = connect_dedicated(&config.postgres, None, "syncar")
        .await
        .map_err(MigrateError::Connect)?;
    let driver = tokio::spawn(connection);
    let result = f(client).await;
    // The client was moved into `f` and dropped there, which ends the connection.
    let _ = driver.await;
    result
}

/// Migrates (unless disabled) and loads the catalog, retrying with backoff until it works;
/// then follows the tables' shapes ([`follow_shapes`]).
async fn schema_task(
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
                let (changes, differences) = if config.postgres.migrate_on_start {
                    (migrate(&mut client, &config).await?.changes, Vec::new())
                } else {
                    // Installed by the DBA: say what differs from what this configuration
                    // needs, each difference by name.
                    (
                        Vec::new(),
                        crate::schema::plan(&mut client, &config).await?.0.changes,
                    )
                };
                let catalog = load_catalog(&client, &config).await?;
                Ok((changes, differences, catalog))
            }
        });
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok((changes, differences, loaded)) => {
                for change in &changes {
                    tracing::info!(change = %change, "migrated");
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
/// announced with, not here.
async fn follow_shapes(
    config: &Config,
    catalog: &CatalogCell,
    db: &Db,
    tiers: &Tiers,
    secrets: &Secrets,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = catalog.recheck_requested() => {}
            _ = tokio::time::sleep(jitter(SHAPES_RECHECK, 0.2)) => {}
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
                    tracing::warn!(error = %secrets.scrub(&error_chain(&e)), "announcing a table's new shape failed");
                }
                db.load_catalog(config).await.map(Some)
            }
            Err(e) => Err(e),
        };
        match reloaded {
            Ok(Some(loaded)) => {
                for r in &config.resources {
                    let (was, now) = (current.unavailable(&r.name), loaded.unavailable(&r.name));
                    match (was, now) {
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
                tracing::warn!(error = %secrets.scrub(&error_chain(&e)), "checking the tables' shapes failed")
            }
        }
        catalog.rechecked(covered);
    }
}

/// Re-checks sampled cached reads against Postgres ([`Tiers::audit`]), starting at most
/// `per_second` checks a second; samples that arrive while 32 checks wait out their lease are
/// dropped, never queued without bound.
async fn audit_task(
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
/// [`Tiers::secure_redis`]). Then records this instance's high-water version in Redis (for
/// [`Tiers::secure_postgres`] on instances that start later).
async fn redis_guard(
    tiers: Tiers,
    catalog: Arc<CatalogCell>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), every);
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tiers.redis_distrusted() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        let Ok(catalog) = catalog.get() else {
            pause = Duration::from_millis(50);
            continue;
        };
        if let Err(e) = tiers.follow_redis_master().await {
            tracing::debug!(error = %e, "asking the Redis Sentinels for the master failed");
        }
        pause = match tiers.secure_redis(&catalog).await {
            Ok(_) => {
                tiers.report_high_water().await;
                backoff.reset();
                jitter(every, 0.2)
            }
            Err(e) => {
                tracing::debug!(error = %e, "checking redis' incarnation failed; retrying");
                backoff.next_pause()
            }
        };
    }
}

/// Prunes the changes log now and then; one instance at a time does the work.
async fn prune_task(
    tiers: Tiers,
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
        match tiers.prune_changes_log(retention).await {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "pruned the changes log"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "pruning the changes log failed"),
        }
    }
}

/// The exporter starts no task of its own: keep its histograms fresh and publish L1's size.
async fn upkeep_task(
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

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
