//! The local HTTP API: the hyper server loop and routing ([`server`]), the document handlers
//! ([`document`]), request parsing ([`request`]), the one function that maps errors to
//! statuses ([`error`]), the probes and metrics ([`admin`]) and the request metrics
//! ([`metrics`]). Knows nothing about how the tiers keep coherence.
//!
//! Routes: `GET|HEAD|PUT|DELETE /v1/{resource}/{key}`, `POST /v1/{resource}` (a batch get,
//! [`batch`]), `POST /v1` (a transaction, [`transaction`]), `GET /v1/{resource}?watch=true` (the change
//! stream, [`watch`]), `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, `GET /openapi.json` (the document in `docs/openapi.json`). The key is the
//! rest of the path, percent-decoded, so it may contain `/`.

mod admin;
mod batch;
mod consistency;
mod document;
mod error;
mod metrics;
pub mod openapi;
pub mod position;
pub mod request;
mod response;
mod server;
mod state;
mod transaction;
mod watch;

pub use admin::openapi_for;
pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use request::{decode_key, read_options, target, write_precondition, Target};
pub use server::{serve, Listener};
pub use state::HttpState;
