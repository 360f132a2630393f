//! The HTTP API, as an app next to syncar uses it, against real Postgres and Redis.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, query_value, request, Env, RedisServer, Resp};

#[tokio::test]
async fn a_put_is_read_back_from_l1_with_its_etag() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;

    let put = a.put("/v1/kv/a", r#"{"x":1}"#).await;
    assert_eq!(put.status, 201, "{put:?}");
    let version = put.json()["version"].as_i64().unwrap();
    assert_eq!(put.etag_version(), version);

    let get = a.get("/v1/kv/a").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.header("x-cache"), Some("l1"));
    assert_eq!(get.etag_version(), version);
    assert_eq!(get.header("content-type"), Some("application/json"));
    assert_eq!(get.json(), json!({"x": 1}));

    // Numbers beyond 64 bits and floats keep every digit.
    let big = r#"{"n":18446744073709551617,"f":0.1000000000000000055511151231257827}"#;
    assert_eq!(a.put("/v1/kv/big", big).await.status, 201);
    let read = String::from_utf8(a.get("/v1/kv/big").await.body.to_vec()).unwrap();
    assert!(read.contains("18446744073709551617"), "{read}");
    assert!(
        read.contains("0.1000000000000000055511151231257827"),
        "{read}"
    );

    let replaced = a.put("/v1/kv/a", r#"{"x":2}"#).await;
    assert_eq!(replaced.status, 200);
    assert!(replaced.etag_version() > version, "versions rise");

    let head = request(a.addr(), "HEAD", "/v1/kv/a", &[], None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let cached = request(
        a.addr(),
        "GET",
        "/v1/kv/a",
        &[("if-none-match", &format!("\"{}\"", replaced.etag_version()))],
        None,
    )
    .await;
    assert_eq!(cached.status, 304);
}

#[tokio::test]
async fn a_write_lands_in_all_three_tiers_with_one_version() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let put = a.put("/v1/kv/doc", r#"{"b": [1, 2], "a": "z"}"#).await;
    assert_eq!(put.status, 201);
    let v = put.etag_version();

    let row = env
        .pg()
        .await
        .query_one(
            "SELECT version, value::text FROM syncar_kv WHERE key = 'doc'",
            &[],
        )
        .await
        .unwrap();
    let (db_version, db_doc): (i64, String) = (row.get(0), row.get(1));
    assert_eq!(db_version, v);

    let redis = env.redis_entry("kv", "doc").await.expect("in redis");
    assert_eq!(redis, format!("{v}:v:{db_doc}"));

    let l1 = a
        .state()
        .tiers
        .peek_l1(&syncar::model::CacheKey::new("kv", "doc"))
        .expect("in L1");
    assert_eq!(l1.version.0, v);
    assert_eq!(l1.doc().unwrap().as_ref(), db_doc.as_bytes());

    // Every tier serves Postgres' rendering, so one ETag means one byte sequence.
    assert_eq!(a.get("/v1/kv/doc").await.body.as_ref(), db_doc.as_bytes());
}

#[tokio::test]
async fn after_a_restart_the_first_read_comes_from_redis_then_l1() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let v = a.put("/v1/kv/a", r#"{"x":1}"#).await.etag_version();
    a.shutdown().await;

    let b = env.start(|_| {}).await;
    let first = b.get("/v1/kv/a").await;
    assert_eq!(first.header("x-cache"), Some("l2"));
    assert_eq!(first.etag_version(), v);
    let second = b.get("/v1/kv/a").await;
    assert_eq!(second.header("x-cache"), Some("l1"));
    assert_eq!(second.etag_version(), v);
}

#[tokio::test]
async fn a_plain_sql_write_takes_a_version_and_is_seen_once_the_ttls_pass() {
    let env = Env::new().await;
    let a = env
        .start(|c| {
            c.cache.ttl.l1_ttl = Duration::from_millis(200);
            c.cache.ttl.l2_ttl = Duration::from_millis(400);
            c.cache.ttl.ttl_jitter = 0.0;
        })
        .await;
    let v1 = a.put("/v1/kv/k", r#""one""#).await.etag_version();
    assert_eq!(a.get("/v1/kv/k").await.header("x-cache"), Some("l1"));

    // Another service writes with plain SQL and never mentions the version.
    let pg = env.pg().await;
    pg.execute(
        "UPDATE syncar_kv SET value = '\"two\"' WHERE key = 'k'",
        &[],
    )
    .await
    .unwrap();
    let v2: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'k'").await;
    assert!(v2 > v1, "the trigger stamped a newer version");
    pg.execute(
        "INSERT INTO syncar_kv (key, value) VALUES ('fresh', '3')",
        &[],
    )
    .await
    .unwrap();

    let seen = eventually(
        Duration::from_secs(5),
        "the SQL update to be served",
        || async {
            let r = a.get("/v1/kv/k").await;
            (r.etag_version() == v2).then_some(r)
        },
    )
    .await;
    assert_eq!(seen.json(), json!("two"));
    let fresh = a.get("/v1/kv/fresh").await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.json(), json!(3));
}

#[tokio::test]
async fn deletes_leave_a_served_absence_and_honour_if_match() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let v = a.put("/v1/kv/gone", "1").await.etag_version();

    let wrong = format!("\"{}\"", v + 1000);
    let stale = request(
        a.addr(),
        "DELETE",
        "/v1/kv/gone",
        &[("if-match", &wrong)],
        None,
    )
    .await;
    assert_eq!(stale.status, 412);
    assert_eq!(stale.code(), "precondition_failed");

    let tag = format!("\"{v}\"");
    let del = request(
        a.addr(),
        "DELETE",
        "/v1/kv/gone",
        &[("if-match", &tag)],
        None,
    )
    .await;
    assert_eq!(del.status, 204);
    assert!(del.etag_version() > v, "a delete takes a fresh version");

    let get = a.get("/v1/kv/gone").await;
    assert_eq!(get.status, 404);
    assert_eq!(get.code(), "not_found");
    assert_eq!(get.header("x-cache"), Some("l1"));
    let redis = env.redis_entry("kv", "gone").await.unwrap();
    assert_eq!(redis, format!("{}:a:", del.etag_version()));

    assert_eq!(a.delete("/v1/kv/gone").await.status, 404);
    let again = a.put("/v1/kv/gone", "2").await;
    assert_eq!(again.status, 201);
    assert!(again.etag_version() > del.etag_version());
    assert_eq!(a.get("/v1/kv/gone").await.json(), json!(2));
}

#[tokio::test]
async fn conditional_puts() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let put = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let addr = a.addr();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(addr, "PUT", "/v1/kv/c", &h, Some(body.as_bytes())).await
        }
    };
    let must_exist = put(vec![("if-match", "*".into())], "0").await;
    assert_eq!(must_exist.status, 412, "If-Match: * on an absent document");
    let message = |r: &Resp| r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message(&must_exist).contains("does not exist"),
        "{must_exist:?}"
    );

    let created = put(vec![("if-none-match", "*".into())], "1").await;
    assert_eq!(created.status, 201);
    let v1 = created.etag_version();
    let exists = put(vec![("if-none-match", "*".into())], "1").await;
    assert_eq!(exists.status, 412);
    assert!(message(&exists).contains("the key exists"), "{exists:?}");

    let ok = put(vec![("if-match", format!("\"{v1}\""))], "2").await;
    assert_eq!(ok.status, 200);
    let lost = put(vec![("if-match", format!("\"{v1}\""))], "3").await;
    assert_eq!(lost.status, 412, "a lost update is refused");
    assert!(
        message(&lost).contains(&format!("is not \"{v1}\"")),
        "{lost:?}"
    );
    assert_eq!(put(vec![("if-match", "*".into())], "4").await.status, 200);
    assert_eq!(a.get("/v1/kv/c").await.json(), json!(4));

    let bad = put(vec![("if-match", "v1".into())], "5").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.code(), "invalid_header");
}

#[tokio::test]
async fn if_match_takes_a_list_of_etags() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let put = |if_match: String, body: &'static str| {
        let addr = a.addr();
        async move {
            request(
                addr,
                "PUT",
                "/v1/kv/l",
                &[("if-match", &if_match)],
                Some(body.as_bytes()),
            )
            .await
        }
    };
    let v1 = a.put("/v1/kv/l", "1").await.etag_version();
    // RFC 9110 §13.1.1: the write proceeds when the current ETag is any of the list.
    let ok = put(format!("\"{}\", \"{v1}\"", v1 + 1000), "2").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let v2 = ok.etag_version();
    let lost = put(format!("\"{v1}\", W/\"{v2}\", \"{}\"", v1 + 1000), "3").await;
    assert_eq!(
        lost.status, 412,
        "none is current (a weak ETag never matches): {lost:?}"
    );
    let message = lost.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("none of \"{v1}\", \"{}\"", v1 + 1000)),
        "{message}"
    );
    let deleted = request(
        a.addr(),
        "DELETE",
        "/v1/kv/l",
        &[("if-match", &format!("\"{v1}\",\"{v2}\""))],
        None,
    )
    .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");

    // A transaction operation's if_match takes the same list.
    let v3 = a.put("/v1/kv/l", "4").await.etag_version();
    let tx = |if_match: String| {
        let addr = a.addr();
        let body = json!({"operations": [
            {"op": "put", "resource": "kv", "key": "l", "document": 5, "if_match": if_match},
        ]});
        async move { request(addr, "POST", "/v1", &[], Some(body.to_string().as_bytes())).await }
    };
    let refused = tx(format!("\"{v1}\", \"{v2}\"")).await;
    assert_eq!(refused.status, 412, "{refused:?}");
    let done = tx(format!("\"{v2}\", \"{v3}\"")).await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(done.json()["results"][0]["status"], 200, "{done:?}");
    assert_eq!(a.get("/v1/kv/l").await.json(), json!(5));

    // A version sent without its quotes is told what to send instead, header and JSON.
    let bare = tx(v3.to_string()).await;
    assert_eq!((bare.status, bare.code()), (400, "invalid_header".into()));
    let message = bare.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with(&format!(
            "operation 0 (put kv/l): the If-Match value {v3} came without double quotes"
        )),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "If-Match: \"{v3}\" or, in a transaction's JSON, the field as \"if_match\": \"\\\"{v3}\\\"\""
        )),
        "{message}"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let env = Env::new().await;
    let a = env
        .start(|c| {
            c.server.max_body_bytes = 1024;
            c.server.max_key_bytes = 16;
        })
        .await;
    // method, path, body, status, error code
    type Case<'a> = (&'a str, &'a str, Option<&'a [u8]>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/nope/a", None, 404, "unknown_resource"),
        ("GET", "/v2/kv/a", None, 404, "no_route"),
        ("GET", "/v1/kv", None, 405, "method_not_allowed"),
        ("GET", "/v1/", None, 404, "no_route"),
        ("PUT", "/v1/kv/a", Some(b"{not json"), 400, "malformed_json"),
        ("PUT", "/v1/kv/a", Some(b""), 400, "malformed_json"),
        (
            "PUT",
            "/v1/kv/a",
            Some(&[b'1'; 2000]),
            413,
            "body_too_large",
        ),
        ("GET", "/v1/kv/0123456789abcdefg", None, 414, "key_too_long"),
        ("GET", "/v1/kv/%ff", None, 400, "invalid_key"),
        ("GET", "/v1/kv/", None, 400, "invalid_key"),
        ("POST", "/v1/kv/a", Some(b"1"), 405, "method_not_allowed"),
        ("DELETE", "/healthz", None, 405, "method_not_allowed"),
        (
            "PUT",
            "/v1/kv/a",
            Some("\"\\u0000\"".as_bytes()),
            422,
            "invalid_document",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = request(a.addr(), method, path, &[], body).await;
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
        assert_eq!(r.code(), code, "{method} {path}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path} explains itself"
        );
    }
    let r = request(a.addr(), "POST", "/v1/kv/a", &[], None).await;
    assert_eq!(r.header("allow"), Some("GET, HEAD, PUT, DELETE"));
    // Still serving after all that.
    assert_eq!(a.put("/v1/kv/a", "1").await.status, 201);
}

#[tokio::test]
async fn absence_is_cached_briefly_and_a_write_replaces_it() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let first = a.get("/v1/kv/missing").await;
    assert_eq!(first.status, 404);
    assert_eq!(first.header("x-cache"), Some("db"));
    let second = a.get("/v1/kv/missing").await;
    assert_eq!(second.status, 404);
    assert_eq!(second.header("x-cache"), Some("l1"));
    assert_eq!(
        env.redis_entry("kv", "missing").await.as_deref(),
        Some("0:a:")
    );

    assert_eq!(a.put("/v1/kv/missing", "1").await.status, 201);
    let now = a.get("/v1/kv/missing").await;
    assert_eq!(now.status, 200);
    assert_eq!(now.header("x-cache"), Some("l1"));
}

#[tokio::test]
async fn keys_reach_sql_only_as_bind_parameters() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let evil = "x'; DROP TABLE syncar_kv; --";
    let path = format!("/v1/kv/{}", evil.replace(' ', "%20").replace('\'', "%27"));
    assert_eq!(a.put(&path, "1").await.status, 201);
    let r = a.get(&path).await;
    assert_eq!(r.status, 200);
    let stored: String = query_value(&env.pg().await, "SELECT key FROM syncar_kv").await;
    assert_eq!(stored, evil);
    // Keys may hold slashes and any UTF-8.
    assert_eq!(a.put("/v1/kv/a/b/%C3%A9", "2").await.status, 201);
    assert_eq!(a.get("/v1/kv/a%2Fb%2F%C3%A9").await.json(), json!(2));
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let h = a.get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = a.get("/readyz").await;
    assert_eq!(r.status, 200, "{r:?}");
    let body = r.json();
    assert_eq!(body["ready"], true);
    for dep in ["postgres", "redis", "schema"] {
        assert_eq!(body["checks"][dep]["ok"], true, "{dep}");
    }
    a.put("/v1/kv/m", "1").await;
    a.get("/v1/kv/m").await;
    let m = a.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    for needle in [
        "syncar_http_requests_total{",
        "route=\"document\"",
        "syncar_cache_hits_total{tier=\"l1\"}",
        "syncar_http_request_duration_seconds_bucket{",
    ] {
        assert!(text.contains(needle), "{needle} missing from /metrics");
    }
}

/// Redis down: reads fall through to Postgres, writes are still acknowledged, and the Redis
/// entries those writes could not update are repaired once Redis is back.
#[tokio::test]
async fn with_redis_down_reads_use_postgres_writes_succeed_and_redis_is_repaired() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let a = env
        .start(|c| {
            c.redis.url = redis.url();
            c.redis.retry_interval = Duration::from_millis(200);
        })
        .await;
    let v_old = a.put("/v1/kv/w", "1").await.etag_version();
    env.pg()
        .await
        .execute(
            "INSERT INTO syncar_kv (key, value) VALUES ('cold', '7')",
            &[],
        )
        .await
        .unwrap();

    redis.kill();
    let cold = a.get("/v1/kv/cold").await;
    assert_eq!(cold.status, 200, "{cold:?}");
    assert_eq!(cold.header("x-cache"), Some("db"));
    assert_eq!(cold.json(), json!(7));

    let put = a.put("/v1/kv/w", "2").await;
    assert_eq!(put.status, 200, "acknowledged with Redis down: {put:?}");
    let v_new = put.etag_version();
    assert!(v_new > v_old);
    let row: i64 = query_value(
        &env.pg().await,
        "SELECT version FROM syncar_kv WHERE key = 'w'",
    )
    .await;
    assert_eq!(row, v_new, "committed");
    assert_eq!(a.get("/v1/kv/w").await.json(), json!(2));
    let ready = a.get("/readyz").await;
    assert_eq!(ready.status, 200, "still ready: reads and writes work");
    assert_eq!(ready.json()["checks"]["redis"]["ok"], false, "but says so");
    assert!(
        a.state().tiers.pending_repairs() > 0,
        "the missed Redis update is queued"
    );

    redis.restart();
    let tiers = a.state().tiers.clone();
    eventually(Duration::from_secs(10), "the repair queue to drain", || {
        let tiers = tiers.clone();
        async move { (tiers.pending_repairs() == 0).then_some(()) }
    })
    .await;
    // The restarted Redis is a new incarnation: the repair's tombstone landed in the
    // generation in force, or every generation was raised past it; either way nothing older
    // than the missed version is reachable.
    let env_here = env.on_redis(redis.url());
    let probes = a.state().probes.clone();
    eventually(Duration::from_secs(10), "redis to be trusted again", || {
        let probes = probes.clone();
        async move { probes.redis_trusted().then_some(()) }
    })
    .await;
    let entry = env_here.redis_entry("kv", "w").await;
    assert!(
        entry.is_none() || entry == Some(format!("{v_new}:i:")),
        "a tombstone of the missed version, or nothing: {entry:?}"
    );
    eventually(Duration::from_secs(5), "readiness to return", || async {
        (a.get("/readyz").await.status == 200).then_some(())
    })
    .await;
}

/// Postgres unreachable: cached documents are still served, misses and writes get 503 with
/// Retry-After, and everything works again once it is back.
#[tokio::test]
async fn with_postgres_unreachable_misses_and_writes_get_503() {
    let env = Env::new().await;
    let (proxy, url) = env.pg_proxy().await;
    let direct = env.pg_url.clone();
    let a = env
        .start(|c| {
            c.postgres.url = url;
            // The feed stays connected: only the pool loses Postgres.
            c.postgres.listen_url = Some(direct);
            c.postgres.connect_timeout = Duration::from_millis(300);
            c.postgres.pool_timeout = Duration::from_millis(300);
            c.postgres.retry_after = Duration::from_secs(3);
        })
        .await;
    assert_eq!(a.put("/v1/kv/hot", "1").await.status, 201);

    proxy.cut();
    let hit = a.get("/v1/kv/hot").await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache"), Some("l1"));

    let miss = a.get("/v1/kv/cold").await;
    assert_eq!(miss.status, 503, "{miss:?}");
    assert_eq!(miss.code(), "unavailable");
    assert_eq!(miss.header("retry-after"), Some("3"));
    let write = a.put("/v1/kv/hot", "2").await;
    assert_eq!(write.status, 503);
    assert_eq!(
        a.get("/v1/kv/hot").await.json(),
        json!(1),
        "nothing changed"
    );

    proxy.restore();
    let back = eventually(
        Duration::from_secs(10),
        "postgres to be usable again",
        || async {
            let r = a.put("/v1/kv/hot", "3").await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert!(back.etag_version() > hit.etag_version());
}

#[tokio::test]
async fn document_requests_wait_for_the_schema_with_503() {
    let env = Env::new().await;
    let mut config = env.config();
    config.postgres.url = format!(
        "postgres://postgres:hunter2-secret@127.0.0.1:{}/x",
        crate::support::free_port()
    );
    let app = syncar::App::start(config).await.unwrap();
    let r = request(app.addr(), "GET", "/v1/kv/a", &[], None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "starting");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        request(app.addr(), "GET", "/healthz", &[], None)
            .await
            .status,
        200
    );
    let ready = request(app.addr(), "GET", "/readyz", &[], None).await;
    assert_eq!(ready.status, 503);
    let text = String::from_utf8_lossy(&ready.body).to_string();
    assert!(!text.contains("hunter2-secret"), "password leaked: {text}");
    assert_eq!(ready.json()["checks"]["postgres"]["ok"], false);
    app.shutdown().await;
}

/// The served OpenAPI document and the server agree: every documented operation is routed,
/// and every route's undocumented methods are refused.
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let served = a.get("/openapi.json").await;
    assert_eq!(served.status, 200);
    let doc = served.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [("/v1/{resource}/{key}", "get"), ("/v1/{resource}", "post")] {
        let params = doc["paths"][path][method]["parameters"].as_array().unwrap();
        let resource = params.iter().find(|p| p["name"] == "resource").unwrap();
        assert_eq!(
            resource["schema"]["enum"],
            serde_json::json!(["kv"]),
            "the served document lists this instance's resources ({method} {path})"
        );
    }
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    assert_eq!(
        documented,
        [
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/v1",
            "/v1/{resource}",
            "/v1/{resource}/{key}"
        ]
    );
    let all = ["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"];
    for (path, ops) in paths {
        let concrete = path
            .replace("{resource}", "kv")
            .replace("{key}", "doc-check");
        for method in all {
            let declared = ops.get(method.to_lowercase()).is_some();
            let body: Option<&[u8]> = (method == "PUT").then_some(b"1");
            let r = request(a.addr(), method, &concrete, &[], body).await;
            if declared {
                assert_ne!(r.status, 405, "{method} {path} is documented: {r:?}");
                if r.status == 404 && method != "HEAD" {
                    assert_eq!(r.code(), "not_found", "{method} {path} is routed");
                }
            } else {
                assert_eq!(r.status, 405, "{method} {path} is not documented: {r:?}");
            }
        }
    }
}

/// Postgres unreachable from this instance (pool and LISTEN alike): by default L1 is bypassed
/// (a lost feed means no trusted cache), so even a cached key gets 503; with
/// `feeds.serve_cached_while_postgres_unreachable` cached copies are served meanwhile.
#[tokio::test]
async fn with_postgres_gone_cached_copies_are_served_only_if_configured() {
    for serve_cached in [false, true] {
        let env = Env::new().await;
        let (proxy, url) = env.pg_proxy().await;
        let a = env
            .start(|c| {
                c.postgres.url = url.clone();
                c.postgres.connect_timeout = Duration::from_millis(300);
                c.postgres.pool_timeout = Duration::from_millis(300);
                c.feeds.serve_cached_while_postgres_unreachable = serve_cached;
            })
            .await;
        assert_eq!(a.put("/v1/kv/hot", "1").await.status, 201);
        assert_eq!(a.get("/v1/kv/hot").await.header("x-cache"), Some("l1"));
        proxy.cut();
        a.feed_becomes("postgres", false, Duration::from_secs(5))
            .await;
        let hot = eventually(Duration::from_secs(5), "the unreachable state", || async {
            let r = a.get("/v1/kv/hot").await;
            (r.status == if serve_cached { 200 } else { 503 }).then_some(r)
        })
        .await;
        if serve_cached {
            assert_eq!(hot.header("x-cache"), Some("l1"));
        }
        assert_eq!(
            a.get("/v1/kv/cold").await.status,
            503,
            "a miss needs Postgres"
        );
        assert_eq!(a.put("/v1/kv/hot", "2").await.status, 503);
        proxy.restore();
        a.feed_becomes("postgres", true, Duration::from_secs(20))
            .await;
        assert_eq!(a.put("/v1/kv/hot", "3").await.status, 200);
    }
}

/// The admin listener's view of one key: each tier's version, state, TTL and age, Postgres'
/// version, the feeds; never the document; not on the API listener; behind the token.
#[tokio::test]
async fn the_debug_view_of_a_key_shows_every_tier_but_no_body() {
    let env = Env::new().await;
    let a = env
        .start(|c| c.server.admin_listen = Some("127.0.0.1:0".into()))
        .await;
    let v = a
        .put("/v1/kv/dbg", r#"{"secret":"hush"}"#)
        .await
        .etag_version();
    let view = request(a.admin_addr(), "GET", "/debug/keys/kv/dbg", &[], None).await;
    assert_eq!(view.status, 200, "{view:?}");
    assert!(
        !String::from_utf8_lossy(&view.body).contains("hush"),
        "{view:?}"
    );
    let j = view.json();
    assert_eq!(j["l1"]["entry"]["version"], v, "{j}");
    assert_eq!(j["l1"]["entry"]["state"], "value", "{j}");
    assert_eq!(j["l1"]["entry"]["would_serve"], true, "{j}");
    assert!(j["l1"]["entry"]["ttl_left_ms"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["redis"]["entry"]["version"], v, "{j}");
    assert!(j["redis"]["entry"]["ttl_ms"].as_i64().unwrap() > 0, "{j}");
    assert_eq!(j["postgres"]["version"], v, "{j}");
    assert_eq!(j["verdict"]["l1"], "matches postgres", "{j}");
    assert_eq!(j["feeds"]["redis"]["up"], true, "{j}");

    let absent = request(a.admin_addr(), "GET", "/debug/keys/kv/none", &[], None).await;
    let j = absent.json();
    assert_eq!(j["l1"]["entry"], serde_json::Value::Null, "{j}");
    assert_eq!(j["postgres"]["exists"], false, "{j}");
    assert_eq!(
        request(a.admin_addr(), "GET", "/debug/keys/nope/x", &[], None)
            .await
            .code(),
        "unknown_resource"
    );
    assert_eq!(
        a.get("/debug/keys/kv/dbg").await.status,
        404,
        "not on the API listener"
    );

    let token = "debug-token-0123456789abcdef";
    let b = env
        .start(|c| {
            c.server.admin_listen = Some("127.0.0.1:0".into());
            c.server.auth_token = Some(syncar::config::Secret(token.into()));
        })
        .await;
    let path = "/debug/keys/kv/dbg";
    assert_eq!(
        request(b.admin_addr(), "GET", path, &[], None).await.status,
        401
    );
    let bearer = format!("Bearer {token}");
    let with = request(
        b.admin_addr(),
        "GET",
        path,
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(with.status, 200, "{with:?}");
    assert_eq!(with.json()["redis"]["entry"]["version"], v);
}

/// Valid JSON is never called malformed, however deep: syncar checks the syntax without
/// recursion and lets Postgres parse; what Postgres refuses (deeper than its
/// `max_stack_depth` allows) is a 422 naming that limit; what Postgres stores (written by
/// SQL, 3000 levels deep) is served and can be written back unchanged.
#[tokio::test]
async fn deep_documents_are_accepted_as_postgres_accepts_them() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    for depth in [200, 5000] {
        let doc = nested(depth);
        let put = a.put("/v1/kv/deep", &doc).await;
        assert!(put.status == 201 || put.status == 200, "{depth}: {put:?}");
        let got = a.get("/v1/kv/deep").await;
        assert_eq!(got.status, 200);
        assert_eq!(String::from_utf8_lossy(&got.body).replace(' ', ""), doc);
    }
    let too_deep = a.put("/v1/kv/deeper", &nested(100_000)).await;
    assert_eq!(too_deep.status, 422, "{too_deep:?}");
    assert_eq!(too_deep.code(), "invalid_document");
    let message = too_deep.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("max_stack_depth"), "{message}");
    assert_eq!(a.get("/v1/kv/deep").await.status, 200, "still serving");

    let by_sql = nested(3000);
    env.pg()
        .await
        .execute(
            "INSERT INTO syncar_kv (key, value) VALUES ('sql', $1::text::jsonb)",
            &[&by_sql],
        )
        .await
        .unwrap();
    let served = a.get("/v1/kv/sql").await;
    assert_eq!(served.status, 200);
    let back = a
        .put("/v1/kv/sql", &String::from_utf8_lossy(&served.body))
        .await;
    assert_eq!(
        back.status, 200,
        "what is served can be written back: {back:?}"
    );
    let malformed = a.put("/v1/kv/bad", &format!("{}1", "[".repeat(300))).await;
    assert_eq!(
        malformed.code(),
        "malformed_json",
        "unclosed arrays are malformed"
    );
}

/// `POST /v1/{resource}` with `{"keys": [...]}`: each key answered in order, as a single
/// GET would (document, version, tier; 404; a per-key error), from L1, Redis or one
/// Postgres query; `min_version` honoured; limits and bad bodies refused clearly.
#[tokio::test]
async fn a_batch_get_answers_every_key_in_order() {
    let env = Env::new().await;
    let a = env.start(|c| c.server.max_batch_keys = 5).await;
    let b = env.start(|c| c.server.max_batch_keys = 5).await;
    let batch = |i: &crate::support::Instance, query: &str, body: String| {
        let addr = i.addr();
        let path = format!("/v1/kv{query}");
        async move { request(addr, "POST", &path, &[], Some(body.as_bytes())).await }
    };
    let va = a.put("/v1/kv/a", r#"{"n":1}"#).await.etag_version();
    let vbulk = a.put("/v1/kv/bulk", "2").await.etag_version();
    for i in [&a, &b] {
        i.sees("/v1/kv/bulk", vbulk, Duration::from_secs(10)).await;
    }
    let r = batch(&b, "", r#"{"keys": ["a", "nope", "", "bulk", "a"]}"#.into()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["key"], "a");
    assert_eq!(results[0]["status"], 200);
    assert_eq!(results[0]["version"], va);
    assert_eq!(results[0]["document"], json!({"n": 1}));
    assert_eq!(results[1]["status"], 404, "{results}");
    assert_eq!(results[2]["status"], 400);
    assert_eq!(results[2]["error"]["code"], "invalid_key");
    assert_eq!(
        results[3]["key"], "bulk",
        "a key named like a route is a key"
    );
    assert_eq!(results[3]["version"], vbulk);
    assert_eq!(
        results[4]["version"], va,
        "a key asked twice is answered twice"
    );
    let again = batch(&b, "", r#"{"keys": ["a", "bulk"]}"#.into())
        .await
        .json();
    for result in again["results"].as_array().unwrap() {
        assert_eq!(result["tier"], "l1", "{again}");
    }

    // Read-your-writes through another instance, for the whole batch.
    let v2 = a.put("/v1/kv/a", r#"{"n":2}"#).await.etag_version();
    let fresh = batch(
        &b,
        &format!("?min_version={v2}"),
        r#"{"keys": ["a"]}"#.into(),
    )
    .await;
    assert_eq!(fresh.json()["results"][0]["version"], v2, "{fresh:?}");
    assert_eq!(fresh.json()["results"][0]["document"], json!({"n": 2}));

    let many = batch(&a, "", r#"{"keys": ["1","2","3","4","5","6"]}"#.into()).await;
    assert_eq!((many.status, many.code()), (413, "too_many_keys".into()));
    let bad = batch(&a, "", r#"{"key": ["a"]}"#.into()).await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_body".into()));
    let get = a.get("/v1/kv").await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    let unknown = request(a.addr(), "POST", "/v1/nope", &[], Some(b"{\"keys\":[]}")).await;
    assert_eq!(unknown.code(), "unknown_resource");
    let empty = batch(&a, "", r#"{"keys": []}"#.into()).await;
    assert_eq!(empty.json(), json!({"results": []}));
}

/// A batch of a table with integer keys: Redis and Postgres each asked once for what the
/// tier above lacked; `02` and `2` name one row; a key that is not an integer is a per-key
/// 400.
#[tokio::test]
async fn a_batch_get_of_a_table_reads_what_is_missing_at_once() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text);
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let with_items = |c: &mut syncar::Config| {
        c.resources
            .push(crate::support::resource("items", "id", "version"))
    };
    let a = env.start(with_items).await;
    let b = env.start(with_items).await;
    let keys: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    let body = json!({"keys": keys}).to_string();
    let first = request(a.addr(), "POST", "/v1/items", &[], Some(body.as_bytes())).await;
    let results = first.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 50);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["tier"], "db");
        assert_eq!(r["document"]["name"], format!("item {}", i + 1));
    }
    let from_b = request(b.addr(), "POST", "/v1/items", &[], Some(body.as_bytes())).await;
    for r in from_b.json()["results"].as_array().unwrap() {
        assert_eq!(r["tier"], "l2", "{r}");
    }
    let odd = request(
        a.addr(),
        "POST",
        "/v1/items",
        &[],
        Some(br#"{"keys": ["02", "x", "99"]}"#),
    )
    .await
    .json();
    assert_eq!(odd["results"][0]["document"]["id"], 2);
    assert_eq!(odd["results"][1]["status"], 400);
    assert_eq!(odd["results"][2]["status"], 404);
    // Not in any cache yet, and asked twice under two spellings: one row, found twice.
    env.pg()
        .await
        .batch_execute("INSERT INTO items VALUES (77, 'late')")
        .await
        .unwrap();
    let twice = request(
        b.addr(),
        "POST",
        "/v1/items",
        &[],
        Some(br#"{"keys": ["77", "077"]}"#),
    )
    .await
    .json();
    for r in twice["results"].as_array().unwrap() {
        assert_eq!(r["status"], 200, "{twice}");
    }
}

/// `POST /v1`: writes on two resources committed together, or not at all: one failed
/// precondition answers 412 naming the operation and writes nothing; the caches of every
/// instance see the committed writes.
#[tokio::test]
async fn a_transaction_commits_all_or_nothing() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY, total numeric)")
        .await
        .unwrap();
    let with_orders = |c: &mut syncar::Config| {
        c.resources
            .push(crate::support::resource("orders", "id", "version"))
    };
    let a = env.start(with_orders).await;
    let b = env.start(with_orders).await;
    let tx = |body: serde_json::Value| {
        let addr = a.addr();
        async move { request(addr, "POST", "/v1", &[], Some(body.to_string().as_bytes())).await }
    };
    let v_gone = a.put("/v1/kv/gone", "0").await.etag_version();
    b.sees("/v1/kv/gone", v_gone, Duration::from_secs(10)).await;
    let ok = tx(json!({"operations": [
        {"op": "put", "resource": "orders", "key": "7", "document": {"total": 12.5}},
        {"op": "put", "resource": "kv", "key": "cart", "document": {"items": [1, 2]}, "if_none_match": "*"},
        {"op": "delete", "resource": "kv", "key": "gone"},
        {"op": "delete", "resource": "kv", "key": "never"},
    ]}))
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let results = ok.json()["results"].clone();
    assert_eq!(results[0]["status"], 201);
    assert_eq!(results[1]["status"], 201);
    assert_eq!(results[2]["status"], 204);
    assert_eq!(results[3]["status"], 404);
    let v_order = results[0]["version"].as_i64().unwrap();
    let v_cart = results[1]["version"].as_i64().unwrap();
    for i in [&a, &b] {
        i.sees("/v1/orders/7", v_order, Duration::from_secs(10))
            .await;
        i.sees("/v1/kv/cart", v_cart, Duration::from_secs(10)).await;
        i.sees_absent("/v1/kv/gone", Duration::from_secs(10)).await;
    }

    // The second operation's precondition fails: the first is not written either.
    let refused = tx(json!({"operations": [
        {"op": "put", "resource": "orders", "key": "7", "document": {"total": 99}},
        {"op": "put", "resource": "kv", "key": "cart", "document": [], "if_match": "\"1\""},
    ]}))
    .await;
    assert_eq!(refused.status, 412, "{refused:?}");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("operation 1 (put kv/cart)"), "{message}");
    assert_eq!(
        a.get("/v1/orders/7").await.etag_version(),
        v_order,
        "nothing written"
    );
    let total: String = query_value(
        &env.pg().await,
        "SELECT total::text FROM orders WHERE id = 7",
    )
    .await;
    assert_eq!(total, "12.5");

    // Postgres refusing a document names the operation too.
    let rejected = tx(json!({"operations": [
        {"op": "put", "resource": "orders", "key": "8", "document": {"total": "lots"}},
    ]}))
    .await;
    assert_eq!(
        (rejected.status, rejected.code()),
        (422, "invalid_document".into())
    );
    assert!(rejected.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("operation 0 (put orders/8)"));
    // Puts in a row go out together: the first that fails is named, not one after it that
    // Postgres refused as part of an aborted transaction, and nothing is written.
    let rejected = tx(json!({"operations": [
        {"op": "put", "resource": "orders", "key": "8", "document": {"total": 1}},
        {"op": "put", "resource": "orders", "key": "9", "document": {"total": "lots"}},
        {"op": "put", "resource": "orders", "key": "10", "document": {"total": 1}},
    ]}))
    .await;
    assert_eq!(rejected.status, 422, "{rejected:?}");
    assert!(
        rejected.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("operation 1 (put orders/9)"),
        "{rejected:?}"
    );
    let written: i64 = query_value(
        &env.pg().await,
        "SELECT count(*) FROM orders WHERE id IN (8, 9, 10)",
    )
    .await;
    assert_eq!(written, 0, "nothing written");
    // ... and run in the order given.
    let twice = tx(json!({"operations": [
        {"op": "put", "resource": "orders", "key": "11", "document": {"total": 1}},
        {"op": "put", "resource": "orders", "key": "11", "document": {"total": 2}},
    ]}))
    .await;
    assert_eq!(twice.status, 200, "{twice:?}");
    let results = twice.json()["results"].clone();
    assert_eq!(results[0]["status"], 201, "{results}");
    assert_eq!(results[1]["status"], 200, "{results}");
    assert!(results[1]["version"].as_i64() > results[0]["version"].as_i64());
    let total: String = query_value(
        &env.pg().await,
        "SELECT total::text FROM orders WHERE id = 11",
    )
    .await;
    assert_eq!(total, "2");
    for (body, code) in [
        (
            json!({"operations": [{"op": "patch", "resource": "kv", "key": "x"}]}),
            "invalid_body",
        ),
        (
            json!({"operations": [{"op": "put", "resource": "kv", "key": "x"}]}),
            "invalid_body",
        ),
        (json!({"ops": []}), "invalid_body"),
    ] {
        let r = tx(body.clone()).await;
        assert_eq!((r.status, r.code()), (400, code.into()), "{body}: {r:?}");
    }
    // An unknown resource answers as on a single request.
    let r =
        tx(json!({"operations": [{"op": "put", "resource": "nope", "key": "x", "document": 1}]}))
            .await;
    assert_eq!(
        (r.status, r.code()),
        (404, "unknown_resource".into()),
        "{r:?}"
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("operation 0"));
    // Integer keys may be JSON integers.
    let r = tx(json!({"operations": [{"op": "put", "resource": "orders", "key": 9, "document": {"total": 1}}]}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["results"][0]["key"], "9");
    let many = request(
        a.addr(),
        "POST",
        "/v1/orders",
        &[],
        Some(br#"{"keys": [9, "7"]}"#),
    )
    .await;
    assert_eq!(many.status, 200, "{many:?}");
    assert_eq!(many.json()["results"][0]["status"], 200, "{many:?}");
    assert_eq!(many.json()["results"][1]["status"], 200, "{many:?}");
    assert_eq!(a.get("/v1").await.status, 405);
}
