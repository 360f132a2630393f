//! `GET /v1/{resource}?watch=true[&prefix=p]`: the change stream, as Server-Sent Events
//! (plain HTTP: it goes through any proxy, and a browser's `EventSource` reads it).
//!
//! ```text
//! id: 5f1c2a9b3d-42
//! event: change
//! data: {"resource":"kv","key":"a","version":12,"op":"put"}
//!
//! event: position
//! data: {"lsn":"0/16B3748"}
//!
//! event: reset
//! data: {"reason":"the redis feed went down; changes may be missed until it is back"}
//! ```
//!
//! With the `wal` source, a `position` follows each batch of changes this instance applied,
//! and each relay heartbeat (every `feeds.heartbeat_interval`, so it moves when nothing else
//! does):
//! every change committed up to that WAL position has been sent before it (compare a
//! writer's `pg_current_wal_lsn()` after its commit). The stream's response carries
//! `X-Syncar-LSN` as a GET does.
//!
//! A `change` is sent once this instance has applied it to its own L1: a read here after the
//! event never gets the older copy. `op` is `put`, `delete`, or `flush` (every key of the
//! resource; no `key`). A `reset` means: re-read what you hold (see [`crate::watch`]).
//! Reconnecting with `Last-Event-ID` resumes. A watcher that falls behind is sent a `reset`
//! and closed; a comment line every 15 s keeps idle proxies from closing the stream.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::response::Body;
use super::state::HttpState;
use crate::telemetry::{WATCHERS, WATCH_EVENTS, WATCH_RESETS};
use crate::watch::{Change, Event};

/// Idle time after which a comment line is sent.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The query of a watch: `watch=true` (required), `prefix` (optional, a key prefix).
pub(super) fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// Opens the stream for resource `name`.
///
/// # Errors
/// 404 for an unknown resource, 400 for another query parameter, 503 when
/// `server.max_watchers` watch already.
pub(super) fn open(
    state: &HttpState,
    req: &Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let catalog = state.catalog()?;
    if catalog.get(name).is_none() {
        return Err(match catalog.unavailable(name) {
            Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
            None => ApiError::UnknownResource(name.to_string()),
        });
    }
    let prefix = watch_prefix(req.uri().query())?;
    let hub = state.tiers.watch().clone();
    if hub.watchers() >= state.config.server.max_watchers {
        return Err(ApiError::Overloaded);
    }
    let last = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok());
    let mut sub = hub.subscribe(last);
    // What a fresh watcher should know at once: this instance cannot vouch for changes now.
    if !state.coherence.l1_usable() && last.is_none() {
        sub.backlog.push(Event::Reset {
            reason: "a feed is down; changes may be missed until it is back".into(),
        });
    }
    metrics::gauge!(WATCHERS).increment(1.0);
    let watcher = Watcher {
        hub,
        backlog: sub.backlog.into(),
        live: sub.live,
        resource: name.to_string(),
        prefix,
        sent: 0,
        done: false,
    };
    let stream = futures_util::stream::unfold(watcher, Watcher::next_frame);
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    super::position::add_headers(headers, super::position::Waited::now(state));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// The key prefix a watch's query asks for (empty: every key).
///
/// # Errors
/// 400 for a prefix that is not UTF-8, or a parameter other than `watch` and `prefix`.
fn watch_prefix(query: Option<&str>) -> Result<String, ApiError> {
    let mut prefix = String::new();
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("watch", "true" | "1")) => {}
            Some(("prefix", p)) => {
                prefix = percent_encoding::percent_decode_str(p)
                    .decode_utf8()
                    .map_err(|_| ApiError::InvalidQuery("prefix is not UTF-8".into()))?
                    .into_owned();
            }
            _ if pair.is_empty() => {}
            _ => {
                return Err(ApiError::InvalidQuery(format!(
                    "a watch takes watch=true and prefix=..., not {pair:?}"
                )))
            }
        }
    }
    Ok(prefix)
}

/// One open stream: what it has yet to send, and what it asked for. Counted in
/// `syncar_watchers` while it lives.
struct Watcher {
    hub: std::sync::Arc<crate::watch::WatchHub>,
    backlog: std::collections::VecDeque<Event>,
    live: tokio::sync::broadcast::Receiver<Event>,
    resource: String,
    prefix: String,
    /// The last change sent: live events up to it were in the backlog.
    sent: u64,
    /// Sent its last frame (a watcher that fell behind).
    done: bool,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        metrics::gauge!(WATCHERS).decrement(1.0);
    }
}

impl Watcher {
    /// The stream's next frame: the backlog first, then live events, each one this watcher
    /// asked for; a keep-alive after [`KEEPALIVE`] of silence; `None` ends the stream.
    async fn next_frame(mut self) -> Option<(Result<Frame<Bytes>, Infallible>, Watcher)> {
        if self.done {
            return None;
        }
        loop {
            let event = match self.backlog.pop_front() {
                Some(event) => event,
                None => match self.receive().await? {
                    Ok(event) => event,
                    Err(frame) => return Some((Ok(Frame::data(frame)), self)),
                },
            };
            if let Some(text) = self.render(event) {
                return Some((Ok(Frame::data(text)), self));
            }
        }
    }

    /// Waits for the next live event. `Err` holds a frame to send instead: a keep-alive
    /// after [`KEEPALIVE`] of silence, or the reset of a watcher that fell behind (its
    /// last). `None`: the hub closed.
    async fn receive(&mut self) -> Option<Result<Event, Bytes>> {
        let next = tokio::select! {
            _ = self.hub.closed() => return None,
            next = tokio::time::timeout(KEEPALIVE, self.live.recv()) => next,
        };
        match next {
            Err(_) => Some(Err(Bytes::from_static(b": keep-alive\n\n"))),
            Ok(Ok(event)) => Some(Ok(event)),
            Ok(Err(RecvError::Lagged(_))) => {
                self.done = true;
                metrics::counter!(WATCH_RESETS).increment(1);
                Some(Err(reset_text(
                    "this watcher fell behind; reconnect and re-read",
                )))
            }
            Ok(Err(RecvError::Closed)) => None,
        }
    }

    /// `event` as SSE text; `None` for a change this watcher did not ask for, or was sent
    /// already from the backlog.
    fn render(&mut self, event: Event) -> Option<Bytes> {
        match event {
            Event::Reset { reason } => {
                metrics::counter!(WATCH_RESETS).increment(1);
                Some(reset_text(&reason))
            }
            Event::Position(lsn) => Some(Bytes::from(format!(
                "event: position\ndata: {}\n\n",
                json!({ "lsn": pgwire_replication::Lsn::from_u64(lsn).to_string() })
            ))),
            Event::Change(c) => {
                if c.id <= self.sent || !matches(&c, &self.resource, &self.prefix) {
                    return None;
                }
                self.sent = c.id;
                metrics::counter!(WATCH_EVENTS).increment(1);
                Some(Bytes::from(format!(
                    "id: {}\nevent: change\ndata: {}\n\n",
                    self.hub.id(c.id),
                    serde_json::to_string(&*c).unwrap_or_default()
                )))
            }
        }
    }
}

/// Whether `change` is one this watcher asked for (a flush of its resource always is).
fn matches(change: &Change, resource: &str, prefix: &str) -> bool {
    change.resource == resource
        && change
            .key
            .as_deref()
            .is_none_or(|key| key.starts_with(prefix))
}

/// A `reset` event with its reason.
fn reset_text(reason: &str) -> Bytes {
    Bytes::from(format!(
        "event: reset\ndata: {}\n\n",
        json!({ "reason": reason })
    ))
}
