//! The local HTTP API: the hyper server loop, routing, request parsing and the one function
//! that maps errors to statuses. Knows nothing about how the tiers keep coherence.
//!
//! Routes: `GET|HEAD|PUT|DELETE /v1/{resource}/{key}`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, `GET /openapi.json` (the document in `docs/openapi.json`). The key is the rest of the path, percent-decoded, so it may contain `/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::db::{DbError, DeleteOutcome, WriteOutcome};
use crate::model::{CacheKey, State, Version};
use crate::resource::{Catalog, KeyParam, Precondition, Resource};
use crate::telemetry::{HTTP_DURATION, HTTP_REQUESTS};
use crate::tiers::ReadOptions;

const ALLOW_DOC: &str = "GET, HEAD, PUT, DELETE";
const ALLOW_READ: &str = "GET, HEAD";
const JSON: &str = "application/json";

/// Why a request failed, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such route")]
    NoRoute,
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    InvalidHeader(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("key exceeds {0} bytes")]
    KeyTooLong(usize),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("precondition failed: the current version does not match")]
    PreconditionFailed,
    #[error("{0}")]
    Unavailable(String),
    #[error("not ready: {0}")]
    Starting(String),
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("internal error")]
    Internal(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
}

impl ApiError {
    /// The one mapping from error to HTTP status and error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            UnknownResource(_) => (StatusCode::NOT_FOUND, "unknown_resource"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid_key"),
            InvalidHeader(_) => (StatusCode::BAD_REQUEST, "invalid_header"),
            InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            KeyTooLong(_) => (StatusCode::URI_TOO_LONG, "key_too_long"),
            Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_document"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            PreconditionFailed => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Starting(_) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
            Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        }
    }

    fn into_response(self, state: &AppState) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %state.secrets.scrub(detail), "internal error");
        }
        let message = state.secrets.scrub(&self.to_string());
        let mut resp = json_response(
            status,
            &json!({"error": {"code": code, "message": message}}),
        );
        let headers = resp.headers_mut();
        match self {
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable(_) | ApiError::Starting(_) => {
                let secs = state.config.postgres.retry_after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => ApiError::Unavailable(format!("postgres unavailable: {m}")),
            DbError::Rejected(m) => ApiError::Unprocessable(m),
            DbError::Conflict(m) => ApiError::Conflict(m),
            DbError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// Accepts connections until `shutdown`, then lets in-flight requests finish for at most
/// `server.shutdown_grace` before closing what is left.
pub async fn serve(
    listener: TcpListener,
    listener_kind: Listener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    // Without a timer hyper silently ignores header_read_timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.server.header_read_timeout)
        // Bounds the request head: hyper answers 431 past it.
        .max_buf_size(state.config.server.max_header_bytes)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&state, listener_kind, req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = state.config.server.shutdown_grace;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "connections still open after the grace period; closing them");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `server.listen`: every route.
    Api,
    /// `server.admin_listen`: `/healthz`, `/readyz` and `/metrics` only, without a token and
    /// apart from the API's load shedding (probes and scrapes must not fail because the API
    /// is busy); bounded on its own.
    Admin,
}

/// One request: route, answer, count.
async fn handle(
    state: &AppState,
    listener: Listener,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if listener == Listener::Admin {
        // Exempt from the API's shedding, bounded on its own (liveness, which does no I/O,
        // never is).
        let permit = state.admin_inflight.try_acquire();
        if permit.is_err() && path != "/healthz" {
            let resp = ApiError::Overloaded.into_response(state);
            state
                .http_metrics
                .record("other", &method, resp.status(), started.elapsed());
            return resp;
        }
        let (route, result) = admin_route(state, &method, &path)
            .await
            .unwrap_or(("other", Err(ApiError::NoRoute)));
        let resp = result.unwrap_or_else(|e| e.into_response(state));
        state
            .http_metrics
            .record(route, &method, resp.status(), started.elapsed());
        return resp;
    }
    // Liveness stays answerable whatever the load and without credentials.
    let guarded = path != "/healthz";
    let _permit = if guarded {
        match state.inflight.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let resp = ApiError::Overloaded.into_response(state);
                state
                    .http_metrics
                    .record("other", &method, resp.status(), started.elapsed());
                return resp;
            }
        }
    } else {
        None
    };
    if guarded && !authorized(state, req.headers()) {
        let resp = ApiError::Unauthorized.into_response(state);
        state
            .http_metrics
            .record("other", &method, resp.status(), started.elapsed());
        return resp;
    }
    let (route, result) = match admin_route(state, &method, &path).await {
        Some(answer) => answer,
        None => match path.as_str() {
            "/openapi.json" => ("openapi", read_only(&method).map(|_| openapi(state))),
            p => match p.strip_prefix("/v1/") {
                Some(rest) => ("document", document(state, req, rest).await),
                None => ("other", Err(ApiError::NoRoute)),
            },
        },
    };
    let resp = result.unwrap_or_else(|e| e.into_response(state));
    state
        .http_metrics
        .record(route, &method, resp.status(), started.elapsed());
    resp
}

type Answer = Result<Response<Full<Bytes>>, ApiError>;

/// `/healthz`, `/readyz` and `/metrics`, served on both listeners; `None` for other paths.
async fn admin_route(
    state: &AppState,
    method: &Method,
    path: &str,
) -> Option<(&'static str, Answer)> {
    let answer = match path {
        "/healthz" => ("healthz", read_only(method).map(|_| healthz())),
        "/readyz" => (
            "readyz",
            match read_only(method) {
                Ok(()) => Ok(readyz(state).await),
                Err(e) => Err(e),
            },
        ),
        "/metrics" => ("metrics", read_only(method).map(|_| metrics(state))),
        _ => return None,
    };
    Some(answer)
}

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

    fn record(&self, route: &str, method: &Method, status: StatusCode, took: Duration) {
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

/// With a token configured, the request must carry it as `Authorization: Bearer <token>`,
/// compared in constant time.
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.config.server.auth_token else {
        return true;
    };
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    use subtle::ConstantTimeEq;
    given.ct_eq(token.0.as_bytes()).into()
}

fn read_only(method: &Method) -> Result<(), ApiError> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(ApiError::MethodNotAllowed(ALLOW_READ)),
    }
}

/// The OpenAPI 3 document of this API, kept in `docs/openapi.json`.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

/// The document as this instance serves it: the `resource` parameter lists the resources it
/// actually has.
pub fn openapi_for(resources: &[String]) -> Bytes {
    let mut doc: serde_json::Value =
        serde_json::from_str(OPENAPI).expect("docs/openapi.json is valid JSON");
    if let Some(schema) = doc
        .pointer_mut("/paths/~1v1~1{resource}~1{key}/parameters/0/schema")
        .and_then(|s| s.as_object_mut())
    {
        schema.insert("enum".into(), json!(resources));
    }
    Bytes::from(doc.to_string())
}

fn openapi(state: &AppState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(state.openapi.clone()));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn healthz() -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Ready when Postgres answers and the schema is loaded (and, with `feeds.unready_when_down`,
/// every feed is up); Redis is checked and reported but not required. Each check has a
/// deadline.
async fn readyz(state: &AppState) -> Response<Full<Bytes>> {
    let deadline = Duration::from_secs(2);
    let check = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": state.secrets.scrub(&e)}),
        Err(_) => json!({"ok": false, "error": "timed out"}),
    };
    let tiers = &state.tiers;
    let (pg, redis) = tokio::join!(
        tokio::time::timeout(deadline, async {
            tiers.db().ping().await.map_err(|e| e.to_string())
        }),
        tokio::time::timeout(deadline, async {
            tiers.l2().ping().await.map_err(|e| e.to_string())
        }),
    );
    let schema = match state.catalog() {
        Ok(_) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": state.secrets.scrub(&e.to_string())}),
    };
    let (pg, redis) = (check(pg), check(redis));
    let coherence = &state.coherence;
    let feed = |f: &crate::feed::FeedState| {
        json!({
            "enabled": f.enabled(),
            "up": f.is_up(),
            "since_ms": f.since_ms(),
        })
    };
    let feeds_ok = !state.config.feeds.unready_when_down || coherence.all_up();
    // Redis is reported, not required: without it syncar serves from Postgres, and every
    // instance shares it, so failing readiness would take every pod out of its Services at
    // once for an outage syncar rides out.
    let ready = [&pg, &schema].iter().all(|c| c["ok"] == true) && feeds_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({
            "ready": ready,
            "instance": state.instance,
            "checks": {"postgres": pg, "redis": redis, "schema": schema},
            "feeds": {"postgres": feed(&coherence.postgres), "redis": feed(&coherence.redis)},
            "l1_in_use": coherence.l1_usable(),
        }),
    )
}

fn metrics(state: &AppState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// What a document path names.
pub struct Target {
    pub resource: Arc<Resource>,
    /// Percent-decoded.
    pub key: String,
    /// The key as the bind parameter of the key column's type.
    pub param: KeyParam,
    pub ck: CacheKey,
}

/// Resolves `{resource}/{key}` (the path after `/v1/`) against the catalog.
///
/// # Errors
/// 404 for no such route or resource, 400 for a malformed key, 414 for a long one.
pub fn target(catalog: &Catalog, rest: &str, max_key_bytes: usize) -> Result<Target, ApiError> {
    let (name, raw_key) = rest.split_once('/').ok_or(ApiError::NoRoute)?;
    let resource = catalog
        .get(name)
        .ok_or_else(|| ApiError::UnknownResource(name.to_string()))?
        .clone();
    let key = decode_key(raw_key, max_key_bytes)?;
    let param = resource.parse_key(&key).map_err(ApiError::InvalidKey)?;
    // From the parsed key: `07` and `7` name one row, so they must name one cache entry.
    let ck = match &param {
        KeyParam::Text(text) => CacheKey::new(&resource.name, text),
        KeyParam::Int(_) => CacheKey::new(&resource.name, &param.to_string()),
    };
    Ok(Target {
        resource,
        key,
        param,
        ck,
    })
}

/// `/v1/{resource}/{key}`.
async fn document(
    state: &AppState,
    req: Request<Incoming>,
    rest: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = req.method().clone();
    if !matches!(
        method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE
    ) {
        return Err(ApiError::MethodNotAllowed(ALLOW_DOC));
    }
    let Target {
        resource,
        key,
        param,
        ck,
    } = target(
        state.catalog()?.as_ref(),
        rest,
        state.config.server.max_key_bytes,
    )?;
    // Only what can wait on Postgres or Redis runs under the deadline (an L1 hit cannot).
    let timeout = state.config.server.request_timeout;
    let deadline = |e: tokio::time::error::Elapsed| {
        let _ = e;
        ApiError::Timeout(timeout)
    };

    match method {
        Method::GET | Method::HEAD => {
            let options = read_options(req.uri().query())?;
            let read = match state.tiers.l1_hit(&ck, options).await {
                Some(hit) => hit,
                None => tokio::time::timeout(
                    timeout,
                    state.tiers.get_below_l1(&resource, &param, &ck, options),
                )
                .await
                .map_err(deadline)??,
            };
            let x_cache = HeaderValue::from_static(read.tier.as_str());
            let age = read.cached.age_secs();
            let State::Value(doc) = read.cached.state else {
                let mut resp =
                    ApiError::NotFound(format!("{}/{key}", resource.name)).into_response(state);
                resp.headers_mut().insert("x-cache", x_cache);
                return Ok(resp);
            };
            let etag = etag(read.cached.version.0);
            let not_modified = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.split(',').any(|t| {
                        t.trim().trim_start_matches("W/") == etag.to_str().unwrap_or_default()
                            || t.trim() == "*"
                    })
                });
            let mut resp = if not_modified {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else {
                let mut r = Response::new(Full::new(doc));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
                r
            };
            resp.headers_mut().insert(header::ETAG, etag);
            resp.headers_mut().insert("x-cache", x_cache);
            resp.headers_mut()
                .insert(header::AGE, HeaderValue::from(age));
            Ok(resp)
        }
        Method::PUT => {
            let pre = write_precondition(req.headers(), true)?;
            let body =
                tokio::time::timeout(timeout, read_json(req, state.config.server.max_body_bytes))
                    .await
                    .map_err(deadline)??;
            let tiers = state.tiers.clone();
            // Spawned so a client hanging up (or the deadline) cannot stop the write between
            // commit and cache updates; the tracker lets shutdown wait for it.
            let task = state
                .writes
                .spawn(async move { tiers.put(&resource, &param, &ck, body, pre).await });
            let outcome = tokio::time::timeout(timeout, task)
                .await
                .map_err(deadline)?
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            match outcome {
                WriteOutcome::Written(w) => {
                    let status = if w.created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    let mut resp = json_response(status, &json!({"version": w.version.0}));
                    resp.headers_mut().insert(header::ETAG, etag(w.version.0));
                    Ok(resp)
                }
                WriteOutcome::PreconditionFailed => Err(ApiError::PreconditionFailed),
            }
        }
        Method::DELETE => {
            let pre = write_precondition(req.headers(), false)?;
            let tiers = state.tiers.clone();
            let name = format!("{}/{key}", resource.name);
            let task = state
                .writes
                .spawn(async move { tiers.delete(&resource, &param, &ck, pre).await });
            let outcome = tokio::time::timeout(timeout, task)
                .await
                .map_err(deadline)?
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            match outcome {
                DeleteOutcome::Deleted { version } => {
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = StatusCode::NO_CONTENT;
                    resp.headers_mut().insert(header::ETAG, etag(version.0));
                    Ok(resp)
                }
                DeleteOutcome::NotFound => Err(ApiError::NotFound(name)),
                DeleteOutcome::PreconditionFailed => Err(ApiError::PreconditionFailed),
            }
        }
        _ => Err(ApiError::MethodNotAllowed(ALLOW_DOC)),
    }
}

/// `min_version=N` and `consistency=strong|default`; anything else is an error, so a typo
/// cannot silently weaken a read.
///
/// # Errors
/// 400 for an unknown parameter or a bad value.
pub fn read_options(query: Option<&str>) -> Result<ReadOptions, ApiError> {
    let mut options = ReadOptions::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "min_version" => {
                let v: i64 = value.parse().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "min_version must be a non-negative integer, not {value:?}"
                    ))
                })?;
                options.min_version = Some(Version(v));
            }
            "consistency" => match value {
                "strong" => options.strong = true,
                "default" => options.strong = false,
                _ => {
                    return Err(ApiError::InvalidQuery(format!(
                        "consistency must be strong or default, not {value:?}"
                    )))
                }
            },
            _ => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown query parameter {name:?}; known: min_version, consistency"
                )))
            }
        }
    }
    Ok(options)
}

/// Percent-decodes and checks a key: UTF-8, not empty, no NUL, within the limit.
///
/// # Errors
/// 400 for a malformed key, 414 for a long one.
pub fn decode_key(raw: &str, max_bytes: usize) -> Result<String, ApiError> {
    // Decoding only shrinks: a raw key three times the limit cannot fit.
    if raw.len() > max_bytes.saturating_mul(3) {
        return Err(ApiError::KeyTooLong(max_bytes));
    }
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            ApiError::InvalidKey("key is not valid UTF-8 after percent-decoding".into())
        })?;
    if key.is_empty() {
        return Err(ApiError::InvalidKey("key must not be empty".into()));
    }
    if key.contains('\0') {
        return Err(ApiError::InvalidKey("key must not contain NUL".into()));
    }
    if key.len() > max_bytes {
        return Err(ApiError::KeyTooLong(max_bytes));
    }
    Ok(key.into_owned())
}

/// `If-Match: "N"` or `*`; for PUT also `If-None-Match: *`.
///
/// # Errors
/// 400 for a header this API does not understand.
pub fn write_precondition(
    headers: &HeaderMap,
    allow_create_only: bool,
) -> Result<Precondition, ApiError> {
    let text = |name: &header::HeaderName| -> Result<Option<String>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(|s| s.trim().to_string())
                    .map_err(|_| ApiError::InvalidHeader(format!("{name} is not ASCII")))
            })
            .transpose()
    };
    let if_match = text(&header::IF_MATCH)?;
    let if_none_match = text(&header::IF_NONE_MATCH)?;
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(ApiError::InvalidHeader(
            "send either If-Match or If-None-Match, not both".into(),
        )),
        (Some(m), None) if m == "*" => Ok(Precondition::Exists),
        (Some(m), None) => {
            let version = m
                .strip_prefix('"')
                .and_then(|m| m.strip_suffix('"'))
                .filter(|v| !v.contains('"'))
                .ok_or_else(|| {
                    ApiError::InvalidHeader(format!(
                        "If-Match must be * or one ETag such as \"42\", not {m:?}"
                    ))
                })?;
            // A well-formed ETag we never issue can match nothing: 412, not 400.
            Ok(Precondition::Version(version.parse().unwrap_or(-1)))
        }
        (None, Some(m)) if m == "*" && allow_create_only => Ok(Precondition::Absent),
        (None, Some(m)) => Err(ApiError::InvalidHeader(format!(
            "If-None-Match on a write must be *, not {m:?}"
        ))),
        (None, None) => Ok(Precondition::None),
    }
}

async fn read_json(req: Request<Incoming>, max: usize) -> Result<serde_json::Value, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::BodyTooLarge(max));
    }
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::BodyTooLarge(max)
            } else {
                ApiError::MalformedJson(format!("could not read the body: {e}"))
            }
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::MalformedJson(
            "the body is empty; send a JSON document".into(),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever a client puts in a path, key decoding answers Ok or a client error, and
        /// an accepted key is within the limit and round-trips through percent-encoding.
        #[test]
        fn any_raw_key_decodes_or_is_refused(raw in ".{0,200}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let encoded: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            for candidate in [raw.as_str(), encoded.as_str()] {
                match decode_key(candidate, 64) {
                    Ok(key) => {
                        proptest::prop_assert!(!key.is_empty() && key.len() <= 64 && !key.contains('\0'));
                    }
                    Err(e) => {
                        let (status, _) = e.status_and_code();
                        proptest::prop_assert!(status.is_client_error());
                    }
                }
            }
        }

        /// Query strings never panic and never yield a negative min_version.
        #[test]
        fn any_query_parses_or_is_refused(query in ".{0,100}") {
            if let Ok(options) = read_options(Some(&query)) {
                proptest::prop_assert!(options.min_version.is_none_or(|v| v.0 >= 0));
            }
        }
    }

    #[test]
    fn keys_are_percent_decoded_and_checked() {
        assert_eq!(decode_key("a%2Fb%20c", 512).unwrap(), "a/b c");
        assert_eq!(decode_key("x/y", 512).unwrap(), "x/y");
        assert!(matches!(decode_key("", 512), Err(ApiError::InvalidKey(_))));
        assert!(matches!(
            decode_key("%00", 512),
            Err(ApiError::InvalidKey(_))
        ));
        assert!(matches!(
            decode_key("%ff", 512),
            Err(ApiError::InvalidKey(_))
        ));
        assert!(matches!(
            decode_key(&"a".repeat(513), 512),
            Err(ApiError::KeyTooLong(_))
        ));
        assert!(matches!(
            decode_key(&"%41".repeat(200), 100),
            Err(ApiError::KeyTooLong(_))
        ));
    }

    #[test]
    fn read_options_parse() {
        assert_eq!(read_options(None).unwrap(), ReadOptions::default());
        let o = read_options(Some("min_version=42&consistency=strong")).unwrap();
        assert_eq!(o.min_version, Some(Version(42)));
        assert!(o.strong);
        for bad in [
            "min_version=x",
            "min_version=-1",
            "consistency=eventual",
            "min_verison=1",
        ] {
            assert!(
                matches!(read_options(Some(bad)), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn preconditions_parse() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert_eq!(
            write_precondition(&h(&[]), true).unwrap(),
            Precondition::None
        );
        assert_eq!(
            write_precondition(&h(&[("if-match", "\"42\"")]), true).unwrap(),
            Precondition::Version(42)
        );
        assert_eq!(
            write_precondition(&h(&[("if-match", "*")]), true).unwrap(),
            Precondition::Exists
        );
        assert_eq!(
            write_precondition(&h(&[("if-none-match", "*")]), true).unwrap(),
            Precondition::Absent
        );
        assert_eq!(
            write_precondition(&h(&[("if-match", "\"abc\"")]), true).unwrap(),
            Precondition::Version(-1)
        );
        assert!(write_precondition(&h(&[("if-match", "42")]), true).is_err());
        assert!(write_precondition(&h(&[("if-none-match", "*")]), false).is_err());
        assert!(
            write_precondition(&h(&[("if-match", "*"), ("if-none-match", "*")]), true).is_err()
        );
    }
}
