//! `POST /v1/{resource}`: a batch get. The body names keys, `{"keys": ["a", "b"]}`; the
//! answer gives each key's outcome in the order asked, as a single GET would have answered
//! it: `{"results": [{"key", "status", "version", "tier", "document"} | {"key", "status",
//! "error"}]}`. The route cannot collide with a document's (`/v1/{resource}/{key}`: a key
//! is never empty). `min_version` and `consistency` apply to every key.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::error::{Answer, ApiError, ALLOW_BATCH};
use super::request::{check_key, read_json, read_options, BodyKey};
use super::response::JSON;
use super::state::HttpState;
use crate::model::State;
use crate::resource::DocRef;

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
    let resource = catalog
        .get(name)
        .cloned()
        .ok_or_else(|| match catalog.unavailable(name) {
            Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
            None => ApiError::UnknownResource(name.to_string()),
        })?;
    let server = &state.config.server;
    let options = read_options(req.uri().query())?;
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
    // Each key checked as a path's would be; a bad one is answered alone.
    let mut docs = Vec::with_capacity(keys.len());
    let mut refused: Vec<Option<ApiError>> = Vec::with_capacity(keys.len());
    for key in &keys {
        match check_key(key, server.max_key_bytes)
            .and_then(|()| DocRef::new(&resource, key).map_err(ApiError::from))
        {
            Ok(doc) => {
                docs.push(doc);
                refused.push(None);
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    let (options, waited) = super::position::wait_for_position(state, options).await;
    let reads = tokio::time::timeout(timeout, state.tiers.get_many(&docs, options))
        .await
        .map_err(|_| ApiError::Timeout(timeout))?;
    let mut reads = reads.into_iter();
    let mut out = Vec::with_capacity(64 + keys.len() * 64);
    out.extend_from_slice(b"{\"results\":[");
    for (i, (key, refusal)) in keys.iter().zip(refused).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut out, key).expect("a string serializes");
        let error = match refusal {
            Some(e) => Some(e),
            None => match reads.next() {
                Some(Ok(read)) => {
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
                        _ => out.extend_from_slice(
                            format!(",\"status\":404,\"tier\":\"{tier}\"").as_bytes(),
                        ),
                    }
                    None
                }
                Some(Err(e)) => {
                    if e.may_be_schema_change() {
                        // Answered per key (503 `schema_changed`); the next batch finds the
                        // catalog read again.
                        state.catalog.request_recheck();
                    }
                    Some(ApiError::from(e))
                }
                None => Some(ApiError::Internal("a key was not answered".into())),
            },
        };
        if let Some(e) = error {
            let (status, code) = e.status_and_code();
            if let ApiError::Internal(detail) = &e {
                tracing::error!(error = %state.secrets.scrub(detail), "internal error in a batch");
            }
            let error = serde_json::json!({
                "code": code,
                "message": state.secrets.scrub(&e.to_string()),
            });
            out.extend_from_slice(format!(",\"status\":{},\"error\":", status.as_u16()).as_bytes());
            serde_json::to_writer(&mut out, &error).expect("JSON serializes");
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(out)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    super::position::add_headers(resp.headers_mut(), waited);
    Ok(resp)
}
