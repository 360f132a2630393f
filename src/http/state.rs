//! What the HTTP layer owns: the tiers it reads and writes through, the stores' probes, and
//! its own request accounting.

use std::sync::Arc;

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::metrics::HttpMetrics;
use crate::coherence::Coherence;
use crate::config::Config;
use crate::redact::Secrets;
use crate::resource::{Catalog, CatalogCell, NotReady};
use crate::tiers::{Probes, Tiers};

/// What the HTTP layer needs, owned by it: the tiers to read and write through, and its own
/// request accounting.
pub struct HttpState {
    pub config: Arc<Config>,
    /// The configured name (`/readyz`).
    pub instance: String,
    /// The read and write API.
    pub tiers: Tiers,
    /// Whether Postgres and Redis answer (`/readyz`).
    pub probes: Probes,
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
