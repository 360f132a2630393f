//! `POST /v1/{resource}`: a batch get. The body names keys, `{"keys": ["a", "b"]}`; the
//! answer gives each key's outcome in the order asked, as a single GET would have answered
//! it: `{"results": [{"key", "status", "version", "tier", "document"} | {"key", "status",
//! "error"}]}`. The route cannot collide with a document's (`/v1/{resource}/{key}`: a key
//! is never empty). `min_version` and `consistency` apply to every key.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::error::{Answer, ApiError, ALLOW_BATCH};
use super::request::{check_key, read_json, read_options, BodyKey};
use super::response::JSON;
use super::state::HttpState;
use crate::db::DbError;
use crate::model::State;
use crate::resource::{Catalog, DocRef, Resource};
use crate::tiers::ReadResult;

/// The body of a batch get: at most `server.max_batch_keys` (1000) keys.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchGet {
    /// The keys, as they are (not percent-encoded): strings, or integers for an
    /// integer-keyed resource.
    keys: Vec<BodyKey>,
}

/// Answers `POST /v1/{resource}`.
///
/// # Errors
/// 405 for another method, 404 for an unknown resource, 400 for a body that is not
/// `{"keys": [...]}`, 413 for more than `server.max_batch_keys` keys. Per-key problems
/// (a bad key, Postgres failing for it) are answered per key, in a 200.
pub(super) async fn handle(state: &HttpState, req: Request<Incoming>, name: &str) -> Answer {
    if req.method() != Method::POST {
        return Err(ApiError::MethodNotAllowed(ALLOW_BATCH));
    }
    let catalog = state.catalog()?;
    let resource = served(&catalog, name)?;
    let options = read_options(req.uri().query())?;
    let keys = read_keys(state, req).await?;
    let (docs, refused) = resolve_keys(&resource, &keys, state.config.server.max_key_bytes);
    let (options, waited) = super::position::wait_for_position(state, options).await;
    let timeout = state.config.server.request_timeout;
    let reads = tokio::time::timeout(timeout, state.tiers.get_many(&docs, options))
        .await
        .map_err(|_| ApiError::Timeout(timeout))?;
    let body = results_json(state, &keys, refused, reads);
    let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    super::position::add_headers(resp.headers_mut(), waited);
    Ok(resp)
}

/// The served resource `name`.
///
/// # Errors
/// 503 `resource_unavailable` for one left out (with why), 404 for one not configured.
fn served(catalog: &Catalog, name: &str) -> Result<Arc<Resource>, ApiError> {
    catalog
        .get(name)
        .cloned()
        .ok_or_else(|| match catalog.unavailable(name) {
            Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
            None => ApiError::UnknownResource(name.to_string()),
        })
}

/// The keys the body names, as text, within `server.request_timeout`.
///
/// # Errors
/// 400 for a body that is not `{"keys": [...]}`, 413 for one too large or with more than
/// `server.max_batch_keys` keys, 408 when it does not arrive in time.
async fn read_keys(state: &HttpState, req: Request<Incoming>) -> Result<Vec<String>, ApiError> {
    let server = &state.config.server;
    let timeout = server.request_timeout;
    let body = tokio::time::timeout(timeout, read_json(req, server.max_body_bytes))
        .await
        .map_err(|_| ApiError::Timeout(timeout))??;
    let batch: BatchGet = serde_json::from_str(body.as_str()).map_err(|e| {
        ApiError::InvalidBody(format!("a batch get is {{\"keys\": [\"k1\", ...]}}: {e}"))
    })?;
    let keys: Vec<String> = batch.keys.into_iter().map(BodyKey::into_text).collect();
    if keys.len() > server.max_batch_keys {
        return Err(ApiError::TooManyKeys(keys.len(), server.max_batch_keys));
    }
    Ok(keys)
}

/// Each key checked as a path's would be: the documents of the good ones, in order, and
/// for every key its refusal, if any (a bad key is answered alone).
fn resolve_keys(
    resource: &Arc<Resource>,
    keys: &[String],
    max_key_bytes: usize,
) -> (Vec<DocRef>, Vec<Option<ApiError>>) {
    let mut docs = Vec::with_capacity(keys.len());
    let mut refused = Vec::with_capacity(keys.len());
    for key in keys {
        match check_key(key, max_key_bytes)
            .and_then(|()| DocRef::new(resource, key).map_err(ApiError::from))
        {
            Ok(doc) => {
                docs.push(doc);
                refused.push(None);
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    (docs, refused)
}

/// `{"results": [...]}`: each key's outcome in the order asked, its refusal or its read
/// (`reads` are the reads of the keys not refused, in order).
fn results_json(
    state: &HttpState,
    keys: &[String],
    refused: Vec<Option<ApiError>>,
    reads: Vec<Result<ReadResult, DbError>>,
) -> Vec<u8> {
    let mut reads = reads.into_iter();
    let mut out = Vec::with_capacity(64 + keys.len() * 64);
    out.extend_from_slice(b"{\"results\":[");
    for (i, (key, refusal)) in keys.iter().zip(refused).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut out, key).expect("a string serializes");
        let outcome = match refusal {
            Some(e) => Err(e),
            None => read_outcome(state, reads.next()),
        };
        match outcome {
            Ok(read) => write_read(&mut out, &read),
            Err(e) => write_error(state, &mut out, &e),
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// One key's read as the client is answered: a failure that may come from a changed table
/// asks for the catalog to be read again (the next batch finds it).
fn read_outcome(
    state: &HttpState,
    read: Option<Result<ReadResult, DbError>>,
) -> Result<ReadResult, ApiError> {
    match read {
        Some(Ok(read)) => Ok(read),
        Some(Err(e)) => {
            if e.may_be_schema_change() {
                // Answered per key (503 `schema_changed`).
                state.catalog.request_recheck();
            }
            Err(ApiError::from(e))
        }
        None => Err(ApiError::Internal("a key was not answered".into())),
    }
}

/// A read's fields: 200 with its version, tier and document, or 404 with its tier.
fn write_read(out: &mut Vec<u8>, read: &ReadResult) {
    let version = read.cached.version.0;
    let tier = read.tier.as_str();
    match &read.cached.state {
        State::Value(doc) => {
            out.extend_from_slice(
                format!(",\"status\":200,\"version\":{version},\"tier\":\"{tier}\",\"document\":")
                    .as_bytes(),
            );
            out.extend_from_slice(doc);
        }
        _ => out.extend_from_slice(format!(",\"status\":404,\"tier\":\"{tier}\"").as_bytes()),
    }
}

/// An error's fields: its status, and `{"code", "message"}` as a single GET's body, scrubbed.
fn write_error(state: &HttpState, out: &mut Vec<u8>, e: &ApiError) {
    let (status, code) = e.status_and_code();
    if let ApiError::Internal(detail) = e {
        tracing::error!(error = %state.secrets.scrub(detail), "internal error in a batch");
    }
    let error = serde_json::json!({
        "code": code,
        "message": state.secrets.scrub(&e.to_string()),
    });
    out.extend_from_slice(format!(",\"status\":{},\"error\":", status.as_u16()).as_bytes());
    serde_json::to_writer(out, &error).expect("JSON serializes");
}
