//! `POST /v1`: several writes, on one or several resources, committed in one Postgres
//! transaction, all or nothing. The body:
//!
//! ```json
//! {"operations": [
//!   {"op": "put", "resource": "orders", "key": "7", "document": {"total": 12.5}, "if_match": "\"41\""},
//!   {"op": "delete", "resource": "items", "key": "3"}
//! ]}
//! ```
//!
//! `if_match` and `if_none_match` take what the headers of a single write take. The answer
//! is one result per operation, in order: `{"op", "resource", "key", "status", "version"}`
//! (201 or 200 for a put, 204 for a delete, 404 for a delete of an absent key). The caches are
//! updated once the transaction has committed, as for single writes.

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::consistency::run_write;
use super::document::can_hold;
use super::error::{Answer, ApiError, ALLOW_BATCH};
use super::request::{check_key, precondition, read_json, BodyKey};
use super::response::json_response;
use super::state::HttpState;
use crate::db::{TxDone, TxFailed, TxOp, TxWhy};
use crate::model::JsonText;
use crate::resource::{Catalog, DocRef};

/// The body of a transaction: at most `server.max_batch_keys` (1000) operations, run in
/// order.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Transaction<'a> {
    #[serde(borrow)]
    operations: Vec<Operation<'a>>,
}

/// One operation of a transaction.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Operation<'a> {
    /// `put` or `delete`.
    op: String,
    resource: String,
    /// A string, or an integer for an integer-keyed resource.
    #[serde(deserialize_with = "super::request::body_key")]
    #[schema(value_type = BodyKey)]
    key: String,
    /// The document of a put (kept as its text: Postgres alone parses documents); absent
    /// for a delete.
    #[serde(borrow)]
    #[schema(value_type = Option<Object>)]
    document: Option<&'a RawValue>,
    /// As the If-Match header: an ETag such as `"41"`, a list of them (`"41", "43"`), or `*`.
    if_match: Option<String>,
    /// As the If-None-Match header of a PUT: `*`.
    if_none_match: Option<String>,
}

/// What one operation of a committed transaction did.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TxResult {
    op: String,
    resource: String,
    key: String,
    /// 201 or 200 for a put, 204 for a delete, 404 for a delete of an absent key.
    status: u16,
    /// The version written, or the delete's.
    version: Option<i64>,
}

/// A committed transaction's answer: one result per operation, in order.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TxResults {
    results: Vec<TxResult>,
}

/// Answers `POST /v1`.
///
/// # Errors
/// 405 for another method; 400 for a body that is not a list of operations, or an operation
/// that is not well formed (named by its index); 404 for an unknown resource; 413 for more
/// than `server.max_batch_keys` operations; for an operation Postgres refuses, its status
/// (412 for a precondition, 422, 409) with the operation named. Nothing is written then.
pub(super) async fn handle(state: &HttpState, req: Request<Incoming>) -> Answer {
    if req.method() != Method::POST {
        return Err(ApiError::MethodNotAllowed(ALLOW_BATCH));
    }
    let catalog = state.catalog()?;
    let mode = super::consistency::mode(state, req.uri().query())?;
    let server = &state.config.server;
    let timeout = server.request_timeout;
    let max_key_bytes = server.max_key_bytes;
    let body = tokio::time::timeout(timeout, read_json(req, server.max_body_bytes))
        .await
        .map_err(|_| ApiError::Timeout(timeout))??;
    let tx: Transaction = serde_json::from_str(body.as_str()).map_err(|e| {
        ApiError::InvalidBody(format!(
            "a transaction is {{\"operations\": [{{\"op\": \"put\"|\"delete\", \"resource\", \"key\", \"document\", \"if_match\", \"if_none_match\"}}]}}: {e}"
        ))
    })?;
    if tx.operations.len() > server.max_batch_keys {
        return Err(ApiError::TooManyKeys(
            tx.operations.len(),
            server.max_batch_keys,
        ));
    }
    let ops = operations(&catalog, &tx, max_key_bytes)?;
    let run = |ops: Vec<(DocRef, TxOp)>| {
        let commit = mode.commit.clone();
        let tiers = state.tiers.clone();
        // A failure hands the operations back: a failed precondition is named by them.
        run_write(state, mode.eventual, timeout, move |early| async move {
            tiers
                .transact(&ops, commit, early)
                .await
                .map_err(|failed| (ops, failed))
        })
    };
    let result = match run(ops).await? {
        // Rolled back as a whole: once more on the catalog read again (see
        // `document::on_new_shape`).
        Err((
            _,
            TxFailed {
                why: TxWhy::Db(e), ..
            },
        )) if e.may_be_schema_change() => {
            if !state.catalog.recheck_and_wait(timeout).await {
                return Err(ApiError::SchemaChanged(format!(
                    "a statement failed as on a changed table ({e}), and the tables could not \
                     be read again in time"
                )));
            }
            run(operations(state.catalog()?.as_ref(), &tx, max_key_bytes)?).await?
        }
        done => done,
    };
    let done = result.map_err(|(ops, failed)| {
        let e = match failed.why {
            TxWhy::Precondition => {
                let op: &TxOp = &ops[failed.index.unwrap_or(0)].1;
                let (TxOp::Put { pre, .. } | TxOp::Delete { pre }) = op;
                ApiError::precondition_failed(pre)
            }
            TxWhy::Db(e) => ApiError::from(e),
        };
        match failed.index {
            Some(i) => named(e, i, &tx.operations[i]),
            None => e,
        }
    })?;
    let results = tx
        .operations
        .iter()
        .zip(done)
        .map(|(o, done)| {
            let (status, version) = match done {
                TxDone::Written(w) if w.created => (201, Some(w.version.0)),
                TxDone::Written(w) => (200, Some(w.version.0)),
                TxDone::Deleted { version } => (204, Some(version.0)),
                TxDone::NotFound => (404, None),
            };
            TxResult {
                op: o.op.clone(),
                resource: o.resource.clone(),
                key: o.key.clone(),
                status,
                version,
            }
        })
        .collect();
    let body = serde_json::to_value(TxResults { results }).expect("results serialize");
    Ok(json_response(StatusCode::OK, &body))
}

/// The transaction's operations resolved against `catalog`, each checked.
///
/// # Errors
/// The first operation that does not fit, named.
fn operations(
    catalog: &Catalog,
    tx: &Transaction,
    max_key_bytes: usize,
) -> Result<Vec<(DocRef, TxOp)>, ApiError> {
    let mut ops = Vec::with_capacity(tx.operations.len());
    for (i, o) in tx.operations.iter().enumerate() {
        let named = |e: ApiError| named(e, i, o);
        let resource = catalog
            .get(&o.resource)
            .ok_or_else(|| match catalog.unavailable(&o.resource) {
                Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
                None => ApiError::UnknownResource(o.resource.clone()),
            })
            .map_err(named)?;
        check_key(&o.key, max_key_bytes).map_err(named)?;
        let doc = DocRef::new(resource, &o.key)
            .map_err(ApiError::from)
            .map_err(named)?;
        let pre = |allow_create_only| {
            precondition(
                o.if_match.clone(),
                o.if_none_match.clone(),
                allow_create_only,
                resource.shape_epoch(),
            )
            .map_err(named)
        };
        let op = match (o.op.as_str(), o.document) {
            ("put", Some(document)) => TxOp::Put {
                body: JsonText::parse(document.get().as_bytes()).map_err(ApiError::from)?,
                pre: pre(true)?,
            },
            ("put", None) => {
                return Err(named(ApiError::InvalidBody(
                    "a put needs a document".into(),
                )))
            }
            ("delete", None) => TxOp::Delete { pre: pre(false)? },
            ("delete", Some(_)) => {
                return Err(named(ApiError::InvalidBody(
                    "a delete takes no document".into(),
                )))
            }
            (other, _) => {
                return Err(named(ApiError::InvalidBody(format!(
                    "op must be \"put\" or \"delete\", not {other:?}"
                ))))
            }
        };
        let (TxOp::Put { pre, .. } | TxOp::Delete { pre }) = &op;
        can_hold(pre).map_err(named)?;
        ops.push((doc, op));
    }
    Ok(ops)
}

/// `e`, its message prefixed with the operation it is about.
fn named(e: ApiError, index: usize, o: &Operation) -> ApiError {
    let about = format!("operation {index} ({} {}/{})", o.op, o.resource, o.key);
    match e {
        ApiError::PreconditionFailed(m) => ApiError::PreconditionFailed(format!("{about}: {m}")),
        ApiError::InvalidBody(m) => ApiError::InvalidBody(format!("{about}: {m}")),
        ApiError::InvalidKey(m) => ApiError::InvalidKey(format!("{about}: {m}")),
        ApiError::InvalidHeader(m) => ApiError::InvalidHeader(format!("{about}: {m}")),
        ApiError::Unprocessable(m) => ApiError::Unprocessable(format!("{about}: {m}")),
        ApiError::Conflict(m) => ApiError::Conflict(format!("{about}: {m}")),
        // As on a single request: 404 `unknown_resource`, with the operation named.
        ApiError::UnknownResource(r) => {
            ApiError::UnknownResourceIn(format!("{about}: unknown resource {r:?}"))
        }
        other => other,
    }
}
