//! Test support: a real Postgres and a real Redis started once per test binary on free ports,
//! a database and key prefix per test, syncar instances started in-process, an HTTP client,
//! and a TCP proxy that can cut connections. Nothing here mocks a server.
//!
//! A missing server binary fails the test with the package to install; nothing is skipped.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use syncar::{App, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The servers shared by every test of this binary.
pub struct Servers {
    pub pg_port: u16,
    pub redis_port: u16,
}

static SERVERS: OnceLock<Servers> = OnceLock::new();
/// What to stop when the test binary exits.
static CLEANUP: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

enum Cleanup {
    Postgres {
        bin: PathBuf,
        data: PathBuf,
        root: PathBuf,
    },
    Kill(u32),
}

extern "C" fn stop_servers() {
    let items = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()));
    for item in items {
        match item {
            Cleanup::Postgres { bin, data, root } => {
                let _ = as_postgres(&bin.join("pg_ctl"))
                    .args([
                        "-D",
                        &data.to_string_lossy(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = std::fs::remove_dir_all(root);
            }
            Cleanup::Kill(pid) => unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            },
        }
    }
}

pub fn servers() -> &'static Servers {
    SERVERS.get_or_init(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(stop_servers);
        }
        let pg_port = start_postgres();
        let redis = RedisServer::start();
        let redis_port = redis.port;
        // Shared for the whole run: hand it to the exit hook instead of dropping it.
        CLEANUP.lock().unwrap().push(Cleanup::Kill(
            redis.child.lock().unwrap().as_ref().unwrap().id(),
        ));
        std::mem::forget(redis);
        Servers {
            pg_port,
            redis_port,
        }
    })
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with \
             `apt-get install postgresql`, or set PG_BINDIR"
        )
    })
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Postgres refuses to run as root: run its tools as the `postgres` user then.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start_postgres() -> u16 {
    let bin = pg_bindir();
    let root = tempfile::Builder::new()
        .prefix("syncar-test-pg-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let data = root.join("data");
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&root)
            .status()
            .expect("chown");
        assert!(status.success(), "chown of the test data dir failed");
    }
    let out = as_postgres(&bin.join("initdb"))
        .args([
            "-D",
            &data.to_string_lossy(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for attempt in 0..5 {
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=400",
            root.display()
        );
        let out = as_postgres(&bin.join("pg_ctl"))
            .args(["-D", &data.to_string_lossy(), "-o", &opts, "-l"])
            .arg(root.join("log"))
            .args(["-w", "start"])
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            CLEANUP
                .lock()
                .unwrap()
                .push(Cleanup::Postgres { bin, data, root });
            return port;
        }
        eprintln!("postgres did not start on port {port} (attempt {attempt}); retrying");
    }
    let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
    panic!("postgres would not start:\n{log}");
}

/// A redis-server of its own, stopped on drop; restartable on the same port.
pub struct RedisServer {
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let server = RedisServer {
                port,
                child: Mutex::new(None),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server would not start");
    }

    fn spawn(&self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "redis-server not found ({e}): install it with `apt-get install redis-server`"
                )
            });
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"PING\r\n");
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                    return true;
                }
            }
            if let Some(Ok(Some(_))) = self.child.lock().unwrap().as_mut().map(|c| c.try_wait()) {
                return false; // exited: port taken
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); everything it held is gone.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's share of the servers: its own database and Redis key prefix.
#[derive(Clone)]
pub struct Env {
    pub pg_url: String,
    pub redis_url: String,
    pub prefix: String,
}

impl Env {
    pub async fn new() -> Env {
        let s = servers();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let db = format!("t{}_{n}", std::process::id());
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", s.pg_port);
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
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
            pg_url: format!("postgres://postgres@127.0.0.1:{}/{db}", s.pg_port),
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
        c.log.level = "warn".into();
        c.validate().expect("test config is valid");
        c
    }

    /// Starts an instance with `config()` adjusted by `f`, and waits until it is ready.
    pub async fn start(&self, f: impl FnOnce(&mut Config)) -> Instance {
        let mut config = self.config();
        f(&mut config);
        config.validate().expect("test config is valid");
        syncar::telemetry::init_logging(&config.log);
        let app = App::start(config).await.expect("syncar starts");
        app.ready(Duration::from_secs(20))
            .await
            .expect("syncar becomes ready");
        Instance { app }
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.pg_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    /// The Redis entry syncar keeps for `resource:key`, as `{version}:{kind}:{document}`
    /// (the `at_ms` field dropped).
    pub async fn redis_entry(&self, resource: &str, key: &str) -> Option<String> {
        let mut conn = self.redis().await;
        let raw: Option<String> = redis::cmd("GET")
            .arg(format!("{}{resource}:{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        raw.map(|r| without_at(&r))
    }
}

pub struct Instance {
    pub app: App,
}

impl Instance {
    pub fn addr(&self) -> SocketAddr {
        self.app.addr()
    }

    pub fn state(&self) -> &Arc<syncar::app::AppState> {
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
            .and_then(|e| e.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no numeric ETag in {self:?}"))
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
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
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .unwrap();
    let resp = sender.send_request(req).await.expect("send request");
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

/// A TCP proxy to `target` that can cut every connection and refuse new ones, or stop
/// forwarding without closing anything (a half-open, silently dead connection).
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (cut, conns, blackhole) = (cut.clone(), conns.clone(), blackhole.clone());
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
                    let task = tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(target).await {
                            let (ri, wi) = inbound.into_split();
                            let (ro, wo) = outbound.into_split();
                            tokio::join!(
                                forward(ri, wo, blackhole.clone()),
                                forward(ro, wi, blackhole)
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
            conns,
            accept,
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
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}
