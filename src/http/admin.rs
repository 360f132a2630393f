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
use crate::model::{Cached, State};

/// The OpenAPI document as this instance serves it ([`super::openapi::document`]): every
/// `resource` parameter lists the resources it actually has.
pub fn openapi_for(resources: &[String]) -> Bytes {
    let mut doc: serde_json::Value = serde_json::from_str(&super::openapi::document())
        .expect("the generated document is valid JSON");
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for operation in paths.values_mut().filter_map(|p| p.as_object_mut()) {
            for op in operation.values_mut() {
                let Some(params) = op.get_mut("parameters").and_then(|p| p.as_array_mut()) else {
                    continue;
                };
                for param in params.iter_mut().filter(|p| p["name"] == "resource") {
                    if let Some(schema) = param.get_mut("schema").and_then(|s| s.as_object_mut()) {
                        schema.insert("enum".into(), json!(resources));
                    }
                }
            }
        }
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
    let probes = &state.probes;
    let (pg, redis) = tokio::join!(
        tokio::time::timeout(deadline, probes.ping_postgres()),
        tokio::time::timeout(deadline, probes.ping_redis()),
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
    let (pg, mut redis) = (
        check_json(&state.secrets, pg),
        check_json(&state.secrets, redis),
    );
    let (node, sentinel_error) = probes.redis_node();
    redis["node"] = json!(node);
    if let Some(e) = sentinel_error {
        redis["sentinel_error"] = json!(state.secrets.scrub(&e));
    }
    if let Some(warning) = probes.redis_eviction_warning() {
        redis["warning"] = json!(state.secrets.scrub(&warning));
    }
    let coherence = &state.coherence;
    let now = crate::model::now_ms();
    // `since_unix_ms`: when the feed last went up or down (Unix time, ms); `for_ms`: how
    // long ago that was (ms); `reason`, while it is down: why its last try ended.
    let feed = |f: &FeedState| feed_json(f, now);
    let mut postgres_feed = feed(&coherence.postgres);
    if let Ok(catalog) = state.catalog() {
        let capture = &catalog.capture;
        postgres_feed["source"] = json!(capture.source.as_str());
        postgres_feed["source_reason"] = json!(capture.reason);
        if capture.source == PostgresSource::Wal {
            postgres_feed["slot"] = json!(capture.slot);
            postgres_feed["relay"] = json!(coherence.relay_status());
            // The WAL position this instance has applied every change up to, and how long
            // ago it moved (see the X-Syncar-LSN header).
            if let Some((lsn, age_ms)) = coherence.applied_position() {
                postgres_feed["applied_lsn"] =
                    json!(pgwire_replication::Lsn::from_u64(lsn).to_string());
                postgres_feed["applied_age_ms"] = json!(age_ms);
            }
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

/// `GET /debug/keys/{resource}/{key}` (admin listener only): what each tier holds for one
/// key, and whether this instance would serve it, as JSON. Versions, states, ages, TTLs and
/// lengths only, never a document body. Reads each tier once; fills nothing.
///
/// # Errors
/// As a document route: 503 before the catalog is loaded, 404 for no such resource, 400 or
/// 414 for a bad key.
pub(super) async fn debug_key(
    state: &HttpState,
    rest: &str,
) -> Result<Response<Full<Bytes>>, super::error::ApiError> {
    let catalog = state.catalog()?;
    let target = super::request::target(&catalog, rest, state.config.server.max_key_bytes)?;
    let report = state.tiers.inspect(&target.doc).await;
    let now = crate::model::now_ms();
    let copy = |c: &Cached| {
        let (kind, bytes) = match &c.state {
            State::Value(doc) => ("value", Some(doc.len())),
            State::Absent => ("absent", None),
            State::Invalidated => ("tombstone", None),
        };
        json!({
            "state": kind,
            "version": c.version.0,
            "read_from_postgres_ms_ago": now.saturating_sub(c.at_ms),
            "bytes": bytes,
        })
    };
    let postgres_version = report
        .postgres
        .as_ref()
        .ok()
        .map(|p| p.map_or(0, |(v, _)| v.0));
    let l1 = match &report.l1 {
        None => json!({"enabled": false}),
        Some(None) => json!({"enabled": true, "in_use": report.l1_usable, "entry": null}),
        Some(Some(e)) => {
            let mut entry = copy(&e.cached);
            entry["ttl_left_ms"] = json!(e.ttl_left.as_millis() as u64);
            // What a read here would do with it right now.
            entry["would_serve"] =
                json!(report.l1_usable && !e.ttl_left.is_zero() && e.cached.is_servable());
            json!({"enabled": true, "in_use": report.l1_usable, "entry": entry})
        }
    };
    let redis = match &report.redis {
        Ok(None) => json!({"key": report.redis_key, "entry": null}),
        Ok(Some((c, ttl_ms))) => {
            let mut entry = copy(c);
            entry["ttl_ms"] = json!(ttl_ms);
            json!({"key": report.redis_key, "entry": entry})
        }
        Err(e) => json!({"key": report.redis_key, "error": state.secrets.scrub(&e.to_string())}),
    };
    let postgres = match &report.postgres {
        Ok(Some((v, bytes))) => json!({"exists": true, "version": v.0, "bytes": bytes}),
        Ok(None) => json!({"exists": false, "version": null}),
        Err(e) => json!({"error": state.secrets.scrub(&e.to_string())}),
    };
    // Each cached copy against Postgres' version (a delete's version is not kept by
    // Postgres: an absent row reads as 0, and any cached absence or tombstone agrees).
    let compare = |c: Option<&Cached>| match (c, postgres_version) {
        (Some(c), Some(pg)) if c.version.0 < pg => json!("older than postgres"),
        (Some(c), Some(pg)) if c.version.0 > pg && pg != 0 => json!("newer than postgres"),
        (Some(_), Some(_)) => json!("matches postgres"),
        _ => serde_json::Value::Null,
    };
    let l1_copy = report
        .l1
        .as_ref()
        .and_then(|e| e.as_ref())
        .map(|e| &e.cached);
    let redis_copy = report
        .redis
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref())
        .map(|(c, _)| c);
    let coherence = &state.coherence;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "resource": target.doc.resource.name,
            "key": target.key,
            "instance": state.instance,
            "l1": l1,
            "redis": redis,
            "postgres": postgres,
            "verdict": {"l1": compare(l1_copy), "redis": compare(redis_copy)},
            "feeds": {
                "postgres": feed_json(&coherence.postgres, now),
                "redis": feed_json(&coherence.redis, now),
            },
        }),
    ))
}

/// A feed's state as `/readyz` shows it.
/// One readiness check as `/readyz` shows it: ok, its error (scrubbed), or timed out.
fn check_json<E: std::fmt::Display>(
    secrets: &crate::redact::Secrets,
    result: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> serde_json::Value {
    match result {
        Ok(Ok(())) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": secrets.scrub(&e.to_string())}),
        Err(_) => json!({"ok": false, "error": "timed out"}),
    }
}

fn feed_json(f: &FeedState, now: u64) -> serde_json::Value {
    let mut feed = json!({
        "enabled": f.enabled(),
        "up": f.is_up(),
        "since_unix_ms": f.since_unix_ms(),
        "for_ms": now.saturating_sub(f.since_unix_ms()),
    });
    if let Some(reason) = f.down_reason().filter(|_| f.enabled()) {
        feed["reason"] = json!(reason);
    }
    feed
}

pub(super) fn scrape(state: &HttpState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
