//! The local HTTP API: the hyper server loop and routing ([`server`]), the document handlers
//! ([`document`]), request parsing ([`request`]), the one function that maps errors to
//! statuses ([`error`]), the probes and metrics ([`admin`]) and the request metrics
//! ([`metrics`]). Knows nothing about how the tiers keep coherence.
//!
//! Routes: `GET|HEAD|PUT|DELETE /v1/{resource}/{key}`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, `GET /openapi.json` (the document in `docs/openapi.json`). The key is the
//! rest of the path, percent-decoded, so it may contain `/`.

mod admin;
mod document;
mod error;
mod metrics;
pub mod request;
mod server;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::coherence::Coherence;
use crate::config::Config;
use crate::redact::Secrets;
use crate::resource::{Catalog, CatalogCell, NotReady};
use crate::tiers::Tiers;

pub use admin::{openapi_for, OPENAPI};
pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use request::{decode_key, read_options, target, write_precondition, Target};
pub use server::{serve, Listener};

/// What the HTTP layer needs, owned by it: the tiers to read and write through, and its own
/// request accounting.
pub struct HttpState {
    pub config: Arc<Config>,
    /// The configured name (`/readyz`).
    pub instance: String,
    pub tiers: Tiers,
    /// The feeds' state, reported by `/readyz`.
    pub coherence: Arc<Coherence>,
    /// The resources, once the schema task has loaded them.
    pub catalog: Arc<CatalogCell>,
    pub secrets: Secrets,
    /// The Prometheus recorder rendered at `/metrics`.
    pub metrics: PrometheusHandle,
    pub http_metrics: HttpMetrics,
    /// The OpenAPI document served at `/openapi.json`, with this instance's resources.
    pub openapi: Bytes,
    /// Requests in flight; when none is left, requests are shed with 503.
    pub inflight: Semaphore,
    /// Bounds the admin listener, which answers without a token: a flood of `/readyz` (each
    /// takes a pooled Postgres connection) must not starve the API.
    pub admin_inflight: Semaphore,
    /// Writes run as tracked tasks, so shutdown can wait for them.
    pub writes: TaskTracker,
}

impl HttpState {
    /// The resources, once the schema is ready.
    ///
    /// # Errors
    /// [`NotReady`] with the reason it is not (503 `starting` for a client).
    pub fn catalog(&self) -> Result<Arc<Catalog>, NotReady> {
        self.catalog.get()
    }
}

const ALLOW_DOC: &str = "GET, HEAD, PUT, DELETE";
const ALLOW_READ: &str = "GET, HEAD";
const JSON: &str = "application/json";

type Answer = Result<Response<Full<Bytes>>, ApiError>;

fn read_only(method: &Method) -> Result<(), ApiError> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(ApiError::MethodNotAllowed(ALLOW_READ)),
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}
