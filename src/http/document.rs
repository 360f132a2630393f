//! `/v1/{resource}/{key}`: the request is parsed first, whole (target, query, conditions,
//! body), into one [`DocumentRequest`]; then one handler per method runs it against the
//! tiers. Only what can wait on Postgres or Redis runs under `server.request_timeout` (an L1
//! hit cannot).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::error::{Answer, ApiError, ALLOW_DOC};
use super::request::{read_json, read_options, target, write_precondition, Target};
use super::response::{etag, json_response, JSON};
use super::state::HttpState;
use crate::db::{DeleteOutcome, WriteOutcome};
use crate::model::State;
use crate::resource::{DocRef, Precondition};
use crate::tiers::ReadOptions;

/// A document request, parsed and checked, before any tier is touched.
enum DocumentRequest {
    /// GET or HEAD.
    Read {
        target: Target,
        options: ReadOptions,
        /// The raw `If-None-Match`, compared with the ETag of what is read.
        if_none_match: Option<String>,
    },
    Put {
        doc: DocRef,
        pre: Precondition,
        body: crate::model::JsonText,
    },
    Delete {
        target: Target,
        pre: Precondition,
    },
}

/// Parses, then answers, a request for `/v1/{rest}`.
pub(super) async fn handle(state: &HttpState, req: Request<Incoming>, rest: &str) -> Answer {
    match parse(state, req, rest).await? {
        DocumentRequest::Read {
            target,
            options,
            if_none_match,
        } => get(state, target, options, if_none_match).await,
        DocumentRequest::Put { doc, pre, body } => put(state, doc, pre, body).await,
        DocumentRequest::Delete { target, pre } => delete(state, target, pre).await,
    }
}

async fn parse(
    state: &HttpState,
    req: Request<Incoming>,
    rest: &str,
) -> Result<DocumentRequest, ApiError> {
    let method = req.method().clone();
    if !matches!(
        method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE
    ) {
        return Err(ApiError::MethodNotAllowed(ALLOW_DOC));
    }
    let server = &state.config.server;
    let target = target(state.catalog()?.as_ref(), rest, server.max_key_bytes)?;
    Ok(match method {
        Method::PUT => {
            let pre = write_precondition(req.headers(), true)?;
            let body = tokio::time::timeout(
                server.request_timeout,
                read_json(req, server.max_body_bytes),
            )
            .await
            .map_err(deadline(server.request_timeout))??;
            DocumentRequest::Put {
                doc: target.doc,
                pre,
                body,
            }
        }
        Method::DELETE => DocumentRequest::Delete {
            pre: write_precondition(req.headers(), false)?,
            target,
        },
        _ => DocumentRequest::Read {
            options: read_options(req.uri().query())?,
            if_none_match: req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            target,
        },
    })
}

/// GET and HEAD: L1, else the tiers below under the deadline. 304 when `If-None-Match`
/// names the version read (or is `*`); a cached absence is a 404 with `X-Cache`.
async fn get(
    state: &HttpState,
    target: Target,
    options: ReadOptions,
    if_none_match: Option<String>,
) -> Answer {
    let timeout = state.config.server.request_timeout;
    let Target { doc, key } = target;
    let read = match state.tiers.l1_hit(&doc, options).await {
        Some(hit) => hit,
        None => tokio::time::timeout(timeout, state.tiers.get_below_l1(&doc, options))
            .await
            .map_err(deadline(timeout))??,
    };
    let x_cache = HeaderValue::from_static(read.tier.as_str());
    let age = read.cached.age_secs();
    let State::Value(body) = read.cached.state else {
        let mut resp =
            ApiError::NotFound(format!("{}/{key}", doc.resource.name)).into_response(state);
        resp.headers_mut().insert("x-cache", x_cache);
        return Ok(resp);
    };
    let etag = etag(read.cached.version.0);
    let not_modified = if_none_match.is_some_and(|v| {
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
        let mut r = Response::new(Full::new(body));
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

/// PUT: 201 created or 200 replaced, with the new version.
async fn put(
    state: &HttpState,
    doc: DocRef,
    pre: Precondition,
    body: crate::model::JsonText,
) -> Answer {
    let timeout = state.config.server.request_timeout;
    let tiers = state.tiers.clone();
    // Spawned so a client hanging up (or the deadline) cannot stop the write between commit
    // and cache updates; the tracker lets shutdown wait for it.
    let task = state
        .writes
        .spawn(async move { tiers.put(&doc, body, pre).await });
    let outcome = tokio::time::timeout(timeout, task)
        .await
        .map_err(deadline(timeout))?
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    match outcome {
        WriteOutcome::Written(w) => {
            let status = if w.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let written = super::response::Written {
                version: w.version.0,
            };
            let body = serde_json::to_value(written).expect("a version serializes");
            let mut resp = json_response(status, &body);
            resp.headers_mut().insert(header::ETAG, etag(w.version.0));
            Ok(resp)
        }
        WriteOutcome::PreconditionFailed => Err(ApiError::precondition_failed(pre)),
    }
}

/// DELETE: 204 with the ETag of the delete, 404 when absent.
async fn delete(state: &HttpState, target: Target, pre: Precondition) -> Answer {
    let timeout = state.config.server.request_timeout;
    let tiers = state.tiers.clone();
    let Target { doc, key } = target;
    let name = format!("{}/{key}", doc.resource.name);
    let task = state
        .writes
        .spawn(async move { tiers.delete(&doc, pre).await });
    let outcome = tokio::time::timeout(timeout, task)
        .await
        .map_err(deadline(timeout))?
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    match outcome {
        DeleteOutcome::Deleted { version } => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp.headers_mut().insert(header::ETAG, etag(version.0));
            Ok(resp)
        }
        DeleteOutcome::NotFound => Err(ApiError::NotFound(name)),
        DeleteOutcome::PreconditionFailed => Err(ApiError::precondition_failed(pre)),
    }
}

/// Maps a missed deadline to 504.
fn deadline(timeout: Duration) -> impl Fn(tokio::time::error::Elapsed) -> ApiError {
    move |_| ApiError::Timeout(timeout)
}
