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
//!
//! # Rooms
//! This file builds the components and spawns the tasks, one phase per component;
//! `listen.rs` binds the sockets and waits for the signal; `tasks.rs` holds the long-lived
//! tasks besides the listeners and the feeds; `commands.rs` the one-off commands
//! (`migrate`, `check-config --db`, `uninstall`); `error.rs` the errors of start-up.

mod commands;
mod error;
mod listen;
mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditTap, Sample};
use crate::coherence::Coherence;
use crate::config::{Config, KV_RESOURCE};
use crate::db::Db;
use crate::feed::{feed_id, FeedContext};
use crate::http::{HttpMetrics, HttpState, Listener};
use crate::l1::L1;
use crate::l2::L2;
use crate::redact::{redact_url, Secrets};
use crate::relay::RelayContext;
use crate::resource::CatalogCell;
use crate::telemetry::metrics_handle;
use crate::tiers::Tiers;

pub use commands::{run_check, run_migration, run_plan, run_uninstall, MigrateError};
pub use error::{ReadyError, StartError};

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

/// Requests the admin listener handles at once: probes and scrapes need a handful.
const ADMIN_CONCURRENT_REQUESTS: usize = 16;

impl App {
    /// Builds the components, binds the listener and spawns the tasks.
    ///
    /// # Errors
    /// The listen address cannot be bound.
    pub async fn start(config: Config) -> Result<App, StartError> {
        App::start_as(config, Role::Sidecar).await
    }

    /// [`App::start`] for `role`: builds the components, binds the sockets, serves them,
    /// spawns the long-lived tasks, each phase one function below.
    ///
    /// # Errors
    /// A listen address cannot be bound; the Postgres pool or the Redis client cannot be
    /// built from their settings.
    pub async fn start_as(config: Config, role: Role) -> Result<App, StartError> {
        crate::tls::install_crypto_provider();
        let config = Arc::new(for_role(config, role));
        // Installed first: metric handles registered before it would be no-ops.
        let metrics = metrics_handle();
        let mut parts = Components::build(&config, role).await?;
        let sockets = listen::bind_all(&config.server, role == Role::Sidecar).await?;
        let state = http_state(&config, &parts, metrics.clone());
        let local = sockets.local;
        let (stop_accepting, listeners, admin_addr) = serve(sockets, &state);
        let (shutdown, tasks) = spawn_tasks(&config, role, &mut parts, metrics);
        let (background, background_tasks) = spawn_repairs(&config, parts.tiers);
        tracing::info!(
            addr = %local,
            admin = ?admin_addr,
            unix = ?config.server.listen_unix,
            instance = %parts.instance,
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
    pub async fn ready(&self, timeout: Duration) -> Result<(), ReadyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = match self.state.catalog.get() {
                Ok(_) if !self.state.coherence.all_up() => ReadyError::FeedDown,
                Ok(_)
                    if !self.state.probes.redis_trusted()
                        && (self.state.config.feeds.redis
                            || self.state.probes.ping_redis().await.is_ok()) =>
                {
                    ReadyError::RedisUnchecked
                }
                Ok(_) => return Ok(()),
                Err(e) => ReadyError::Schema(e),
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
        listen::wait_for_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// The configuration as `role` runs it: a relay caches nothing and hears nothing, it only
/// streams the WAL into Redis.
fn for_role(mut config: Config, role: Role) -> Config {
    if role == Role::Relay {
        config.cache.l1 = false;
        config.feeds.relay = true;
    }
    config
}

/// What start-up builds before anything is bound: one of each component, each a cheap
/// handle, handed out narrowly to the HTTP layer, the feeds, the relay and the tasks.
struct Components {
    /// The configured instance name.
    instance: String,
    /// `{instance}-{feed_id}`: the sender of this instance's messages.
    instance_id: String,
    /// Random hex naming this process's heartbeat channels.
    feed_id: String,
    secrets: Secrets,
    coherence: Arc<Coherence>,
    catalog: Arc<CatalogCell>,
    /// The pool the schema task reloads the catalog through when a table changes.
    schema_db: Db,
    tiers: Tiers,
    /// The audited reads, when the auditor runs (taken by [`spawn_tasks`]).
    samples: Option<tokio::sync::mpsc::Receiver<Sample>>,
}

impl Components {
    /// Builds the Postgres pool, Redis, L1, the feeds' state, the (empty) catalog and the
    /// tiers over them. Connects nothing yet but asks the Sentinels for the Redis master.
    ///
    /// # Errors
    /// The pool or the Redis client cannot be built from their settings.
    async fn build(config: &Arc<Config>, role: Role) -> Result<Components, StartError> {
        let secrets = Secrets::new(&config.postgres.url, &config.redis.url)
            .with(config.server.auth_token.as_ref().map(|t| t.0.as_str()));
        let (db, l2) = stores(config).await?;
        let l1 = config.cache.l1.then(|| L1::new(config.cache.l1_max_bytes));
        let instance = config.instance_name();
        let feed_id = feed_id();
        let instance_id = format!("{instance}-{feed_id}");
        let coherence = coherence(config, role);
        let catalog = Arc::new(CatalogCell::new("connecting to postgres"));
        let schema_db = db.clone();
        let tiers = Tiers::new(
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
        let (tiers, samples) = with_audit(config, role, tiers);
        Ok(Components {
            instance,
            instance_id,
            feed_id,
            secrets,
            coherence,
            catalog,
            schema_db,
            tiers,
            samples,
        })
    }
}

/// The Postgres pool and the Redis client. With Sentinel, the master is asked for before
/// anything is sent; if no Sentinel answers yet, Redis is not trusted (reads skip it) until
/// one does: the Redis guard keeps asking.
///
/// # Errors
/// Either cannot be built from its settings.
async fn stores(config: &Config) -> Result<(Db, L2), StartError> {
    let db = Db::new(&config.postgres).map_err(StartError::Postgres)?;
    let l2 = L2::new(&config.redis).map_err(StartError::Redis)?;
    if let Err(e) = l2.follow_master().await {
        tracing::warn!(error = %e, "asking the Redis Sentinels for the master failed");
    }
    Ok((db, l2))
}

/// The feeds' state: only a sidecar has feeds.
fn coherence(config: &Config, role: Role) -> Arc<Coherence> {
    Arc::new(
        Coherence::new(
            role == Role::Sidecar && config.feeds.postgres,
            role == Role::Sidecar && config.feeds.redis,
            config.feeds.trust_redis_when_postgres_feed_down,
        )
        .serving_cached_while_postgres_unreachable(
            config.feeds.serve_cached_while_postgres_unreachable,
        ),
    )
}

/// `tiers` with the auditor's tap when `audit.*` asks for one (a sidecar only), and the
/// receiving end of its samples.
fn with_audit(
    config: &Config,
    role: Role,
    tiers: Tiers,
) -> (Tiers, Option<tokio::sync::mpsc::Receiver<Sample>>) {
    let audit = &config.audit;
    if role == Role::Sidecar && audit.sample_ratio > 0.0 && audit.max_per_second > 0 {
        let (tap, samples) = AuditTap::new(audit.sample_ratio);
        (tiers.with_audit(tap), Some(samples))
    } else {
        (tiers, None)
    }
}

/// What the HTTP layer gets: the tiers, the catalog, the feeds' state, and its own limits.
fn http_state(
    config: &Arc<Config>,
    parts: &Components,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Arc<HttpState> {
    Arc::new(HttpState {
        instance: parts.instance.clone(),
        coherence: parts.coherence.clone(),
        config: config.clone(),
        tiers: parts.tiers.clone(),
        probes: parts.tiers.probes(),
        catalog: parts.catalog.clone(),
        metrics,
        http_metrics: HttpMetrics::new(),
        openapi: crate::http::openapi_for(
            &std::iter::once(KV_RESOURCE.to_string())
                .chain(config.resources.iter().map(|r| r.name.clone()))
                .collect::<Vec<_>>(),
        ),
        secrets: parts.secrets.clone(),
        writes: TaskTracker::new(),
        inflight: tokio::sync::Semaphore::new(config.server.max_concurrent_requests),
        admin_inflight: tokio::sync::Semaphore::new(ADMIN_CONCURRENT_REQUESTS),
    })
}

/// Serves every bound socket, each on a task of the listeners' tracker; returns the token
/// that stops accepting, the tracker, and the admin listener's address.
fn serve(
    sockets: listen::Sockets,
    state: &Arc<HttpState>,
) -> (CancellationToken, TaskTracker, Option<SocketAddr>) {
    let stop_accepting = CancellationToken::new();
    let listeners = TaskTracker::new();
    if let Some(listener) = sockets.api {
        listeners.spawn(crate::http::serve(
            listener,
            Listener::Api,
            state.clone(),
            stop_accepting.clone(),
        ));
    }
    if let Some(listener) = sockets.unix {
        listeners.spawn(crate::http::serve(
            listener,
            Listener::Api,
            state.clone(),
            stop_accepting.clone(),
        ));
    }
    let admin_addr = sockets.admin.map(|(listener, addr)| {
        listeners.spawn(crate::http::serve(
            listener,
            Listener::Admin,
            state.clone(),
            stop_accepting.clone(),
        ));
        addr
    });
    listeners.close();
    (stop_accepting, listeners, admin_addr)
}

/// Spawns the long-lived tasks stopped after the drain: the schema task, upkeep, the
/// auditor, the Redis guard, the pruning, the relay and the feeds.
fn spawn_tasks(
    config: &Arc<Config>,
    role: Role,
    parts: &mut Components,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> (CancellationToken, TaskTracker) {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (tiers, catalog) = (&parts.tiers, &parts.catalog);
    tasks.spawn(tasks::schema_task(
        config.clone(),
        catalog.clone(),
        parts.schema_db.clone(),
        tiers.clone(),
        parts.secrets.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(tasks::upkeep_task(tiers.clone(), metrics, shutdown.clone()));
    if let Some(samples) = parts.samples.take() {
        tasks.spawn(tasks::audit_task(
            tiers.clone(),
            samples,
            config.audit.max_per_second,
            config.feeds.lease,
            shutdown.clone(),
        ));
    }
    tasks.spawn(tasks::redis_guard(
        tiers.guards(),
        catalog.clone(),
        config.feeds.lease,
        shutdown.clone(),
    ));
    // The triggers log every change whatever the feeds: always prune.
    tasks.spawn(tasks::prune_task(
        parts.schema_db.clone(),
        catalog.clone(),
        config.feeds.changes_retention,
        shutdown.clone(),
    ));
    spawn_relay_and_feeds(config, role, parts, &tasks, &shutdown);
    tasks.close();
    (shutdown, tasks)
}

/// Spawns the relay (with `feeds.postgres` and `feeds.relay`) and a sidecar's feeds, each
/// with its narrow context.
fn spawn_relay_and_feeds(
    config: &Arc<Config>,
    role: Role,
    parts: &Components,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    if config.feeds.postgres && config.feeds.relay {
        let relay = Arc::new(RelayContext {
            config: config.clone(),
            redis: parts.tiers.relay_redis(),
            guards: parts.tiers.guards(),
            catalog: parts.catalog.clone(),
            secrets: parts.secrets.clone(),
            instance_id: parts.instance_id.clone(),
        });
        tasks.spawn(crate::relay::run(relay, shutdown.clone()));
    }
    let feeds = Arc::new(FeedContext {
        config: config.clone(),
        coherence: parts.coherence.clone(),
        tiers: parts.tiers.feed_tiers(),
        guards: parts.tiers.guards(),
        catalog: parts.catalog.clone(),
        secrets: parts.secrets.clone(),
        instance_id: parts.instance_id.clone(),
        feed_id: parts.feed_id.clone(),
    });
    if role == Role::Sidecar && config.feeds.postgres {
        tasks.spawn(crate::feed::run_postgres(feeds.clone(), shutdown.clone()));
    }
    if role == Role::Sidecar && config.feeds.redis {
        tasks.spawn(crate::feed::run_redis(feeds, shutdown.clone()));
    }
}

/// Spawns the Redis repair loop, which outlives in-flight writes: stopped last, it makes a
/// last attempt at what is queued within `server.shutdown_grace`.
fn spawn_repairs(config: &Config, tiers: Tiers) -> (CancellationToken, TaskTracker) {
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    let (stop, grace) = (background.clone(), config.server.shutdown_grace);
    background_tasks.spawn(async move { tiers.run_repairs(stop, grace).await });
    background_tasks.close();
    (background, background_tasks)
}
