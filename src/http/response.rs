//! Building responses: JSON bodies and ETags.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::resource::Resource;

pub(super) const JSON: &str = "application/json";

/// The ETag of `resource`'s document at `version` (see [`Resource::etag`]).
pub(super) fn etag(resource: &Resource, version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\"", resource.etag(version)))
        .expect("digits and a dash are a valid header")
}

pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

/// What every response's body is: a whole one, or a stream (a watch).
pub(super) type Body =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>;

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable code (`not_found`, `precondition_failed`…) and a message for humans.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// What a PUT answers: the version it wrote (also its `ETag`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Written {
    pub version: i64,
}
