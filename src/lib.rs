//! syncar: a cache-coherence sidecar. An app calls it over a local HTTP API
//! (`GET/PUT/DELETE /v1/{resource}/{key}`); it serves JSON documents from three tiers and keeps
//! them coherent with versions from one Postgres sequence.
//!
//! The major components, in the order a request meets them:
//!
//! - [`http`]: the hyper server, routing, and the one error-to-status mapping.
//! - [`tiers`]: read-through and write-through across the tiers, and Redis repair.
//! - [`feed`]: coherence across instances: the Postgres LISTEN and Redis pub/sub feeds,
//!   heartbeats, L1 bypass while a feed is down, replay of the changes log when it is back.
//! - [`l1`]: the per-instance moka cache with versioned, per-key atomic updates.
//! - [`l2`]: Redis, written only through a version-comparing Lua script.
//! - [`db`]: Postgres, the source of truth.
//! - [`resource`] and [`schema`]: what a resource is, its SQL, and `syncar migrate`
//!   (the version sequence and the triggers that stamp and announce every write).
//! - [`model`]: versions, cache keys, and how two copies of a key rank.
//! - [`config`], [`telemetry`], [`redact`], [`app`]: settings, logs and metrics, keeping
//!   secrets out of both, and start-up/shutdown.
//!
//! `ARCHITECTURE.md` gives the bird's-eye view and the invariants.

pub mod app;
pub mod config;
pub mod db;
pub mod feed;
pub mod http;
pub mod l1;
pub mod l2;
pub mod model;
pub mod redact;
pub mod resource;
pub mod schema;
pub mod single_flight;
pub mod telemetry;
pub mod tiers;

pub use app::App;
pub use config::Config;
