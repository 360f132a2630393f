//! syncar: a cache-coherence sidecar. An app calls it over a local HTTP API
//! (`GET/PUT/DELETE /v1/{resource}/{key}`); it serves JSON documents from three tiers and keeps
//! them coherent with versions from one Postgres sequence.
//!
//! The major components, in the order a request meets them:
//!
//! - [`http`]: the hyper server, routing, document handlers, and the one error-to-status
//!   mapping.
//! - [`tiers`]: read-through and write-through across the tiers, and Redis repair; the only
//!   module that reaches the stores, through handles each component gets of its own (the
//!   feeds', the relay's, the guards, the probes).
//! - [`feed`]: coherence across instances: the changes-log poller, LISTEN/NOTIFY and Redis
//!   pub/sub feeds, one run loop for all, replay of the changes log when a feed is back.
//! - [`relay`]: the `wal` source's relay, elected among instances: streams the WAL, applies
//!   each change to Redis once and publishes it to every instance.
//! - [`coherence`]: the vocabulary feeds and tiers share: messages, feed state, the lease
//!   clock and the rules for using L1 and Redis. Pure.
//! - [`l1`]: the per-instance quick_cache cache with versioned, per-key atomic updates.
//! - [`l2`]: Redis, written only through a version-comparing Lua script.
//! - [`db`]: Postgres, the source of truth.
//! - [`resource`] and [`schema`]: what a resource is, its SQL, and `syncar migrate`
//!   (the version sequence and the triggers that stamp and announce every write).
//! - [`model`]: versions, cache keys, and how two copies of a key rank.
//! - [`audit`]: the consistency auditor's sampling and judgement (the check is in `tiers`).
//! - [`watch`]: the change stream apps watch: ids, the resume ring, resets.
//! - [`tls`]: `sslmode` and certificates for Postgres, `rediss://` for Redis, with rustls.
//! - [`config`], [`telemetry`], [`redact`], [`backoff`], [`locks`], [`app`]: settings, logs
//!   and metrics, keeping secrets out of both, waiting between retries, locks a panic cannot
//!   poison for good, and start-up/shutdown.
//!
//! `ARCHITECTURE.md` gives the bird's-eye view and the invariants.

pub mod app;
pub mod audit;
pub mod backoff;
pub mod coherence;
pub mod config;
pub mod db;
pub mod feed;
pub mod http;
pub mod l1;
pub mod l2;
pub mod locks;
pub mod model;
pub mod redact;
pub mod relay;
pub mod resource;
pub mod schema;
pub mod single_flight;
pub mod telemetry;
pub mod tiers;
pub mod tls;
pub mod watch;

pub use app::App;
pub use config::Config;
