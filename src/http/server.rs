//! The hyper server loop and routing: one task per connection, load shedding, the token
//! check, and which handler answers which path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::error::{read_only, Answer, ApiError};
use super::response::Body;
use super::state::HttpState;
use super::{admin, batch, document, transaction, watch};

/// A bound socket connections are accepted from: TCP, or a Unix domain socket.
pub trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept_io(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        // Small answers must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

#[cfg(unix)]
impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        Ok(stream)
    }
}

/// Accepts connections until `shutdown`, then lets in-flight requests finish for at most
/// `server.shutdown_grace` before closing what is left.
pub async fn serve<L: Accept>(
    listener: L,
    listener_kind: Listener,
    state: Arc<HttpState>,
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
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept_io() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
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
    /// `server.admin_listen`: `/healthz`, `/readyz` and `/metrics` without a token, and the
    /// debug view of one key (`/debug/keys/{resource}/{key}`, behind the token if one is
    /// configured), apart from the API's load shedding (probes and scrapes must not fail
    /// because the API is busy); bounded on its own.
    Admin,
}

/// One request, answered with a body of either kind.
async fn handle(state: &HttpState, listener: Listener, req: Request<Incoming>) -> Response<Body> {
    if listener == Listener::Api
        && req.method() == Method::GET
        && watch::is_watch(req.uri().query())
    {
        if let Some(name) = req
            .uri()
            .path()
            .strip_prefix("/v1/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            let started = Instant::now();
            let method = req.method().clone();
            let result = if authorized(state, req.headers()) {
                watch::open(state, &req, name)
            } else {
                Err(ApiError::Unauthorized)
            };
            let resp = result.unwrap_or_else(|e| e.into_response(state).map(BodyExt::boxed_unsync));
            state
                .http_metrics
                .record("watch", &method, resp.status(), started.elapsed());
            return resp;
        }
    }
    handle_whole(state, listener, req)
        .await
        .map(BodyExt::boxed_unsync)
}

/// One request answered with a whole body: route, answer, count.
async fn handle_whole(
    state: &HttpState,
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
        let (route, result) = match path.strip_prefix("/debug/keys/") {
            // It names keys and their versions: behind the token, when there is one.
            Some(_) if !authorized(state, req.headers()) => ("debug", Err(ApiError::Unauthorized)),
            Some(rest) => (
                "debug",
                match read_only(&method) {
                    Ok(()) => admin::debug_key(state, rest).await,
                    Err(e) => Err(e),
                },
            ),
            None => admin_route(state, &method, &path)
                .await
                .unwrap_or(("other", Err(ApiError::NoRoute))),
        };
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
            "/openapi.json" => ("openapi", read_only(&method).map(|_| admin::openapi(state))),
            "/v1" => ("transaction", transaction::handle(state, req).await),
            p => match p.strip_prefix("/v1/") {
                // A resource name never holds '/', a key is never empty.
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    ("batch", batch::handle(state, req, name).await)
                }
                Some(rest) => ("document", document::handle(state, req, rest).await),
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

/// `/healthz`, `/readyz` and `/metrics`, served on both listeners; `None` for other paths.
async fn admin_route(
    state: &HttpState,
    method: &Method,
    path: &str,
) -> Option<(&'static str, Answer)> {
    let answer = match path {
        "/healthz" => ("healthz", read_only(method).map(|_| admin::healthz())),
        "/readyz" => (
            "readyz",
            match read_only(method) {
                Ok(()) => Ok(admin::readyz(state).await),
                Err(e) => Err(e),
            },
        ),
        "/metrics" => ("metrics", read_only(method).map(|_| admin::scrape(state))),
        _ => return None,
    };
    Some(answer)
}

/// With a token configured, the request must carry it as `Authorization: Bearer <token>`,
/// compared in constant time.
fn authorized(state: &HttpState, headers: &HeaderMap) -> bool {
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
