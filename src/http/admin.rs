//! What the kubelet and Prometheus ask for: `/healthz`, `/readyz`, `/metrics`, and the
//! OpenAPI document at `/openapi.json`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::response::{json_response, JSON};
use super::state::HttpState;
use crate::coherence::FeedState;
use crate::config::PostgresSource;

/// The OpenAPI 3 document of this API, kept in `docs/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

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

pub(super) fn openapi(state: &HttpState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(state.openapi.clone()));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

pub(super) fn healthz() -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Ready when Postgres answers and the schema is loaded (and, with `feeds.unready_when_down`,
/// every feed is up); Redis is checked and reported but not required. Each check has a
/// deadline.
pub(super) async fn readyz(state: &HttpState) -> Response<Full<Bytes>> {
    let deadline = Duration::from_secs(2);
    let check = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": state.secrets.scrub(&e)}),
        Err(_) => json!({"ok": false, "error": "timed out"}),
    };
    let tiers = &state.tiers;
    let (pg, redis) = tokio::join!(
        tokio::time::timeout(deadline, async {
            tiers.ping_postgres().await.map_err(|e| e.to_string())
        }),
        tokio::time::timeout(deadline, async {
            tiers.ping_redis().await.map_err(|e| e.to_string())
        }),
    );
    let schema = match state.catalog() {
        Ok(_) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": state.secrets.scrub(&e.to_string())}),
    };
    // A resource left out (its table does not fit) is reported, not required: the others
    // serve, and one bad table must not take the pod out of its Services.
    let mut resources = serde_json::Map::new();
    if let Ok(catalog) = state.catalog() {
        for r in catalog.iter() {
            resources.insert(r.name.clone(), json!({"ok": true}));
        }
        for (name, reason) in catalog.all_unavailable() {
            resources.insert(
                name.to_string(),
                json!({"ok": false, "error": state.secrets.scrub(reason)}),
            );
        }
    }
    let (pg, redis) = (check(pg), check(redis));
    let coherence = &state.coherence;
    let now = crate::model::now_ms();
    // `since_unix_ms`: when the feed last went up or down (Unix time, ms); `for_ms`: how
    // long ago that was (ms).
    let feed = |f: &FeedState| {
        json!({
            "enabled": f.enabled(),
            "up": f.is_up(),
            "since_unix_ms": f.since_unix_ms(),
            "for_ms": now.saturating_sub(f.since_unix_ms()),
        })
    };
    let mut postgres_feed = feed(&coherence.postgres);
    if let Ok(catalog) = state.catalog() {
        let capture = &catalog.capture;
        postgres_feed["source"] = json!(capture.source.as_str());
        postgres_feed["source_reason"] = json!(capture.reason);
        if capture.source == PostgresSource::Wal {
            postgres_feed["slot"] = json!(capture.slot);
            postgres_feed["relay"] = json!(coherence.relay_status());
        }
    }
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
            "resources": resources,
            "feeds": {"postgres": postgres_feed, "redis": feed(&coherence.redis)},
            "l1_in_use": coherence.l1_usable(),
        }),
    )
}

pub(super) fn scrape(state: &HttpState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
