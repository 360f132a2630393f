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

use super::consistency::{run_write, WriteMode};
use super::error::{Answer, ApiError, ALLOW_DOC};
use super::position;
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
        /// `consistency=` (see [`super::consistency`]).
        mode: WriteMode,
    },
    Delete {
        target: Target,
        pre: Precondition,
        mode: WriteMode,
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
        DocumentRequest::Put {
            doc,
            pre,
            body,
            mode,
        } => {
            can_hold(&pre)?;
            put(state, doc, pre, body, mode).await
        }
        DocumentRequest::Delete { target, pre, mode } => {
            can_hold(&pre)?;
            delete(state, target, pre, mode).await
        }
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
            let pre = write_precondition(req.headers(), true, target.doc.resource.shape_epoch())?;
            let mode = super::consistency::mode(state, req.uri().query())?;
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
                mode,
            }
        }
        Method::DELETE => DocumentRequest::Delete {
            pre: write_precondition(req.headers(), false, target.doc.resource.shape_epoch())?,
            mode: super::consistency::mode(state, req.uri().query())?,
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
    let (options, waited) = position::wait_for_position(state, options).await;
    let (doc, read) = match state.tiers.l1_hit(&doc, options).await {
        Some(hit) => (doc, hit),
        None => {
            let below = |doc: DocRef| async move {
                tokio::time::timeout(timeout, state.tiers.get_below_l1(&doc, options))
                    .await
                    .map_err(deadline(timeout))
            };
            match below(doc.clone()).await? {
                Err(e) if e.may_be_schema_change() => {
                    // The ETag is the resource's as the document was read: the new one's.
                    let doc = on_new_shape(state, &doc).await?;
                    let read = below(doc.clone()).await??;
                    (doc, read)
                }
                read => (doc, read?),
            }
        }
    };
    let x_cache = HeaderValue::from_static(read.tier.as_str());
    let age = read.cached.age_secs();
    let State::Value(body) = read.cached.state else {
        let mut resp =
            ApiError::NotFound(format!("{}/{key}", doc.resource.name)).into_response(state);
        resp.headers_mut().insert("x-cache", x_cache);
        position::add_headers(resp.headers_mut(), waited);
        return Ok(resp);
    };
    let etag = etag(&doc.resource, read.cached.version.0);
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
    position::add_headers(resp.headers_mut(), waited);
    if options
        .min_version
        .is_some_and(|min| read.cached.version < min)
    {
        // Postgres itself holds nothing as new: say so rather than pass it off as fresh.
        resp.headers_mut().insert(
            position::MIN_VERSION_HEADER,
            HeaderValue::from_static("unmet"),
        );
    }
    Ok(resp)
}

/// PUT: 201 created or 200 replaced, with the new version.
async fn put(
    state: &HttpState,
    doc: DocRef,
    pre: Precondition,
    body: crate::model::JsonText,
    mode: WriteMode,
) -> Answer {
    let timeout = state.config.server.request_timeout;
    let write = |doc: DocRef, body: crate::model::JsonText| {
        let (pre, commit) = (pre.clone(), mode.commit.clone());
        let tiers = state.tiers.clone();
        run_write(state, mode.eventual, timeout, move |early| async move {
            tiers.put(&doc, body, pre, commit, early).await
        })
    };
    let (resource, outcome) = match write(doc.clone(), body.clone()).await? {
        Err(e) if e.may_be_schema_change() => {
            let doc = on_new_shape(state, &doc).await?;
            (doc.resource.clone(), write(doc, body).await??)
        }
        outcome => (doc.resource.clone(), outcome?),
    };
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
            resp.headers_mut()
                .insert(header::ETAG, etag(&resource, w.version.0));
            Ok(resp)
        }
        WriteOutcome::PreconditionFailed => Err(ApiError::precondition_failed(&pre)),
    }
}

/// DELETE: 204 with the ETag of the delete, 404 when absent.
async fn delete(state: &HttpState, target: Target, pre: Precondition, mode: WriteMode) -> Answer {
    let timeout = state.config.server.request_timeout;
    let Target { doc, key } = target;
    let name = format!("{}/{key}", doc.resource.name);
    let write = |doc: DocRef| {
        let (pre, commit) = (pre.clone(), mode.commit.clone());
        let tiers = state.tiers.clone();
        run_write(state, mode.eventual, timeout, move |early| async move {
            tiers.delete(&doc, pre, commit, early).await
        })
    };
    let (resource, outcome) = match write(doc.clone()).await? {
        Err(e) if e.may_be_schema_change() => {
            let doc = on_new_shape(state, &doc).await?;
            (doc.resource.clone(), write(doc).await??)
        }
        outcome => (doc.resource.clone(), outcome?),
    };
    match outcome {
        DeleteOutcome::Deleted { version } => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp.headers_mut()
                .insert(header::ETAG, etag(&resource, version.0));
            Ok(resp)
        }
        DeleteOutcome::NotFound => Err(ApiError::NotFound(name)),
        DeleteOutcome::PreconditionFailed => Err(ApiError::precondition_failed(&pre)),
    }
}

/// `doc` on its resource as the catalog describes it once read again: called after a
/// statement failed the way one does on a table changed since the catalog was read (a
/// column renamed, dropped or added). The failed statement changed nothing, so the request
/// runs once more on what this returns.
///
/// # Errors
/// 503 `schema_changed` when the catalog could not be read again in time;
/// `resource_unavailable` with the reason when the table no longer fits; the key's error
/// when it no longer fits the key column.
pub(super) async fn on_new_shape(state: &HttpState, doc: &DocRef) -> Result<DocRef, ApiError> {
    let name = &doc.resource.name;
    if !state
        .catalog
        .recheck_and_wait(state.config.server.request_timeout)
        .await
    {
        return Err(ApiError::SchemaChanged(format!(
            "resource {name:?}: a statement failed as on a changed table, and its table could \
             not be read again in time"
        )));
    }
    let catalog = state.catalog()?;
    let resource = catalog
        .get(name)
        .ok_or_else(|| match catalog.unavailable(name) {
            Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
            None => ApiError::UnknownResource(name.clone()),
        })?;
    DocRef::new(resource, &doc.key.to_string()).map_err(ApiError::from)
}

/// 412 at once when `If-Match` names no ETag that can be current (see
/// `request::precondition`): one of another shape epoch than the resource's names a
/// rendering of the row that no longer is, whatever its version.
pub(super) fn can_hold(pre: &Precondition) -> Result<(), ApiError> {
    match pre {
        Precondition::Versions(v) if v.is_empty() => Err(ApiError::precondition_failed(pre)),
        _ => Ok(()),
    }
}

/// Maps a missed deadline to 504.
fn deadline(timeout: Duration) -> impl Fn(tokio::time::error::Elapsed) -> ApiError {
    move |_| ApiError::Timeout(timeout)
}
