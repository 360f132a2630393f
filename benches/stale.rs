//! Stale-read benchmark: how often, and how late, syncar instances serve a value older than
//! one already acknowledged, per mode and per fault.
//!
//! `make bench-stale` (or `cargo bench --bench stale -- [options]`) starts its own Postgres and
//! Redis, then for each mode (`ttl-only`, `redis-feed-only`, `postgres-feed-only`, `full`
//! (with `feeds.postgres_source = "changes_log"`), `full-notify` (`notify`), `full-wal`
//! (`wal`), `full-wal-sync` (`wal`, the relay named in `synchronous_standby_names`, so a
//! commit returns once every instance applied it, with `feeds.synchronous_writes` so that
//! syncar's own writes wait too) and `full-wal-sync-sql` (the same, with only the plain-SQL
//! writers waiting)) N syncar processes of the release binary, and runs a workload through
//! phases:
//! steady churn, then each fault followed by recovery (Redis pub/sub connections killed,
//! LISTEN backends terminated, Redis restarted, one instance SIGKILLed and restarted, the
//! instance holding the `wal` relay SIGKILLed and restarted (the first instance in modes
//! without a relay), the relay's replication connection terminated (nothing to terminate in
//! the other modes)). It prints a table,
//! writes JSON and two SVG charts under `target/bench-stale/`.
//!
//! A read is stale if a newer version of its key had been acknowledged before the read
//! started; its age is the read's start minus the acknowledgement of the first newer version.
//! Exactly one writer owns each key, so a key's versions are acknowledged in order.
//!
//! Options (defaults in brackets): `--instances 3`, `--keys 300`, `--readers 12`,
//! `--writers 6`, `--writes-per-sec 40` (per writer), `--sql-fraction 0.3`, `--phase-secs 8`,
//! `--settle-secs 2`, `--modes full,ttl-only,...`, `--zipf 1.0`, `--redis single` (or
//! `cluster`, or `single,cluster` for both side by side in one run, each mode on each;
//! `cluster` is a Redis Cluster of three masters with a replica each, `redis.mode = "cluster"`;
//! then `pubsub-kill` kills every subscribed connection on every master, and `redis-restart`
//! SIGKILLs the master serving bucket 0, waits for its replica to take over, and 1 s later
//! starts the node again, to rejoin as a replica), `--baseline PATH` (another syncar binary
//! run in each mode too, just before this one: a before-and-after in one run),
//! `--delay-ms 0` (Postgres and Redis behind delay lines of this many ms each way for the
//! instances and the plain-SQL writers, `common/delay.rs`; one Redis node only).
//! `SYNCAR_BENCH_LOGS=/some/dir` keeps each instance's log there (`bench-{i}.log`);
//! `SYNCAR_BENCH_STALE=1` prints every stale read (key, instance, versions, clock times).

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

#[path = "common/delay.rs"]
#[allow(dead_code)] // the hot benchmark uses more of it
mod delay;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    TtlOnly,
    RedisFeedOnly,
    PostgresFeedOnly,
    Full,
    /// `full` with `feeds.postgres_source = "notify"` instead of `changes_log`.
    FullNotify,
    /// `full` with `feeds.postgres_source = "wal"`: one relay streams the WAL into Redis.
    FullWal,
    /// `full-wal` with the relay named in `synchronous_standby_names`: a commit returns once
    /// every instance has applied it; syncar's own writes ask for it too
    /// (`feeds.synchronous_writes`).
    FullWalSync,
    /// `full-wal-sync` with only the plain-SQL writers waiting: syncar's writes commit as the
    /// session does (what `full-wal-sync` was before it set `synchronous_writes`).
    FullWalSyncSql,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::TtlOnly => "ttl-only",
            Mode::RedisFeedOnly => "redis-feed-only",
            Mode::PostgresFeedOnly => "postgres-feed-only",
            Mode::Full => "full",
            Mode::FullNotify => "full-notify",
            Mode::FullWal => "full-wal",
            Mode::FullWalSync => "full-wal-sync",
            Mode::FullWalSyncSql => "full-wal-sync-sql",
        }
    }

    fn feeds(self) -> (bool, bool) {
        match self {
            Mode::TtlOnly => (false, false),
            Mode::RedisFeedOnly => (false, true),
            Mode::PostgresFeedOnly => (true, false),
            Mode::Full
            | Mode::FullNotify
            | Mode::FullWal
            | Mode::FullWalSync
            | Mode::FullWalSyncSql => (true, true),
        }
    }

    fn postgres_source(self) -> &'static str {
        match self {
            Mode::FullNotify => "notify",
            Mode::FullWal | Mode::FullWalSync | Mode::FullWalSyncSql => "wal",
            _ => "changes_log",
        }
    }

    /// Whether the relay is named in `synchronous_standby_names` for the mode's run.
    fn synchronous(self) -> bool {
        matches!(self, Mode::FullWalSync | Mode::FullWalSyncSql)
    }

    fn parse(s: &str) -> Mode {
        match s {
            "ttl-only" => Mode::TtlOnly,
            "redis-feed-only" => Mode::RedisFeedOnly,
            "postgres-feed-only" => Mode::PostgresFeedOnly,
            "full" => Mode::Full,
            "full-notify" => Mode::FullNotify,
            "full-wal" => Mode::FullWal,
            "full-wal-sync" => Mode::FullWalSync,
            "full-wal-sync-sql" => Mode::FullWalSyncSql,
            other => panic!("unknown mode {other:?}"),
        }
    }
}

const PHASES: [&str; 7] = [
    "steady",
    "pubsub-kill",
    "listen-kill",
    "redis-restart",
    "instance-kill",
    "relay-kill",
    "replication-kill",
];

/// Phases in which a fault strikes; the others are steady churn.
fn is_fault(phase: &str) -> bool {
    phase != "steady"
}

#[derive(Clone, Debug)]
struct Args {
    instances: usize,
    keys: usize,
    readers: usize,
    writers: usize,
    writes_per_sec: f64,
    sql_fraction: f64,
    phase: Duration,
    settle: Duration,
    modes: Vec<Mode>,
    zipf: f64,
    /// `--redis`: one node (`false`), a Redis Cluster (`true`), or both in turn.
    redis: Vec<bool>,
    /// `--baseline PATH`: another syncar binary (say, the release build of the commit before
    /// a change) run in each mode too, just before this one, for a before-and-after in one
    /// run; its rows are labelled `mode@baseline`.
    baseline: Option<PathBuf>,
    /// `--delay-ms`: Postgres and Redis behind delay lines of this many ms each way, for
    /// the instances and the plain-SQL writers (0: none). One Redis node only.
    delay_ms: f64,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            instances: 3,
            keys: 300,
            readers: 12,
            writers: 6,
            writes_per_sec: 40.0,
            sql_fraction: 0.3,
            phase: Duration::from_secs(8),
            settle: Duration::from_secs(2),
            modes: vec![
                Mode::TtlOnly,
                Mode::RedisFeedOnly,
                Mode::PostgresFeedOnly,
                Mode::Full,
                Mode::FullNotify,
                Mode::FullWal,
            ],
            zipf: 1.0,
            redis: vec![false],
            baseline: None,
            delay_ms: 0.0,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue; // added by `cargo bench`
            }
            let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--instances" => a.instances = value().parse().unwrap(),
                "--keys" => a.keys = value().parse().unwrap(),
                "--readers" => a.readers = value().parse().unwrap(),
                "--writers" => a.writers = value().parse().unwrap(),
                "--writes-per-sec" => a.writes_per_sec = value().parse().unwrap(),
                "--sql-fraction" => a.sql_fraction = value().parse().unwrap(),
                "--phase-secs" => a.phase = Duration::from_secs_f64(value().parse().unwrap()),
                "--settle-secs" => a.settle = Duration::from_secs_f64(value().parse().unwrap()),
                "--modes" => a.modes = value().split(',').map(Mode::parse).collect(),
                "--zipf" => a.zipf = value().parse().unwrap(),
                "--redis" => {
                    a.redis = value()
                        .split(',')
                        .map(|kind| match kind {
                            "single" => false,
                            "cluster" => true,
                            other => panic!("--redis takes single and cluster, not {other:?}"),
                        })
                        .collect();
                }
                "--delay-ms" => a.delay_ms = value().parse().unwrap(),
                "--baseline" => {
                    let path = PathBuf::from(value());
                    assert!(path.is_file(), "--baseline: no syncar binary at {path:?}");
                    a.baseline = Some(path);
                }
                other => panic!("unknown option {other}"),
            }
        }
        assert!(a.instances >= 2 && a.writers >= 1 && a.keys >= a.writers);
        assert!(
            a.delay_ms == 0.0 || a.redis == [false],
            "--delay-ms puts one Redis node behind a delay line: use --redis single"
        );
        a
    }
}

/// Monotonic nanoseconds since the benchmark started.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

#[derive(Clone, Copy)]
struct ReadRec {
    key: u32,
    start: u64,
    end: u64,
    version: i64,
    l1: bool,
    /// The instance that answered (its index).
    instance: u8,
}

#[derive(Clone, Copy)]
struct WriteRec {
    key: u32,
    version: i64,
    ack: u64,
    /// A plain-SQL write's commit, in µs (the UPDATE in autocommit, as the writer waits).
    sql_us: Option<u64>,
}

/// Zipf-like popularity: key i is drawn with weight 1/(i+1)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for i in 0..n {
            total += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self) -> usize {
        let u = fastrand::f64();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// One keep-alive HTTP/1.1 connection to an instance, reopened after errors.
struct Conn {
    port: u16,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

struct Answer {
    status: u16,
    version: Option<i64>,
    l1: bool,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn { port, sender: None }
    }

    async fn call(&mut self, method: &str, path: &str, body: Option<Bytes>) -> Result<Answer, ()> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|_| ())?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| ())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().unwrap();
        if sender.ready().await.is_err() {
            self.sender = None;
            return Err(());
        }
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(body.unwrap_or_default()))
            .unwrap();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                self.sender = None;
                return Err(());
            }
        };
        let status = resp.status().as_u16();
        let version = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // `"42"`, or `"42-7"` once the table changed shape.
                let v = v.trim_matches('"');
                v.split_once('-').map_or(v, |(v, _)| v).parse().ok()
            });
        let l1 = resp.headers().get("x-cache").is_some_and(|v| v == "l1");
        if resp.into_body().collect().await.is_err() {
            self.sender = None;
            return Err(());
        }
        Ok(Answer {
            status,
            version,
            l1,
        })
    }
}

/// The Redis the benchmark runs against.
enum Redis {
    Single(servers::RedisServer),
    Cluster(servers::RedisCluster),
}

impl Redis {
    fn url(&self) -> String {
        match self {
            Redis::Single(r) => r.url(),
            Redis::Cluster(c) => c.url(),
        }
    }

    /// The `[redis]` settings besides the URL and prefix.
    fn settings(&self) -> String {
        match self {
            Redis::Single(_) => String::new(),
            Redis::Cluster(c) => format!("mode = \"cluster\"\nnodes = {:?}\n", c.seeds()),
        }
    }

    /// The ports of the nodes that serve slots now.
    fn masters(&self) -> Vec<u16> {
        match self {
            Redis::Single(r) => vec![r.port],
            Redis::Cluster(c) => c.masters(),
        }
    }
}

/// The servers and syncar processes of one mode.
struct Cluster {
    bin: PathBuf,
    config: PathBuf,
    pg_url: String,
    redis: Arc<Redis>,
    /// The Redis URL instances use, when not Redis' own (a delay line in front of it).
    redis_url: Option<String>,
    ports: Vec<u16>,
    children: Mutex<Vec<Option<Child>>>,
}

/// Where instance `i` logs: nowhere, unless `SYNCAR_BENCH_LOGS` names a directory (then
/// `bench-{i}.log` there, appended to across restarts and modes, at `SYNCAR_LOG`'s level).
fn bench_log(i: usize) -> Stdio {
    match std::env::var("SYNCAR_BENCH_LOGS") {
        Ok(dir) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/bench-{i}.log"))
            .map_or_else(|_| Stdio::null(), Stdio::from),
        Err(_) => Stdio::null(),
    }
}

impl Cluster {
    fn spawn(&self, i: usize) -> Child {
        Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("SYNCAR_LISTEN", format!("127.0.0.1:{}", self.ports[i]))
            .env("SYNCAR_POSTGRES_URL", &self.pg_url)
            .env(
                "SYNCAR_REDIS_URL",
                self.redis_url.clone().unwrap_or_else(|| self.redis.url()),
            )
            .env("SYNCAR_INSTANCE", format!("bench-{i}"))
            .stdout(Stdio::null())
            .stderr(bench_log(i))
            .spawn()
            .expect("start syncar")
    }

    /// Until `/readyz` says ready with L1 in use (every enabled feed up).
    async fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = readyz(self.ports[i]).await {
                if r["ready"] == true && r["l1_in_use"] == true {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "instance {i} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&self, i: usize) {
        if let Some(mut child) = self.children.lock().unwrap()[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_all(&self) {
        for child in self.children.lock().unwrap().iter_mut().flatten() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        for child in self.children.lock().unwrap().iter_mut() {
            if let Some(mut c) = child.take() {
                let _ = c.wait();
            }
        }
    }
}

/// `/readyz` as JSON, on a connection of its own.
async fn readyz(port: u16) -> Option<Value> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/readyz")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

struct ModeResult {
    mode: Mode,
    /// Plain-SQL commits: p50 and p99 in ms, and how many.
    sql_commit_ms: (f64, f64, usize),
    /// The mode's name, and with `--redis single,cluster` which Redis (`full@cluster`).
    label: String,
    phases: Vec<Value>,
    audit_stale_keys: usize,
    audit_checked: usize,
    ages_ms: Vec<f64>,
    coherence: Value,
    coherence_cdf: Vec<(f64, f64)>,
}

#[tokio::main]
async fn main() {
    delay::serve_if_asked();
    let args = Args::parse();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_syncar"));
    let servers = servers::servers();
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench-stale");
    std::fs::create_dir_all(&out).unwrap();
    eprintln!(
        "stale-read benchmark: {} instances, {} keys, {} readers, {} writers x {}/s, {:.0}% SQL, phases of {:?}",
        args.instances,
        args.keys,
        args.readers,
        args.writers,
        args.writes_per_sec,
        args.sql_fraction * 100.0,
        args.phase
    );
    let mut results = Vec::new();
    for &cluster in &args.redis {
        let redis = Arc::new(if cluster {
            Redis::Cluster(servers::RedisCluster::start())
        } else {
            Redis::Single(servers::RedisServer::start())
        });
        let bins: Vec<(&std::path::Path, bool)> = args
            .baseline
            .iter()
            .map(|b| (b.as_path(), true))
            .chain([(bin.as_path(), false)])
            .collect();
        for mode in &args.modes {
            for &(bin, baseline) in &bins {
                let n = results.len();
                let mut result =
                    run_mode(&args, *mode, n, bin, servers.pg_port, &redis, &out).await;
                if args.redis.len() > 1 {
                    result.label = format!(
                        "{}@{}",
                        mode.name(),
                        if cluster { "cluster" } else { "single" }
                    );
                }
                if baseline {
                    result.label = format!("{}@baseline", result.label);
                }
                results.push(result);
            }
        }
    }
    report(&args, &results, &out);
}

async fn run_mode(
    args: &Args,
    mode: Mode,
    n: usize,
    bin: &std::path::Path,
    pg_port: u16,
    redis: &Arc<Redis>,
    out: &std::path::Path,
) -> ModeResult {
    let db = format!("bench_{}_{n}", std::process::id());
    let admin = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    // Postgres' default commit durability, whatever the shared test server says: with
    // synchronous_commit = off the WAL reaches the relay only when the WAL writer flushes.
    client
        .batch_execute(&format!("ALTER DATABASE {db} SET synchronous_commit = on"))
        .await
        .unwrap();
    // With --delay-ms, everyone but the benchmark's own fault injection reaches Postgres and
    // Redis across delay lines, held until the mode ends.
    let lines = (args.delay_ms > 0.0).then(|| {
        let one_way = Duration::from_secs_f64(args.delay_ms / 1000.0);
        let redis_port = redis.masters()[0];
        (
            delay::DelayLine::spawn(pg_port, one_way, servers::free_port()),
            delay::DelayLine::spawn(redis_port, one_way, servers::free_port()),
        )
    });
    let pg_url = format!(
        "postgres://postgres@127.0.0.1:{}/{db}",
        lines.as_ref().map_or(pg_port, |(pg, _)| pg.port)
    );
    let (pg_feed, redis_feed) = mode.feeds();
    let config = out.join(format!("{}.toml", mode.name()));
    std::fs::write(
        &config,
        format!(
            "[postgres]\npool_size = 8\n[redis]\nkey_prefix = \"{db}:\"\n{redis}\
             [feeds]\npostgres = {pg_feed}\nredis = {redis_feed}\npostgres_source = \"{source}\"\n\
             synchronous_writes = {sync}\n[log]\nlevel = \"warn\"\n",
            source = mode.postgres_source(),
            // The mode is for writers that ask: syncar's own writes ask too.
            sync = mode == Mode::FullWalSync,
            redis = redis.settings(),
        ),
    )
    .unwrap();
    let ports: Vec<u16> = (0..args.instances).map(|_| servers::free_port()).collect();
    let cluster = Arc::new(Cluster {
        bin: bin.to_path_buf(),
        config,
        pg_url: pg_url.clone(),
        redis: redis.clone(),
        redis_url: lines
            .as_ref()
            .map(|(_, r)| format!("redis://127.0.0.1:{}", r.port)),
        ports,
        children: Mutex::new(Vec::new()),
    });
    let children: Vec<Option<Child>> = (0..args.instances)
        .map(|i| Some(cluster.spawn(i)))
        .collect();
    *cluster.children.lock().unwrap() = children;
    for i in 0..args.instances {
        cluster.wait_ready(i).await;
    }
    if mode.synchronous() {
        synchronous_relay(&client, &cluster.ports, true).await;
    }
    let clock = Clock(Instant::now());
    if std::env::var_os("SYNCAR_BENCH_STALE").is_some() {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!("clock origin: {} ms since the Unix epoch", unix.as_millis());
    }
    let keys: Vec<String> = (0..args.keys).map(|i| format!("k{i}")).collect();

    // Seed every key through instance 0.
    let mut writes: Vec<WriteRec> = Vec::new();
    let mut seed = Conn::new(cluster.ports[0]);
    for (i, key) in keys.iter().enumerate() {
        let a = seed
            .call("PUT", &format!("/v1/kv/{key}"), Some(Bytes::from("0")))
            .await
            .expect("seed");
        writes.push(WriteRec {
            key: i as u32,
            version: a.version.unwrap(),
            ack: clock.ns(),
            sql_us: None,
        });
    }

    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let write_errors = Arc::new(AtomicU64::new(0));
    let read_errors = Arc::new(Mutex::new(Vec::<u64>::new()));
    let zipf = Arc::new(Zipf::new(args.keys, args.zipf));

    let mut writer_tasks = Vec::new();
    for w in 0..args.writers {
        let owned: Vec<usize> = (0..args.keys).filter(|k| k % args.writers == w).collect();
        let (cluster, keys, stop, errors) = (
            cluster.clone(),
            keys.clone(),
            stop_writers.clone(),
            write_errors.clone(),
        );
        let (pg_url, args) = (pg_url.clone(), args.clone());
        writer_tasks.push(tokio::spawn(async move {
            let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let update = pg
                .prepare(
                    "UPDATE syncar_kv SET value = $2::text::jsonb WHERE key = $1 RETURNING version",
                )
                .await
                .unwrap();
            let mut conns: Vec<Conn> = cluster.ports.iter().map(|p| Conn::new(*p)).collect();
            let mut recs = Vec::new();
            let pause = Duration::from_secs_f64(1.0 / args.writes_per_sec);
            let mut counter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = owned[fastrand::usize(..owned.len())];
                counter += 1;
                let value = format!("{{\"w\":{w},\"n\":{counter}}}");
                let mut sql_us = None;
                let version = if fastrand::f64() < args.sql_fraction {
                    let started = Instant::now();
                    let version = pg
                        .query_one(&update, &[&keys[k], &value])
                        .await
                        .ok()
                        .map(|r| r.get::<_, i64>(0));
                    sql_us = Some(started.elapsed().as_micros() as u64);
                    version
                } else {
                    let i = fastrand::usize(..conns.len());
                    match conns[i]
                        .call(
                            "PUT",
                            &format!("/v1/kv/{}", keys[k]),
                            Some(Bytes::from(value)),
                        )
                        .await
                    {
                        Ok(a) if a.status == 200 || a.status == 201 => a.version,
                        _ => None,
                    }
                };
                match version {
                    Some(version) => recs.push(WriteRec {
                        key: k as u32,
                        version,
                        ack: clock.ns(),
                        sql_us,
                    }),
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(pause).await;
            }
            recs
        }));
    }

    let mut reader_tasks = Vec::new();
    for _ in 0..args.readers {
        let (cluster, keys, stop, zipf, errors) = (
            cluster.clone(),
            keys.clone(),
            stop_readers.clone(),
            zipf.clone(),
            read_errors.clone(),
        );
        reader_tasks.push(tokio::spawn(async move {
            let mut conns: Vec<Conn> = cluster.ports.iter().map(|p| Conn::new(*p)).collect();
            let mut recs = Vec::new();
            let mut errs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let k = zipf.sample();
                let i = fastrand::usize(..conns.len());
                let start = clock.ns();
                match conns[i]
                    .call("GET", &format!("/v1/kv/{}", keys[k]), None)
                    .await
                {
                    Ok(a) if a.status == 200 => recs.push(ReadRec {
                        key: k as u32,
                        start,
                        end: clock.ns(),
                        version: a.version.unwrap_or(0),
                        l1: a.l1,
                        instance: i as u8,
                    }),
                    _ => {
                        errs.push(start);
                        // A dead instance answers at once: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            errors.lock().unwrap().extend(errs);
            recs
        }));
    }

    // Phases: the fault at the start of each, then the workload goes on through recovery.
    let mut boundaries = Vec::new();
    for phase in PHASES {
        boundaries.push(clock.ns());
        eprintln!("[{}] phase {phase}", mode.name());
        fault(phase, &cluster, &pg_url).await;
        tokio::time::sleep(args.phase).await;
    }
    boundaries.push(clock.ns());

    stop_writers.store(true, Ordering::Relaxed);
    for t in writer_tasks {
        writes.extend(t.await.unwrap());
    }
    let writes_end = clock.ns();
    stop_readers.store(true, Ordering::Relaxed);
    let mut reads = Vec::new();
    for t in reader_tasks {
        reads.extend(t.await.unwrap());
    }
    let read_errors = std::mem::take(&mut *read_errors.lock().unwrap());

    tokio::time::sleep(args.settle).await;
    let (audit_stale_keys, audit_checked) = audit(&cluster, &pg_url).await;
    if let Some((pg, redis)) = &lines {
        eprintln!(
            "[{}] the delay lines used {:.1} s of CPU (Postgres {:.1}, Redis {:.1})",
            mode.name(),
            pg.cpu_secs() + redis.cpu_secs(),
            pg.cpu_secs(),
            redis.cpu_secs()
        );
    }
    let coherence_raw = scrape_delays(&cluster).await;
    if mode.synchronous() {
        // Before the relay goes: commits of the next mode must not wait for it.
        synchronous_relay(&client, &cluster.ports, false).await;
    }
    cluster.stop_all();
    // Plain-SQL commits as their writers waited for them (through the faults too).
    let mut sql_us: Vec<u64> = writes.iter().filter_map(|w| w.sql_us).collect();
    sql_us.sort_unstable();
    let at = |q: f64| {
        sql_us
            .get(((sql_us.len() as f64 * q) as usize).min(sql_us.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    let sql_commit_ms = (at(0.5), at(0.99), sql_us.len());

    let (phases, ages_ms) = analyse(
        &reads,
        &writes,
        &read_errors,
        &boundaries,
        writes_end,
        write_errors.load(Ordering::Relaxed),
    );
    let (coherence, coherence_cdf) = summarise_delays(&coherence_raw);
    ModeResult {
        mode,
        label: mode.name().to_string(),
        sql_commit_ms,
        phases,
        audit_stale_keys,
        audit_checked,
        ages_ms,
        coherence,
        coherence_cdf,
    }
}

/// Names the relay in `synchronous_standby_names` (or clears it) and waits until Postgres
/// counts it as synchronous (or no longer), and every instance has heard so from the relay.
async fn synchronous_relay(admin: &tokio_postgres::Client, ports: &[u16], on: bool) {
    let set = if on {
        "ALTER SYSTEM SET synchronous_standby_names = '\"syncar-relay\"'"
    } else {
        "ALTER SYSTEM RESET synchronous_standby_names"
    };
    admin.batch_execute(set).await.unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sync: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if (sync > 0) == on {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The relay notices within relay_lease / 4, the instances at its next heartbeat.
    for &port in ports {
        loop {
            let heard = readyz(port)
                .await
                .is_some_and(|r| r["feeds"]["postgres"]["relay"]["sync"].as_bool() == Some(on));
            if heard {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance on {port} never heard it"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn fault(phase: &str, cluster: &Arc<Cluster>, pg_url: &str) {
    match phase {
        "steady" => {}
        "pubsub-kill" => {
            // Every connection holding a subscription (RESP3 ones, as the sharded
            // subscriptions are, are not of `TYPE pubsub`), on every node serving slots.
            for port in cluster.redis.masters() {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let list: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for client in list.lines() {
                    let field = |name: &str| {
                        client
                            .split(' ')
                            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                            .unwrap_or("0")
                    };
                    if field("sub") != "0" || field("ssub") != "0" {
                        let _: Result<i64, _> = redis::cmd("CLIENT")
                            .arg(&["KILL", "ID", field("id")])
                            .query_async(&mut conn)
                            .await;
                    }
                }
            }
        }
        "listen-kill" => {
            terminate(pg_url, "application_name = 'syncar-listen'").await;
        }
        "redis-restart" => {
            let redis = cluster.redis.clone();
            tokio::task::spawn_blocking(move || match &*redis {
                Redis::Single(r) => {
                    r.kill();
                    std::thread::sleep(Duration::from_secs(1));
                    r.restart();
                }
                // The master of bucket 0: restarted once its replica has taken over (an
                // empty node restarted sooner would take its slots back, empty).
                Redis::Cluster(c) => {
                    let slot = syncar::l2::hash_slot(b"{0}");
                    let old = c.master_of(slot).expect("a master");
                    c.node(old).kill();
                    let deadline = Instant::now() + Duration::from_secs(15);
                    while c.master_of(slot) == Some(old) || c.master_of(slot).is_none() {
                        assert!(Instant::now() < deadline, "no replica took over");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    eprintln!("a replica took over bucket 0's slot");
                    std::thread::sleep(Duration::from_secs(1));
                    c.node(old).restart();
                }
            })
            .await
            .unwrap();
        }
        "instance-kill" => {
            let last = cluster.ports.len() - 1;
            cluster.kill(last);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let child = cluster.spawn(last);
            cluster.children.lock().unwrap()[last] = Some(child);
        }
        "relay-kill" => {
            // The instance holding the relay (instance ids are `bench-{i}-{random}`), or the
            // first one where there is no relay.
            let relay = readyz(cluster.ports[0]).await.and_then(|r| {
                r["feeds"]["postgres"]["relay"]["relay"]
                    .as_str()
                    .and_then(|id| id.strip_prefix("bench-")?.split('-').next()?.parse().ok())
            });
            let victim: usize = relay.unwrap_or(0);
            eprintln!("killing instance {victim} (relay: {})", relay.is_some());
            cluster.kill(victim);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let child = cluster.spawn(victim);
            cluster.children.lock().unwrap()[victim] = Some(child);
        }
        "replication-kill" => {
            terminate(
                pg_url,
                "backend_type = 'walsender' AND application_name = 'syncar-relay'",
            )
            .await;
        }
        other => unreachable!("{other}"),
    }
}

/// Every key on every instance against Postgres: how many keys some instance serves stale.
/// Terminates this database's backends that match `filter`, a condition on
/// `pg_stat_activity` (a constant of this bench, not input).
async fn terminate(pg_url: &str, filter: &str) {
    let (pg, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.execute(
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND {filter}"
        ),
        &[],
    )
    .await
    .unwrap();
}

async fn audit(cluster: &Arc<Cluster>, pg_url: &str) -> (usize, usize) {
    for i in 0..cluster.ports.len() {
        cluster.wait_ready(i).await;
    }
    let (pg, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let truth: HashMap<String, i64> = pg
        .query("SELECT key, version FROM syncar_kv", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut stale = std::collections::HashSet::new();
    let mut checked = 0;
    for port in &cluster.ports {
        let mut conn = Conn::new(*port);
        for (key, version) in &truth {
            checked += 1;
            let a = conn.call("GET", &format!("/v1/kv/{key}"), None).await;
            if a.ok().and_then(|a| a.version) != Some(*version) {
                stale.insert(key.clone());
            }
        }
    }
    (stale.len(), checked)
}

/// `syncar_invalidation_delay_seconds` buckets summed over instances and feeds.
async fn scrape_delays(cluster: &Arc<Cluster>) -> Vec<(f64, u64)> {
    let mut buckets: HashMap<String, u64> = HashMap::new();
    for port in &cluster.ports {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", *port)).await else {
            continue;
        };
        let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await else {
            continue;
        };
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/metrics")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let Ok(resp) = sender.send_request(req).await else {
            continue;
        };
        let text = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
            .to_string();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("syncar_invalidation_delay_seconds_bucket{") {
                let le = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next());
                let count = line.rsplit(' ').next().and_then(|c| c.parse::<u64>().ok());
                if let (Some(le), Some(count)) = (le, count) {
                    *buckets.entry(le.to_string()).or_default() += count;
                }
            }
        }
    }
    let mut out: Vec<(f64, u64)> = buckets
        .into_iter()
        .map(|(le, c)| {
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                c,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    out
}

/// p50, p99 and max (as bucket upper bounds) of cumulative buckets, plus the CDF.
fn summarise_delays(buckets: &[(f64, u64)]) -> (Value, Vec<(f64, f64)>) {
    let total = buckets.last().map_or(0, |b| b.1);
    if total == 0 {
        return (json!({"count": 0}), Vec::new());
    }
    let quantile = |q: f64| {
        let target = (q * total as f64).ceil() as u64;
        buckets
            .iter()
            .find(|(_, c)| *c >= target)
            .map(|(le, _)| *le)
            .unwrap_or(f64::INFINITY)
    };
    let cdf = buckets
        .iter()
        .filter(|(le, _)| le.is_finite())
        .map(|(le, c)| (le * 1000.0, *c as f64 / total as f64))
        .collect();
    let ms = |s: f64| {
        if s.is_finite() {
            json!(s * 1000.0)
        } else {
            json!(">10000")
        }
    };
    (
        json!({
            "count": total,
            "p50_ms_at_most": ms(quantile(0.5)),
            "p99_ms_at_most": ms(quantile(0.99)),
            "max_ms_at_most": ms(quantile(1.0)),
        }),
        cdf,
    )
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1);
    sorted[i]
}

/// Per phase: rates, staleness, latency, throughput. Returns also every stale read's age.
fn analyse(
    reads: &[ReadRec],
    writes: &[WriteRec],
    read_errors: &[u64],
    boundaries: &[u64],
    writes_end: u64,
    write_errors: u64,
) -> (Vec<Value>, Vec<f64>) {
    // A key's writes in version order (= acknowledgement order: one writer per key).
    let mut by_key: HashMap<u32, Vec<WriteRec>> = HashMap::new();
    for w in writes {
        by_key.entry(w.key).or_default().push(*w);
    }
    for v in by_key.values_mut() {
        v.sort_by_key(|w| w.version);
    }
    let print_stale = std::env::var_os("SYNCAR_BENCH_STALE").is_some();
    let mut all_ages = Vec::new();
    let mut phases = Vec::new();
    for (p, name) in PHASES.iter().enumerate() {
        let (from, to) = (boundaries[p], boundaries[p + 1]);
        let secs = (to - from) as f64 / 1e9;
        let in_phase: Vec<&ReadRec> = reads
            .iter()
            .filter(|r| r.start >= from && r.start < to)
            .collect();
        let mut ages = Vec::new();
        // Stale reads whose first newer write was plain SQL (the rest: writes through syncar).
        let mut after_sql = 0usize;
        let mut latencies: Vec<f64> = Vec::new();
        let mut l1 = 0usize;
        for r in &in_phase {
            latencies.push((r.end - r.start) as f64 / 1e6);
            l1 += r.l1 as usize;
            let Some(ws) = by_key.get(&r.key) else {
                continue;
            };
            // The first write newer than what was read, if acknowledged before the read began.
            let first_newer = ws.partition_point(|w| w.version <= r.version);
            if let Some(w) = ws.get(first_newer) {
                if w.ack < r.start {
                    ages.push((r.start - w.ack) as f64 / 1e6);
                    after_sql += w.sql_us.is_some() as usize;
                    if print_stale {
                        eprintln!(
                            "stale read: phase {name}, key {}, instance {}, read {} ({}) at \
                             {} ns, {} acknowledged at {} ns ({})",
                            r.key,
                            r.instance,
                            r.version,
                            if r.l1 { "L1" } else { "below L1" },
                            r.start,
                            w.version,
                            w.ack,
                            if w.sql_us.is_some() {
                                "plain SQL"
                            } else {
                                "through syncar"
                            },
                        );
                    }
                }
            }
        }
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        ages.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = in_phase.len().max(1) as f64;
        let over = |ms: f64| ages.iter().filter(|a| **a > ms).count() as f64 / n;
        let writes_in_phase = writes
            .iter()
            .filter(|w| w.ack >= from && w.ack < to.min(writes_end))
            .count();
        let mut sql_ms: Vec<f64> = writes
            .iter()
            .filter(|w| w.ack >= from && w.ack < to.min(writes_end))
            .filter_map(|w| w.sql_us.map(|us| us as f64 / 1000.0))
            .collect();
        sql_ms.sort_by(f64::total_cmp);
        phases.push(json!({
            "phase": name,
            "reads": in_phase.len(),
            "read_errors": read_errors.iter().filter(|s| **s >= from && **s < to).count(),
            "reads_per_sec": in_phase.len() as f64 / secs,
            "writes_per_sec": writes_in_phase as f64 / secs,
            "stale": ages.len(),
            "stale_after_sql": after_sql,
            "sql_commit_p50_ms": percentile(&sql_ms, 0.5),
            "sql_commit_p99_ms": percentile(&sql_ms, 0.99),
            "stale_rate": ages.len() as f64 / n,
            "stale_over_1ms": over(1.0),
            "stale_over_10ms": over(10.0),
            "stale_over_100ms": over(100.0),
            "stale_over_1s": over(1000.0),
            "stale_reads_over_1s": ages.iter().filter(|a| **a > 1000.0).count(),
            "age_p50_ms": percentile(&ages, 0.5),
            "age_p99_ms": percentile(&ages, 0.99),
            "age_max_ms": ages.last().copied().unwrap_or(0.0),
            "latency_p50_ms": percentile(&latencies, 0.5),
            "latency_p99_ms": percentile(&latencies, 0.99),
            "l1_hit_ratio": l1 as f64 / n,
        }));
        all_ages.extend(ages);
    }
    if let Some(first) = phases.first_mut() {
        first["write_errors_total"] = json!(write_errors);
    }
    all_ages.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (phases, all_ages)
}

fn report(args: &Args, results: &[ModeResult], out: &std::path::Path) {
    println!();
    println!(
        "{:<19} {:<14} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>7} {:>7} {:>6}",
        "mode",
        "phase",
        "reads/s",
        "wr/s",
        "stale%",
        ">10ms%",
        ">100ms%",
        ">1s%",
        ">1s n",
        "age p99",
        "age max",
        "lat p50",
        "lat p99",
        "L1%"
    );
    for r in results {
        for p in &r.phases {
            let pct = |k: &str| p[k].as_f64().unwrap() * 100.0;
            println!(
                "{:<19} {:<14} {:>7.0} {:>6.0} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>7.1}ms {:>7.1}ms {:>5.2}ms {:>5.2}ms {:>6.1}",
                r.label,
                p["phase"].as_str().unwrap(),
                p["reads_per_sec"].as_f64().unwrap(),
                p["writes_per_sec"].as_f64().unwrap(),
                pct("stale_rate"),
                pct("stale_over_10ms"),
                pct("stale_over_100ms"),
                pct("stale_over_1s"),
                p["stale_reads_over_1s"],
                p["age_p99_ms"].as_f64().unwrap(),
                p["age_max_ms"].as_f64().unwrap(),
                p["latency_p50_ms"].as_f64().unwrap(),
                p["latency_p99_ms"].as_f64().unwrap(),
                pct("l1_hit_ratio"),
            );
        }
        println!(
            "{:<19} final audit: {} key copies checked (keys x instances), {} keys stale; commit-to-eviction {}",
            r.label,
            r.audit_checked,
            r.audit_stale_keys,
            r.coherence
        );
        println!(
            "{:<19} plain-SQL commits as their writers waited: p50 {:.2} ms, p99 {:.2} ms ({} commits)",
            r.label, r.sql_commit_ms.0, r.sql_commit_ms.1, r.sql_commit_ms.2
        );
        if let Some(steady) = r.phases.first() {
            println!(
                "{:<19} plain-SQL commits in the steady phase: p50 {:.2} ms, p99 {:.2} ms",
                r.label,
                steady["sql_commit_p50_ms"].as_f64().unwrap_or(0.0),
                steady["sql_commit_p99_ms"].as_f64().unwrap_or(0.0)
            );
        }
        let sum = |field: &str| -> u64 { r.phases.iter().filter_map(|p| p[field].as_u64()).sum() };
        println!(
            "{:<19} stale reads, all phases: {} after a plain-SQL write, {} after a write through syncar",
            r.label,
            sum("stale_after_sql"),
            sum("stale") - sum("stale_after_sql")
        );
    }
    let json = json!({
        "args": format!("{args:?}"),
        "modes": results.iter().map(|r| json!({
            "mode": r.label,
            "phases": r.phases,
            "audit": {"keys_stale": r.audit_stale_keys, "copies_checked": r.audit_checked},
            "commit_to_eviction": r.coherence,
            "sql_commit_ms": {"p50": r.sql_commit_ms.0, "p99": r.sql_commit_ms.1, "n": r.sql_commit_ms.2},
        })).collect::<Vec<_>>(),
    });
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    chart_staleness(results, &out.join("staleness.svg"));
    chart_coherence(results, &out.join("coherence.svg"));
    println!(
        "\nwrote {}, {} and {}",
        path.display(),
        out.join("staleness.svg").display(),
        out.join("coherence.svg").display()
    );
    let stale_rate = |r: &ModeResult| {
        let (stale, reads) = r.phases.iter().fold((0.0, 0.0), |(s, n), p| {
            let reads = p["reads"].as_f64().unwrap();
            (s + p["stale_rate"].as_f64().unwrap() * reads, n + reads)
        });
        stale / reads.max(1.0)
    };
    let notify = results.iter().find(|r| r.mode == Mode::FullNotify);
    for r in results.iter().filter(|r| r.mode == Mode::FullWal) {
        let steady_over_100ms: u64 = r
            .phases
            .iter()
            .filter(|p| !is_fault(p["phase"].as_str().unwrap()))
            .map(|p| {
                (p["stale_over_100ms"].as_f64().unwrap() * p["reads"].as_f64().unwrap()).round()
                    as u64
            })
            .sum();
        let over_1s: u64 = r
            .phases
            .iter()
            .map(|p| p["stale_reads_over_1s"].as_u64().unwrap())
            .sum();
        let rate = stale_rate(r);
        let notify_rate = notify.map(stale_rate);
        let met = r.audit_stale_keys == 0
            && over_1s == 0
            && steady_over_100ms == 0
            && notify_rate.is_none_or(|n| rate <= n);
        println!(
            "goal ({}): stale-read rate {:.4}% (full-notify {}), reads stale > 100 ms outside faults = {steady_over_100ms} (want 0), > 1 s = {over_1s} (want 0), keys stale at the audit = {} (want 0): {}",
            r.label,
            rate * 100.0,
            notify_rate.map_or("not run".into(), |n| format!("{:.4}%", n * 100.0)),
            r.audit_stale_keys,
            if met { "MET" } else { "NOT MET" }
        );
    }
    for r in results
        .iter()
        .filter(|r| matches!(r.mode, Mode::Full | Mode::FullNotify))
    {
        let over_1s: u64 = r
            .phases
            .iter()
            .map(|p| p["stale_reads_over_1s"].as_u64().unwrap())
            .sum();
        println!(
            "goal ({}): keys stale at the audit = {} (want 0), reads stale by more than 1 s = {} (want 0): {}",
            r.label,
            r.audit_stale_keys,
            over_1s,
            if r.audit_stale_keys == 0 && over_1s == 0 { "MET" } else { "NOT MET" }
        );
    }
}

const COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(200, 60, 60),
    plotters::style::RGBColor(230, 150, 30),
    plotters::style::RGBColor(60, 120, 200),
    plotters::style::RGBColor(40, 150, 70),
    plotters::style::RGBColor(130, 70, 170),
    plotters::style::RGBColor(20, 20, 20),
];

/// CDF of staleness age among stale reads, per mode.
fn chart_staleness(results: &[ModeResult], path: &std::path::Path) {
    let series = results
        .iter()
        .map(|r| {
            let n = r.ages_ms.len();
            let step = (n / 400).max(1);
            let points = r
                .ages_ms
                .iter()
                .enumerate()
                .filter(|(j, _)| j % step == 0 || *j + 1 == n)
                .map(|(j, a)| (*a, (j + 1) as f64 / n as f64))
                .collect();
            (format!("{} ({n} stale reads)", r.label), points)
        })
        .collect();
    cdf_chart(
        path,
        "Staleness age of stale reads (CDF)",
        "age (ms): read start minus ack of the first newer version",
        "fraction of stale reads",
        60_000.0,
        series,
    );
}

/// CDF of commit-to-eviction delay per mode (from the instances' histograms).
fn chart_coherence(results: &[ModeResult], path: &std::path::Path) {
    let series = results
        .iter()
        .map(|r| (r.label.clone(), r.coherence_cdf.clone()))
        .collect();
    cdf_chart(
        path,
        "Time to coherence: commit to eviction (CDF)",
        "delay (ms), bucket upper bounds",
        "fraction of invalidations",
        10_000.0,
        series,
    );
}

/// One line per mode (colour by position; empty series drawn as nothing), log x in ms.
fn cdf_chart(
    path: &std::path::Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_max: f64,
    series: Vec<(String, Vec<(f64, f64)>)>,
) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (820, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.01f64..x_max).log_scale(), 0.0f64..1.0)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .unwrap();
    for (i, (label, points)) in series.into_iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.into_iter().map(|(x, y)| (x.max(0.01), y)),
                color.stroke_width(2),
            ))
            .unwrap()
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}
