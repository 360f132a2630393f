//! Why a request failed, as the client is told, and the one mapping from error to HTTP status
//! and error code.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

use super::response::json_response;
use super::state::HttpState;
use crate::db::DbError;
use crate::model::MalformedJson;
use crate::resource::{KeyError, NotReady, Precondition};

pub(super) const ALLOW_DOC: &str = "GET, HEAD, PUT, DELETE";
pub(super) const ALLOW_READ: &str = "GET, HEAD";
pub(super) const ALLOW_BATCH: &str = "POST";

/// A response, or why there is none.
pub(super) type Answer = Result<Response<Full<Bytes>>, ApiError>;

/// Only GET and HEAD.
///
/// # Errors
/// 405 with `Allow` for any other method.
pub(super) fn read_only(method: &Method) -> Result<(), ApiError> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(ApiError::MethodNotAllowed(ALLOW_READ)),
    }
}

/// Why a request failed, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such route")]
    NoRoute,
    #[error("unknown resource {0:?}")]
    UnknownResource(String),
    /// [`ApiError::UnknownResource`] with what asked for it named (a transaction's
    /// operation): the whole message.
    #[error("{0}")]
    UnknownResourceIn(String),
    /// A configured resource left out of the catalog (its table does not exist or does not
    /// fit); the reason. A table fixed is noticed within `feeds.lease`; a configuration
    /// fixed needs a restart.
    #[error("{0}; fix the table (syncar notices) or the configuration (restart syncar)")]
    ResourceUnavailable(String),
    /// The table changed under a request, and the catalog read again did not make it fit.
    #[error("{0}")]
    SchemaChanged(String),
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
    #[error("{0}")]
    InvalidBody(String),
    #[error("a batch names {0} keys or operations; server.max_batch_keys allows {1}")]
    TooManyKeys(usize, usize),
    #[error("key exceeds {0} bytes")]
    KeyTooLong(usize),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    Unavailable(String),
    /// A write asked to return only once every live instance applied it
    /// (`consistency=strong`, `feeds.synchronous_writes`), and this instance cannot see a
    /// relay Postgres waits for: why. Nothing was written.
    #[error("{0}")]
    NotSynchronous(String),
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
            UnknownResource(_) | UnknownResourceIn(_) => {
                (StatusCode::NOT_FOUND, "unknown_resource")
            }
            ResourceUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "resource_unavailable"),
            SchemaChanged(_) => (StatusCode::SERVICE_UNAVAILABLE, "schema_changed"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            InvalidKey(_) => (StatusCode::BAD_REQUEST, "invalid_key"),
            InvalidHeader(_) => (StatusCode::BAD_REQUEST, "invalid_header"),
            InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            TooManyKeys(..) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_keys"),
            KeyTooLong(_) => (StatusCode::URI_TOO_LONG, "key_too_long"),
            Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_document"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            NotSynchronous(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_synchronous"),
            Starting(_) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
            Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        }
    }

    pub(super) fn into_response(self, state: &HttpState) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %state.secrets.scrub(detail), "internal error");
        }
        let body = super::response::ErrorBody {
            error: super::response::ErrorDetail {
                code: code.to_string(),
                message: state.secrets.scrub(&self.to_string()),
            },
        };
        let mut resp = json_response(
            status,
            &serde_json::to_value(body).expect("an error serializes"),
        );
        let headers = resp.headers_mut();
        match self {
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable(_)
            | ApiError::Starting(_)
            | ApiError::SchemaChanged(_)
            | ApiError::NotSynchronous(_) => {
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

impl ApiError {
    /// 412, saying which precondition failed and what that means for the key.
    pub(super) fn precondition_failed(pre: &Precondition) -> ApiError {
        ApiError::PreconditionFailed(match pre {
            Precondition::Absent => {
                "the key exists (If-None-Match: * writes only a new key)".into()
            }
            Precondition::Exists => "the key does not exist (If-Match: *)".into(),
            Precondition::Versions(v) => match v.as_slice() {
                [] => "no ETag in If-Match can be current: each names another shape of the table \
                       (it changed since), is weak, or was never issued; read the document again \
                       for its ETag"
                    .into(),
                [v] => format!(
                    "the current version is not \"{v}\", or the key does not exist (If-Match)"
                ),
                vs => format!(
                    "the current version is none of {}, or the key does not exist (If-Match)",
                    vs.iter()
                        .map(|v| format!("\"{v}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            Precondition::None => "the write's precondition does not hold".into(),
        })
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(m) => ApiError::Unavailable(format!("postgres unavailable: {m}")),
            DbError::Rejected(m) => ApiError::Unprocessable(m),
            DbError::Conflict(m) => ApiError::Conflict(m),
            DbError::SchemaChanged(m) => ApiError::SchemaChanged(format!(
                "the resource's table changed and no longer fits: {m}"
            )),
            DbError::UnknownColumn(m) => ApiError::Unprocessable(m),
            DbError::NotSynchronous(m) => ApiError::NotSynchronous(m),
            DbError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<NotReady> for ApiError {
    fn from(e: NotReady) -> Self {
        ApiError::Starting(e.0)
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        ApiError::InvalidKey(e.to_string())
    }
}

impl From<MalformedJson> for ApiError {
    fn from(e: MalformedJson) -> Self {
        ApiError::MalformedJson(e.to_string())
    }
}
