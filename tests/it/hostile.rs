//! Hostile input and hard stops: oversized heads, floods, missing credentials, and a SIGKILL
//! in the middle of a write load.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{eventually, free_port, request, Env};

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let big = "x".repeat(20 * 1024);
    let addr = a.addr();
    let status = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /v1/kv/a HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    assert_eq!(a.get("/healthz").await.status, 200, "still serving");
}

/// One request slot: while a slow client holds it, others are shed at once with 503 and
/// Retry-After, `/healthz` still answers, and the slow request completes.
#[tokio::test]
async fn requests_beyond_the_limit_are_shed_not_queued() {
    let env = Env::new().await;
    let a = env.start(|c| c.server.max_concurrent_requests = 1).await;
    let addr = a.addr();
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let shed = eventually(Duration::from_secs(5), "a request to be shed", || async {
        let r = a.get("/v1/kv/other").await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(shed.code(), "overloaded");
    assert_eq!(shed.header("retry-after"), Some("1"));
    assert_eq!(a.get("/healthz").await.status, 200);

    let answer = tokio::task::spawn_blocking(move || {
        slow.write_all(b"7").unwrap();
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(a.get("/v1/kv/slow").await.status, 200);
}

#[tokio::test]
async fn a_token_guards_every_route_but_liveness() {
    let env = Env::new().await;
    let token = "s3cret-token-0123456789";
    let a = env
        .start(|c| c.server.auth_token = Some(syncar::config::Secret(token.into())))
        .await;
    let bearer = format!("Bearer {token}");
    for path in ["/v1/kv/a", "/readyz", "/metrics"] {
        let r = a.get(path).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.code(), "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let wrong = request(
            a.addr(),
            "GET",
            path,
            &[("authorization", "Bearer nope")],
            None,
        )
        .await;
        assert_eq!(wrong.status, 401, "{path}");
    }
    let put = request(
        a.addr(),
        "PUT",
        "/v1/kv/a",
        &[("authorization", &bearer)],
        Some(b"1"),
    )
    .await;
    assert_eq!(put.status, 201);
    let get = request(
        a.addr(),
        "GET",
        "/v1/kv/a",
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(get.status, 200);
    assert_eq!(a.get("/healthz").await.status, 200, "probes need no token");
}

#[tokio::test]
async fn the_admin_listener_serves_probes_and_metrics_only_without_token_or_shedding() {
    let env = Env::new().await;
    let token = "s3cret-token-0123456789";
    let a = env
        .start(|c| {
            c.server.auth_token = Some(syncar::config::Secret(token.into()));
            c.server.admin_listen = Some("127.0.0.1:0".into());
            c.server.max_concurrent_requests = 1;
        })
        .await;
    let admin = a.admin_addr();
    let get = |path: &'static str| async move { request(admin, "GET", path, &[], None).await };
    assert_eq!(get("/healthz").await.status, 200);
    assert_eq!(get("/readyz").await.status, 200, "no token needed");
    let metrics = get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("syncar_http_requests_total"), "{text}");
    for path in ["/v1/kv/a", "/openapi.json", "/"] {
        assert_eq!(
            get(path).await.status,
            404,
            "{path}: documents stay on the API"
        );
    }
    let put = request(admin, "PUT", "/metrics", &[], Some(b"1")).await;
    assert_eq!(put.status, 405);
    assert_eq!(
        a.get("/metrics").await.status,
        401,
        "the API still wants the token"
    );

    // The API's only slot taken by a slow request: the API sheds, the admin listener doesn't.
    let mut slow = std::net::TcpStream::connect(a.addr()).unwrap();
    write!(
        slow,
        "PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    eventually(Duration::from_secs(5), "the API to shed", || async {
        let r = request(
            a.addr(),
            "GET",
            "/readyz",
            &[("authorization", &bearer)],
            None,
        )
        .await;
        (r.status == 503).then_some(())
    })
    .await;
    assert_eq!(get("/readyz").await.status, 200, "probes are not shed");
    assert_eq!(get("/metrics").await.status, 200, "scrapes are not shed");
    drop(slow);
}

#[tokio::test]
async fn a_flood_of_readiness_probes_is_bounded_and_liveness_still_answers() {
    let env = Env::new().await;
    let (proxy, url) = env.pg_proxy().await;
    let direct = env.pg_url.clone();
    let a = env
        .start(|c| {
            c.postgres.url = url;
            c.postgres.listen_url = Some(direct);
            c.server.admin_listen = Some("127.0.0.1:0".into());
        })
        .await;
    let admin = a.admin_addr();
    // Every /readyz now waits on a slow Postgres ping.
    proxy.delay(Duration::from_millis(1500));
    let flood: Vec<_> = (0..40)
        .map(|_| tokio::spawn(async move { request(admin, "GET", "/readyz", &[], None).await }))
        .collect();
    eventually(
        Duration::from_secs(5),
        "the probes to fill the admin listener",
        || async { (a.state().admin_inflight.available_permits() == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        request(admin, "GET", "/healthz", &[], None).await.status,
        200,
        "liveness is never shed"
    );
    let mut shed = 0;
    for r in flood {
        let r = r.await.unwrap();
        if r.status == 503 && r.code() == "overloaded" {
            shed += 1;
        }
    }
    assert!(
        shed >= 40 - 16,
        "at most 16 probes at once: {shed} shed of 40"
    );
    proxy.restore();
}

/// SIGKILL while writes are in flight: every write acknowledged before the kill is in
/// Postgres with its value and version, and served after a restart.
#[tokio::test]
async fn a_killed_instance_loses_no_acknowledged_write() {
    let env = Env::new().await;
    let port = free_port();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_syncar"))
            .arg("serve")
            .env("SYNCAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("SYNCAR_POSTGRES_URL", &env.pg_url)
            .env("SYNCAR_REDIS_URL", &env.redis_url)
            .env("SYNCAR_LOG", "error")
            .env_remove("SYNCAR_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ready = || async {
        eventually(Duration::from_secs(20), "syncar to be ready", || async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => {
                    (request(addr, "GET", "/readyz", &[], None).await.status == 200).then_some(())
                }
                Err(_) => None,
            }
        })
        .await
    };
    let mut child = spawn();
    ready().await;

    let acked: Arc<Mutex<Vec<(String, i64, String)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("c{w}-{i}");
                let value = format!("{{\"w\":{w},\"i\":{i}}}");
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    crate::support::try_request(
                        addr,
                        "PUT",
                        &format!("/v1/kv/{key}"),
                        value.as_bytes(),
                    ),
                )
                .await;
                match r {
                    Ok(Some((201, version))) => acked.lock().unwrap().push((key, version, value)),
                    _ => return,
                }
            }
        }));
    }
    eventually(
        Duration::from_secs(20),
        "writes to be acknowledged",
        || async { (acked.lock().unwrap().len() >= 100).then_some(()) },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 100);

    let pg = env.pg().await;
    for (key, version, value) in &acked {
        let row = pg
            .query_one(
                "SELECT version, value::text FROM syncar_kv WHERE key = $1",
                &[key],
            )
            .await
            .unwrap_or_else(|e| panic!("acknowledged {key} missing: {e}"));
        assert_eq!(row.get::<_, i64>(0), *version, "{key}");
        let stored: serde_json::Value = serde_json::from_str(&row.get::<_, String>(1)).unwrap();
        assert_eq!(
            stored,
            serde_json::from_str::<serde_json::Value>(value).unwrap()
        );
    }

    let mut child = spawn();
    ready().await;
    for (key, version, _) in acked.iter().step_by(7) {
        let r = request(addr, "GET", &format!("/v1/kv/{key}"), &[], None).await;
        assert_eq!(r.etag_version(), *version, "{key} after the restart");
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
}

/// A slow Postgres (latency added by the fault proxy) costs a miss its deadline, never a hang;
/// cached documents are still served; a reset connection is replaced. All recover.
#[tokio::test]
async fn slow_and_reset_postgres_connections() {
    let env = Env::new().await;
    let (proxy, url) = env.pg_proxy().await;
    let direct = env.pg_url.clone();
    let a = env
        .start(|c| {
            c.postgres.url = url.clone();
            c.postgres.listen_url = Some(direct.clone());
            c.server.request_timeout = Duration::from_millis(700);
        })
        .await;
    assert_eq!(a.put("/v1/kv/hot", "1").await.status, 201);

    proxy.delay(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let slow = a.get("/v1/kv/cold").await;
    assert_eq!(slow.status, 504, "{slow:?}");
    assert_eq!(slow.code(), "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the deadline"
    );
    assert_eq!(a.get("/v1/kv/hot").await.header("x-cache"), Some("l1"));

    proxy.delay(Duration::ZERO);
    proxy.reset();
    let back = eventually(
        Duration::from_secs(10),
        "postgres to answer again",
        || async {
            let r = a.get("/v1/kv/cold2").await;
            (r.status == 404).then_some(r)
        },
    )
    .await;
    assert_eq!(back.header("x-cache"), Some("db"));
}

/// A pooled backend terminated while a read waits on it: the read is tried once more on a
/// connection of its own, and answers 200 instead of 503.
#[tokio::test]
async fn a_read_whose_backend_is_terminated_under_it_still_answers() {
    let env = Env::new().await;
    let (proxy, url) = env.pg_proxy().await;
    let direct = env.pg_url.clone();
    let a = env
        .start(|c| {
            c.postgres.url = url.clone();
            c.postgres.listen_url = Some(direct.clone());
        })
        .await;
    let v = a.put("/v1/kv/t", "1").await.etag_version();
    // A strong read always asks Postgres; the proxy holds its query for a while.
    proxy.delay(Duration::from_millis(500));
    let addr = a.addr();
    let read = tokio::spawn(async move {
        request(addr, "GET", "/v1/kv/t?consistency=strong", &[], None).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(env.terminate("syncar").await > 0);
    proxy.delay(Duration::ZERO);
    let r = read.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.etag_version(), v);
}

/// `server.listen_unix`: the same API on a Unix domain socket, beside TCP, with the file mode
/// asked for; a stale socket from a previous process is replaced, and the file is removed on
/// shutdown.
#[tokio::test]
async fn the_api_is_served_on_a_unix_socket_too() {
    use std::os::unix::fs::PermissionsExt;

    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // A stale socket left by a killed process.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let socket = path.to_string_lossy().into_owned();
    let a = env
        .start(|c| {
            c.server.listen_unix = Some(socket.clone());
            c.server.listen_unix_mode = "0600".into();
        })
        .await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let call = |method: &'static str, uri: &'static str, body: &'static str| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method(method)
                .uri(uri)
                .header("host", "localhost")
                .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let cache = resp
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_string());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, cache, body)
        }
    };
    assert_eq!(call("PUT", "/v1/kv/u", "{\"over\":\"unix\"}").await.0, 201);
    let (status, cache, body) = call("GET", "/v1/kv/u", "").await;
    assert_eq!((status, cache.as_deref()), (200, Some("l1")));
    assert_eq!(&body[..], b"{\"over\": \"unix\"}");
    assert_eq!(a.get("/v1/kv/u").await.status, 200, "TCP still serves");
    a.shutdown().await;
    assert!(!path.exists(), "the socket file is removed on shutdown");
}
