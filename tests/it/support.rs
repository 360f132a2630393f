//! Test support: a real Postgres and a real Redis started once per test binary on free ports
//! (`../common/servers.rs`, shared with the benchmarks), a database and key prefix per test, syncar instances started in-process, an HTTP client,
//! and a TCP proxy that can cut connections. Nothing here mocks a server.
//!
//! A missing server binary fails the test with the package to install; nothing is skipped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use syncar::{App, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[path = "../common/servers.rs"]
mod servers;
pub use servers::{
    free_port, servers, tls_servers, PgBouncer, PostgresPair, RedisCluster, RedisServer,
    SentinelGroup, TlsServers,
};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One test's share of the servers: its own database and Redis key prefix.
#[derive(Clone)]
pub struct Env {
    /// What syncar connects to.
    pub pg_url: String,
    /// What the test's own SQL connects to (the TLS Postgres' Unix socket; else `pg_url`).
    sql_url: String,
    pub redis_url: String,
    pub prefix: String,
}

impl Env {
    pub async fn new() -> Env {
        let s = servers();
        let url = |db: &str| format!("postgres://postgres@127.0.0.1:{}/{db}", s.pg_port);
        Env::create(url, url).await
    }

    /// A database on `pair`'s primary (the standby receives it), reached through a URL that
    /// names both servers ([`PostgresPair::url`]); the shared Redis.
    pub async fn on_pair(pair: &PostgresPair) -> Env {
        Env::create(|db| pair.url(db), |db| pair.url(db)).await
    }

    /// A database on the TLS Postgres (`servers::tls_servers`): syncar reaches it over TCP at
    /// `host` (TLS only; add `sslmode` and the rest to `pg_url`), the test over the socket.
    pub async fn new_on_tls(host: &str) -> Env {
        let t = servers::tls_servers();
        let (port, socket) = (t.pg_port, t.pg_socket_dir.clone());
        Env::create(
            |db| format!("postgres://postgres@{host}:{port}/{db}"),
            |db| {
                format!(
                    "host={} port={port} user=postgres dbname={db}",
                    socket.display()
                )
            },
        )
        .await
    }

    /// A database on a Postgres of its own started with `settings` (`-c wal_level=replica`,
    /// see `servers::postgres_with`), for a test of a server set up otherwise.
    pub async fn new_on_postgres_with(settings: &str) -> Env {
        let settings = settings.to_string();
        let port = tokio::task::spawn_blocking(move || servers::postgres_with(&settings))
            .await
            .expect("start a postgres");
        let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
        Env::create(url, url).await
    }

    async fn create(url: impl Fn(&str) -> String, sql_url: impl Fn(&str) -> String) -> Env {
        let s = servers();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let db = format!("t{}_{n}", std::process::id());
        let (client, conn) = tokio_postgres::connect(&sql_url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        let driver = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = driver.await;
        Env {
            pg_url: url(&db),
            sql_url: sql_url(&db),
            redis_url: format!("redis://127.0.0.1:{}", s.redis_port),
            prefix: format!("{db}:"),
        }
    }

    /// A syncar config for this env, listening on a free port.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.server.listen = "127.0.0.1:0".into();
        c.postgres.url = self.pg_url.clone();
        c.postgres.pool_size = 4;
        c.redis.url = self.redis_url.clone();
        c.redis.key_prefix = self.prefix.clone();
        // The tests written before the wal source keep the source they were written for;
        // tests of `wal` and `auto` say so.
        c.feeds.postgres_source = syncar::config::PostgresSource::ChangesLog;
        c.log.level = "warn".into();
        c.validate().expect("test config is valid");
        c
    }

    /// Starts an instance with `config()` adjusted by `f`, and waits until it is ready.
    pub async fn start(&self, f: impl FnOnce(&mut Config)) -> Instance {
        let mut config = self.config();
        f(&mut config);
        self.start_with(config).await
    }

    /// Starts an instance with `config`, and waits until it is ready.
    pub async fn start_with(&self, config: Config) -> Instance {
        config.validate().expect("test config is valid");
        init_logging();
        let app = App::start(config).await.expect("syncar starts");
        app.ready(Duration::from_secs(20))
            .await
            .expect("syncar becomes ready");
        Instance { app }
    }

    /// A fault proxy in front of the test Postgres, and this env's database URL through it.
    pub async fn pg_proxy(&self) -> (Proxy, String) {
        let port = servers().pg_port;
        let proxy = Proxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
        let url = self
            .pg_url
            .replace(&format!(":{port}/"), &format!(":{}/", proxy.addr.port()));
        (proxy, url)
    }

    /// Terminates this env's database backends named `application_name` (`syncar` is the
    /// pool, `syncar-listen` a Postgres feed, `syncar-relay` the relay); how many.
    pub async fn terminate(&self, application_name: &str) -> i64 {
        self.pg()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1",
                &[&application_name],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.sql_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    /// [`Env::pg`], or `None` while no server takes the connection (a failover).
    pub async fn try_pg(&self) -> Option<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.sql_url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(client)
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    /// The Redis entry syncar keeps for `resource:key` in the resource's current
    /// generation, as `{version}:{kind}:{document}` (the `at_ms` field dropped).
    /// This env on another Redis (a test's own [`RedisServer`]).
    pub fn on_redis(&self, url: String) -> Env {
        Env {
            redis_url: url,
            ..self.clone()
        }
    }

    /// The raw value of the Redis key `name`, whatever the generations say.
    pub async fn redis_get(&self, name: &str) -> Option<String> {
        let mut conn = self.redis().await;
        redis::cmd("GET")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The Redis key of `resource`'s `key` in the generation Redis says is in force.
    pub async fn redis_key(&self, resource: &str, key: &str) -> String {
        let mut conn = self.redis().await;
        let generation: Option<String> = redis::cmd("HGET")
            .arg(format!("{}generations", self.prefix))
            .arg(resource)
            .query_async(&mut conn)
            .await
            .unwrap();
        match generation.as_deref() {
            None | Some("0") => format!("{}{resource}:{key}", self.prefix),
            Some(g) => format!("{}{resource}@{g}:{key}", self.prefix),
        }
    }

    /// The entry of `resource`'s `key` in the generation in force, without its timestamp.
    pub async fn redis_entry(&self, resource: &str, key: &str) -> Option<String> {
        let name = self.redis_key(resource, key).await;
        self.redis_get(&name).await.map(|r| without_at(&r))
    }
}

pub struct Instance {
    pub app: App,
}

impl Instance {
    pub fn addr(&self) -> SocketAddr {
        self.app.addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.app.admin_addr().expect("server.admin_listen is set")
    }

    pub fn state(&self) -> &Arc<syncar::http::HttpState> {
        self.app.state()
    }

    pub async fn get(&self, path: &str) -> Resp {
        request(self.addr(), "GET", path, &[], None).await
    }

    pub async fn put(&self, path: &str, body: &str) -> Resp {
        request(self.addr(), "PUT", path, &[], Some(body.as_bytes())).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        request(self.addr(), "DELETE", path, &[], None).await
    }

    pub async fn shutdown(self) {
        self.app.shutdown().await;
    }

    pub async fn readyz(&self) -> serde_json::Value {
        self.get("/readyz").await.json()
    }

    /// Polls until `path` answers 200 with `version` (its ETag), for at most `within`.
    pub async fn sees(&self, path: &str, version: i64, within: Duration) {
        eventually(within, &format!("{path} at version {version}"), || async {
            let r = self.get(path).await;
            (r.status == 200 && r.etag_version() == version).then_some(())
        })
        .await;
    }

    /// Polls until `path` answers 404, for at most `within`.
    pub async fn sees_absent(&self, path: &str, within: Duration) {
        eventually(within, &format!("{path} gone"), || async {
            (self.get(path).await.status == 404).then_some(())
        })
        .await;
    }

    /// Drops this deployment's key prefix from Redis the way a feed's recovery does, and
    /// as it does, tries again after a failure (a 250 ms command timeout on a machine
    /// busy with the rest of the suite) for at most five seconds. Returns how many keys the
    /// try that succeeded removed, and whether an earlier one failed (and may have removed
    /// some already).
    pub async fn flush_redis(&self) -> (u64, bool) {
        let tiers = self.state().tiers.feed_tiers();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut retried = false;
        loop {
            match tiers.flush_redis().await {
                Ok(n) => return (n, retried),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("flush_redis failed, trying again: {e}");
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("flush_redis kept failing: {e}"),
            }
        }
    }

    /// Waits until `feed` reports `up` (true or false), returning how long it took.
    pub async fn feed_becomes(&self, feed: &str, up: bool, timeout: Duration) -> Duration {
        let start = Instant::now();
        eventually(timeout, &format!("{feed} feed up={up}"), || async {
            (self.readyz().await["feeds"][feed]["up"] == up).then_some(())
        })
        .await;
        start.elapsed()
    }
}

/// A `[[resource]]` on `public.{table}` with the default TTLs.
pub fn resource(table: &str, key: &str, version_column: &str) -> syncar::config::ResourceConfig {
    syncar::config::ResourceConfig {
        name: table.into(),
        table: table.into(),
        schema: "public".into(),
        key: key.into(),
        version_column: version_column.into(),
        l1_ttl: None,
        l2_ttl: None,
        negative_ttl: None,
        tombstone_ttl: None,
    }
}

/// `{version}:{kind}:{at_ms}:{document}` without `at_ms`.
pub fn without_at(raw: &str) -> String {
    let parts: Vec<&str> = raw.splitn(4, ':').collect();
    assert_eq!(parts.len(), 4, "unexpected redis entry {raw:?}");
    format!("{}:{}:{}", parts[0], parts[1], parts[3])
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The version in the ETag.
    pub fn etag_version(&self) -> i64 {
        self.header("etag")
            .and_then(version_of_etag)
            .unwrap_or_else(|| panic!("no numeric ETag in {self:?}"))
    }
}

/// The version an ETag names: `"42"`, or `"42-7"` once its table changed shape.
pub fn version_of_etag(etag: &str) -> Option<i64> {
    let etag = etag.trim_matches('"');
    etag.split_once('-').map_or(etag, |(v, _)| v).parse().ok()
}

/// Logs through libtest's capture: a passing test prints nothing, a failing one shows its
/// logs (the fault tests' expected WARN lines stay out of `make test`'s output). Level from
/// `RUST_LOG`, default `info`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let resp = send(addr, method, path, headers, body.unwrap_or_default()).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("read body")
        .to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

/// Sends one request on a fresh connection; the response's body is left to the caller.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect to syncar");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    sender.send_request(req).await.expect("send request")
}

/// A Server-Sent Events stream (a watch), read event by event.
pub struct Sse {
    body: hyper::body::Incoming,
    buffer: String,
    pub status: u16,
    pub content_type: String,
}

/// One event of an [`Sse`] stream.
#[derive(Debug)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: serde_json::Value,
}

impl Sse {
    /// `GET path` with `headers`, kept open.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let resp = send(addr, "GET", path, headers, b"").await;
        Sse {
            status: resp.status().as_u16(),
            content_type: resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: resp.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ended or `within` passed.
    pub async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = v.to_string();
                    }
                }
                if event.is_empty() {
                    continue; // a comment
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(SseEvent { id, event, data });
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??;
            let frame = frame.ok()?;
            if let Some(bytes) = frame.data_ref() {
                self.buffer.push_str(&String::from_utf8_lossy(bytes));
            }
        }
    }
}

/// One request that may fail (the server may be killed under it): `(status, ETag version)`,
/// or `None` when the connection failed.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, i64)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::copy_from_slice(body)))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let version = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .and_then(version_of_etag)
        .unwrap_or(-1);
    resp.into_body().collect().await.ok()?;
    Some((status, version))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A TCP proxy to `target` that can add latency, reset every connection, cut them and refuse
/// new ones, or stop forwarding without closing anything (a half-open, silently dead
/// connection).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    /// Milliseconds added before forwarding each chunk, both ways.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    /// Where new connections go.
    target: Arc<Mutex<SocketAddr>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target = Arc::new(Mutex::new(target));
        let accept = {
            let (cut, conns, blackhole) = (cut.clone(), conns.clone(), blackhole.clone());
            let delay_ms = delay_ms.clone();
            let target_now = target.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound); // refused: closed at once
                        continue;
                    }
                    let blackhole = blackhole.clone();
                    let delay = delay_ms.clone();
                    let target = *target_now.lock().unwrap();
                    let task = tokio::spawn(async move {
                        // Dropped sockets send RST, not FIN: `reset` means reset.
                        let _ = inbound.set_zero_linger();
                        if let Ok(outbound) = TcpStream::connect(target).await {
                            let _ = outbound.set_zero_linger();
                            let (ri, wi) = inbound.into_split();
                            let (ro, wo) = outbound.into_split();
                            tokio::join!(
                                forward(ri, wo, blackhole.clone(), delay.clone()),
                                forward(ro, wi, blackhole, delay)
                            );
                        }
                    });
                    conns.lock().unwrap().push(task);
                }
            })
        };
        Proxy {
            addr,
            cut,
            blackhole,
            delay_ms,
            conns,
            accept,
            target,
        }
    }

    /// Sends new connections to `to` and resets the current ones (a failover behind one
    /// endpoint: a DNS name, a managed service's address).
    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
        self.reset();
    }

    /// Holds every forwarded chunk for `delay`, both ways (a slow server or link), without
    /// serializing them: chunks in flight overlap, as on a real link.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Resets every proxied connection (RST) and keeps accepting new ones.
    pub fn reset(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops forwarding in both directions, closing nothing: peers see silence, not an error.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Closes every proxied connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Refuses new connections, leaving existing ones alone.
    pub fn refuse_new(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies one direction until EOF; while blackholed, holds whatever it read and waits.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A delay line, not a slow pipe: each chunk is held for the delay from when it was
    // read, so chunks in flight do not add up (a sleep per chunk would cap a connection at
    // one chunk per delay, and a busy one would fall further behind without bound).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if blackhole.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            if tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// The first column of the one row `sql` (no parameters) returns: a version from
/// `... RETURNING version`, a count, a setting.
pub async fn query_value<T: tokio_postgres::types::FromSqlOwned>(
    pg: &tokio_postgres::Client,
    sql: &str,
) -> T {
    pg.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
