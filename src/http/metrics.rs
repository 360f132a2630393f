//! Request counters and latency histograms by route, method and status, registered once.

use std::time::Duration;

use http::{Method, StatusCode};

use crate::telemetry::{HTTP_DURATION, HTTP_REQUESTS};

/// Request counters and latency histograms, each registered on first use and then kept:
/// looking a metric up by its labels on every request costs more than the L1 hit it measures.
pub struct HttpMetrics {
    /// Indexed by route, method and status; see [`HttpMetrics::record`].
    requests: Vec<std::sync::OnceLock<metrics::Counter>>,
    durations: Vec<metrics::Histogram>,
}

const ROUTES: [&str; 6] = [
    "document", "healthz", "readyz", "metrics", "openapi", "other",
];
const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "DELETE", "POST", "other"];
const STATUSES: [u16; 17] = [
    200, 201, 204, 304, 400, 401, 404, 405, 409, 412, 413, 414, 422, 500, 503, 504, 0,
];

impl HttpMetrics {
    pub fn new() -> Self {
        let slots = ROUTES.len() * METHODS.len() * STATUSES.len();
        HttpMetrics {
            requests: (0..slots).map(|_| std::sync::OnceLock::new()).collect(),
            durations: ROUTES
                .iter()
                .map(|route| metrics::histogram!(HTTP_DURATION, "route" => *route))
                .collect(),
        }
    }

    pub(super) fn record(&self, route: &str, method: &Method, status: StatusCode, took: Duration) {
        let r = ROUTES
            .iter()
            .position(|x| *x == route)
            .unwrap_or(ROUTES.len() - 1);
        let method = method_label(method);
        let m = METHODS
            .iter()
            .position(|x| *x == method)
            .unwrap_or(METHODS.len() - 1);
        let s = STATUSES
            .iter()
            .position(|x| *x == status.as_u16())
            .unwrap_or(STATUSES.len() - 1);
        let slot = &self.requests[(r * METHODS.len() + m) * STATUSES.len() + s];
        slot.get_or_init(|| {
            let status = match STATUSES[s] {
                0 => "other".to_string(),
                code => code.to_string(),
            };
            metrics::counter!(HTTP_REQUESTS, "route" => ROUTES[r], "method" => METHODS[m],
                "status" => status)
        })
        .increment(1);
        self.durations[r].record(took.as_secs_f64());
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Methods as metric labels, without letting clients invent label values.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::POST => "POST",
        _ => "other",
    }
}
