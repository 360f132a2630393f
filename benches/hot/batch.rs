//! The batch get against single GETs, side by side: 100 keys in one `POST /v1/kv` against
//! 100 sequential GETs on one keep-alive connection and against the same 100 GETs spread
//! over 50 concurrent connections, from L1, from Redis (an instance without L1) and from
//! Postgres (`consistency=strong`, which reads Postgres for every key). Reported: keys per
//! second and the p99 of one call (a GET, or the batch).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Keys per batch, and per round of single GETs.
const KEYS: usize = 100;
/// Concurrent connections of the "concurrent GETs" way.
const CONNS: usize = 50;

/// One way of reading one tier: keys per second, and the p99 of a call in ms.
pub struct Row {
    pub tier: &'static str,
    pub way: &'static str,
    pub keys_per_sec: f64,
    pub p99_call_ms: f64,
}

impl Row {
    pub fn json(&self) -> Value {
        json!({"tier": self.tier, "way": self.way, "keys_per_sec": self.keys_per_sec,
               "p99_call_ms": self.p99_call_ms})
    }
}

/// A keep-alive HTTP/1.1 connection to syncar.
struct Conn(http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Conn(sender)
    }

    /// One request; panics unless it answers 200 (a benchmark of errors measures nothing).
    async fn call(&mut self, method: &str, path: &str, body: Bytes) -> Bytes {
        self.0.ready().await.expect("connection ready");
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bench")
            .body(Full::new(body))
            .unwrap();
        let resp = self.0.send_request(req).await.expect("request");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            status,
            200,
            "{method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }
}

fn p99(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(|a, b| a.total_cmp(b));
    ms[(ms.len() * 99 / 100).min(ms.len() - 1)]
}

/// The three ways for one tier of the instance on `port`; `query` is added to every path.
async fn tier(tier: &'static str, port: u16, query: &str, keys: &[String], secs: u64) -> Vec<Row> {
    let body = Bytes::from(json!({ "keys": keys }).to_string());
    let batch_path = format!("/v1/kv{query}");
    let get_path = |k: &str| format!("/v1/kv/{k}{query}");
    let mut rows = Vec::new();

    // One batch after another on one connection.
    let mut conn = Conn::open(port).await;
    conn.call("POST", &batch_path, body.clone()).await; // warm
    let (mut calls, mut n, start) = (Vec::new(), 0usize, Instant::now());
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let answer = conn.call("POST", &batch_path, body.clone()).await;
        calls.push(t.elapsed().as_secs_f64() * 1e3);
        debug_assert!(answer.starts_with(b"{\"results\""));
        n += KEYS;
    }
    rows.push(Row {
        tier,
        way: "batch of 100",
        keys_per_sec: n as f64 / start.elapsed().as_secs_f64(),
        p99_call_ms: p99(calls),
    });

    // 100 GETs one after another on one connection.
    let (mut calls, mut n, start) = (Vec::new(), 0usize, Instant::now());
    while start.elapsed() < Duration::from_secs(secs) {
        for k in keys {
            let t = Instant::now();
            conn.call("GET", &get_path(k), Bytes::new()).await;
            calls.push(t.elapsed().as_secs_f64() * 1e3);
            n += 1;
        }
    }
    rows.push(Row {
        tier,
        way: "100 sequential GETs",
        keys_per_sec: n as f64 / start.elapsed().as_secs_f64(),
        p99_call_ms: p99(calls),
    });

    // The same 100 GETs spread over 50 connections, each taking the next key.
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(Conn::open(port).await);
    }
    let (mut calls, mut n, start) = (Vec::new(), 0usize, Instant::now());
    while start.elapsed() < Duration::from_secs(secs) {
        let rounds = conns.iter_mut().enumerate().map(|(c, conn)| {
            let mine: Vec<String> = keys
                .iter()
                .skip(c)
                .step_by(CONNS)
                .map(|k| get_path(k))
                .collect();
            async move {
                let mut ms = Vec::new();
                for path in mine {
                    let t = Instant::now();
                    conn.call("GET", &path, Bytes::new()).await;
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                ms
            }
        });
        for ms in futures_util::future::join_all(rounds).await {
            n += ms.len();
            calls.extend(ms);
        }
    }
    rows.push(Row {
        tier,
        way: "100 GETs on 50 connections",
        keys_per_sec: n as f64 / start.elapsed().as_secs_f64(),
        p99_call_ms: p99(calls),
    });
    rows
}

/// Every row: L1 from the instance on `l1_port`, Redis from the one without L1 on `l2_port`,
/// Postgres with `consistency=strong`. The first `KEYS` keys `k1`… are read.
pub fn rows(l1_port: u16, l2_port: u16, secs: u64) -> Vec<Row> {
    let keys: Vec<String> = (1..=KEYS).map(|i| format!("k{i}")).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut rows = tier("l1", l1_port, "", &keys, secs).await;
        rows.extend(tier("redis", l2_port, "", &keys, secs).await);
        rows.extend(tier("postgres", l2_port, "?consistency=strong", &keys, secs).await);
        rows
    })
}
