//! Fleet benchmark: what a fleet of light syncar instances costs Postgres and Redis, and how
//! fast a plain-SQL write reaches every instance, per Postgres change source (`wal` against
//! `changes_log`).
//!
//! `make bench-fleet` (or `cargo bench --bench fleet -- [options]`) starts its own Postgres
//! (`wal_level = logical`), then for each source a Redis of its own, a fresh database
//! (migrated once with `syncar migrate`) and N syncar processes of the release binary, each
//! with one worker thread, a pool of 2 and an 8 MiB L1 (with `wal`, every instance may relay:
//! they elect one). It seeds `--keys` rows with plain SQL, reads every key through every
//! instance (so each L1 holds it), then measures (writes first, idle windows after):
//! 1. **Postgres transactions per second while the fleet is idle** (`pg_stat_database`
//!    commits + rollbacks of the database), over `--idle-secs` with every instance running,
//!    then again with only one left (the relay with `wal`, instance 0 with `changes_log`):
//!    an idle instance costs `(fleet - one) / (N - 1)`. Goal for `wal`: 0. Meanwhile
//!    `pg_stat_activity` is sampled every 100 ms and every statement seen is listed by
//!    `application_name` and text, so traffic that should not be there can be named.
//!    Nothing calls the instances meanwhile: `/readyz` itself runs `SELECT 1` on the pool.
//! 2. **Connections per instance**: Postgres backends of the database whose
//!    `application_name` starts with `syncar` (the relay's, `syncar-relay`, shown apart) and
//!    Redis clients (`CLIENT LIST`, the benchmark's own excluded), divided by N.
//! 3. **Commit to eviction on every instance**, p50 and p99: `--writes-per-sec` single-row
//!    `UPDATE`s for `--write-secs`, then every instance's
//!    `syncar_invalidation_delay_seconds{feed="postgres"}` histogram (before subtracted),
//!    summed, quantiles interpolated within buckets; and how many evictions were counted
//!    (want writes x N). The writer commits synchronously, as Postgres does by default (the
//!    test server does not): see [`write_window`].
//! 4. **Redis commands per write**: `INFO commandstats` over the write window, less the
//!    fleet's idle rate (heartbeats, leases) over the same time, divided by the writes. Two
//!    figures: every command (Redis counts those a script runs, too), and those clients sent
//!    (all but GET, SET, HGET, HSET and DEL, which only syncar's scripts run while nothing is
//!    read). Goal for `wal`: independent of N.
//!
//! It prints one row per source and writes `target/bench-fleet/results.json`; each source's
//! config and the instances' warnings are in `target/bench-fleet/<source>/`.
//!
//! Then the hot-key run (`hot_key.rs`): Postgres reads per write of a key every instance
//! reads at once, with fill leases and without.
//!
//! With `--sources wal-sync` (`wal` with the relay named in `synchronous_standby_names` for
//! that run, so each commit returns once every instance applied it), the writer's commit
//! latency at this fleet size, beside `wal`'s in the same run.
//!
//! Options (defaults in brackets): `--instances 30`, `--sources wal,changes_log`,
//! `--keys 200`, `--idle-secs 10`, `--write-secs 10`, `--writes-per-sec 100`,
//! `--hot-rounds 20` (0: no hot-key run), `--only hot-key` (that run alone). Needs the
//! Postgres server binaries (`postgresql`) and `redis-server` (`redis-server`); with 30
//! instances, about 1.5 minutes and 300 MiB of memory on 2 cores.
//!
//! Postgres counts a backend's transactions only when it flushes its statistics: at most
//! once a second while busy, but up to 10 s after its last transaction once idle, and at
//! once when it exits. So the idle window starts at least 11 s after the benchmark last made
//! an instance touch Postgres (readiness checks and reads do), the benchmark's own
//! connections to the database are closed before it, and the rate is taken between the
//! counter's first and last steps (see [`rate_between_steps`]). Note that tokio-postgres
//! prepares an unprepared statement in a round trip of its own, which Postgres counts as a
//! transaction too: a statement sent that way counts twice.

#[path = "fleet/hot_key.rs"]
mod hot_key;

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Wal,
    /// `wal` with the relay named in `synchronous_standby_names`: a commit returns once every
    /// instance has applied it.
    WalSync,
    ChangesLog,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Wal => "wal",
            Source::WalSync => "wal-sync",
            Source::ChangesLog => "changes_log",
        }
    }

    /// `feeds.postgres_source`.
    fn config_name(self) -> &'static str {
        match self {
            Source::Wal | Source::WalSync => "wal",
            Source::ChangesLog => "changes_log",
        }
    }

    fn relays(self) -> bool {
        self != Source::ChangesLog
    }

    fn parse(s: &str) -> Source {
        match s {
            "wal" => Source::Wal,
            "wal-sync" => Source::WalSync,
            "changes_log" => Source::ChangesLog,
            other => panic!("unknown source {other:?}: use wal, wal-sync or changes_log"),
        }
    }
}

#[derive(Debug)]
struct Args {
    instances: usize,
    sources: Vec<Source>,
    keys: usize,
    idle: Duration,
    write: Duration,
    writes_per_sec: f64,
    /// `--hot-rounds`: writes in the hot-key run.
    hot_rounds: usize,
    /// `--only hot-key`: the hot-key run alone (else it follows the sources).
    only_hot_key: bool,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            instances: 30,
            sources: vec![Source::Wal, Source::ChangesLog],
            keys: 200,
            idle: Duration::from_secs(10),
            write: Duration::from_secs(10),
            writes_per_sec: 100.0,
            hot_rounds: 20,
            only_hot_key: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue; // added by `cargo bench`
            }
            let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            let number = |v: String| -> f64 {
                v.parse()
                    .unwrap_or_else(|_| panic!("{flag} takes a number, not {v:?}"))
            };
            match flag.as_str() {
                "--instances" => a.instances = number(value()) as usize,
                "--sources" => a.sources = value().split(',').map(Source::parse).collect(),
                "--keys" => a.keys = number(value()) as usize,
                "--idle-secs" => a.idle = Duration::from_secs_f64(number(value())),
                "--write-secs" => a.write = Duration::from_secs_f64(number(value())),
                "--writes-per-sec" => a.writes_per_sec = number(value()),
                "--hot-rounds" => a.hot_rounds = number(value()) as usize,
                "--only" => match value().as_str() {
                    "hot-key" => a.only_hot_key = true,
                    other => panic!("--only takes hot-key, not {other}"),
                },
                other => panic!("unknown option {other}"),
            }
        }
        assert!(a.instances >= 2, "--instances must be at least 2");
        assert!(a.keys >= 1, "--keys must be at least 1");
        assert!(a.writes_per_sec > 0.0, "--writes-per-sec must be positive");
        a
    }
}

/// How long an idle Postgres backend may keep its statistics before flushing them (10 s,
/// `PGSTAT_IDLE_INTERVAL`), plus a margin.
const STATS_IDLE_FLUSH: Duration = Duration::from_secs(11);
/// How long a busy backend may keep them (1 s, `PGSTAT_MIN_INTERVAL`), plus a margin.
const STATS_BUSY_FLUSH: Duration = Duration::from_millis(1500);
/// How long a plain-SQL write may take to reach every instance before it counts as missed.
const PROPAGATION: Duration = Duration::from_secs(2);
/// Commands only syncar's scripts run while nothing is read: not round trips from clients.
const SCRIPT_ONLY: [&str; 5] = ["get", "set", "hget", "hset", "del"];

/// One keep-alive HTTP/1.1 connection to an instance, reopened after errors.
struct Http {
    port: u16,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Http {
    fn new(port: u16) -> Http {
        Http { port, sender: None }
    }

    /// `GET path`: the status, the `X-Cache` header and the body.
    async fn get(&mut self, path: &str) -> Result<(u16, Option<String>, Bytes), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", self.port))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().unwrap();
        let answer = async {
            sender.ready().await?;
            let req = http::Request::builder()
                .uri(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let cache = resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, cache, body))
        }
        .await;
        if answer.is_err() {
            self.sender = None;
        }
        answer.map_err(|e| e.to_string())
    }
}

/// `/readyz` of the instance on `port`, as JSON.
async fn readyz(port: u16) -> Option<Value> {
    let (_, _, body) = Http::new(port).get("/readyz").await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// The syncar processes of one source; whatever is still running when it is dropped (a
/// failed assertion included) is killed.
struct Fleet {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    pg_url: String,
    redis_url: String,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Fleet {
    /// A fresh database `db` on the Postgres at `pg_port`, migrated once (so that N instances
    /// starting at once find the schema in place), a Redis of its own, and `instances`
    /// syncar processes of `bin` on it reading changes from `source`, each with one worker
    /// thread, a pool of 2, an 8 MiB L1 and `cache` added to its `[cache]` table; waits until
    /// every one is ready. Configs and logs go to `dir`. Also answers a watch connection to
    /// the database.
    async fn start(
        bin: &Path,
        pg_port: u16,
        db: &str,
        instances: usize,
        dir: &Path,
        (source, cache): (Source, &str),
    ) -> (Fleet, servers::RedisServer, Arc<PgWatch>) {
        let redis_server = servers::RedisServer::start();
        let watch = Arc::new(PgWatch::connect(pg_port, db).await);
        watch
            .pg
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
        // The instances name their connections themselves.
        let pg_url = format!("postgres://postgres@127.0.0.1:{pg_port}/{db}");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let config = dir.join("syncar.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nworker_threads = 1\n[postgres]\npool_size = 2\n\
                 [cache]\nl1_max_bytes = 8388608\n{cache}\
                 [redis]\nkey_prefix = \"{db}:\"\n[feeds]\npostgres_source = \"{}\"\n\
                 [log]\nlevel = \"warn\"\n",
                source.config_name()
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let migrated = Command::new(bin)
            .args(["migrate", "--config"])
            .arg(&config)
            .env("SYNCAR_POSTGRES_URL", &pg_url)
            .env("SYNCAR_REDIS_URL", redis_server.url())
            .output()
            .unwrap_or_else(|e| panic!("running {} migrate: {e}", bin.display()));
        assert!(
            migrated.status.success(),
            "syncar migrate failed for {db}: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        let mut fleet = Fleet {
            bin: bin.to_path_buf(),
            config,
            dir: dir.to_path_buf(),
            pg_url,
            redis_url: redis_server.url(),
            ports: (0..instances).map(|_| servers::free_port()).collect(),
            children: (0..instances).map(|_| None).collect(),
        };
        for i in 0..instances {
            fleet.spawn(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60 + 2 * instances as u64);
        for i in 0..instances {
            fleet.wait_ready(i, deadline).await;
        }
        (fleet, redis_server, watch)
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("syncar-{i}.log"))
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.log(i))
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.log(i).display()));
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("SYNCAR_LISTEN", format!("127.0.0.1:{}", self.ports[i]))
            .env("SYNCAR_POSTGRES_URL", &self.pg_url)
            .env("SYNCAR_REDIS_URL", &self.redis_url)
            .env("SYNCAR_INSTANCE", format!("fleet-{i}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.children[i] = Some(child);
    }

    /// Until `/readyz` of instance `i` says ready with L1 in use (every feed up).
    async fn wait_ready(&mut self, i: usize, deadline: Instant) {
        loop {
            let answer = readyz(self.ports[i]).await;
            if let Some(r) = &answer {
                if r["ready"] == true && r["l1_in_use"] == true {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.children[i].as_mut().map(|c| c.try_wait()) {
                panic!(
                    "instance {i} exited ({status}) before it was ready; its log:\n{}",
                    std::fs::read_to_string(self.log(i)).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "instance {i} never became ready (with L1 in use); last /readyz: {}; its log is {}",
                answer.map_or("no answer".into(), |r| r.to_string()),
                self.log(i).display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM to every instance `stop` picks, then waits for each (killing any that outlive
    /// the shutdown grace).
    fn stop_where(&mut self, stop: impl Fn(usize) -> bool) {
        for (i, child) in self.children.iter().enumerate() {
            if let Some(child) = child.as_ref().filter(|_| stop(i)) {
                // SAFETY: a plain signal to a child we started and have not reaped.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (i, slot) in self.children.iter_mut().enumerate() {
            if !stop(i) {
                continue;
            }
            let Some(mut child) = slot.take() else {
                continue;
            };
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    eprintln!("instance {i} ignored SIGTERM for 15 s; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A connection to the `postgres` database (so its own queries never count in the measured
/// database's statistics), watching the measured one.
struct PgWatch {
    pg: tokio_postgres::Client,
    db: String,
}

/// A statement seen in `pg_stat_activity`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Seen {
    application_name: String,
    backend_type: String,
    query: String,
}

impl PgWatch {
    async fn connect(pg_port: u16, db: &str) -> PgWatch {
        let url = format!(
            "postgres://postgres@127.0.0.1:{pg_port}/postgres?application_name=fleet-bench"
        );
        let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to postgres to watch {db}: {e}"));
        tokio::spawn(conn);
        PgWatch {
            pg,
            db: db.to_string(),
        }
    }

    /// Transactions of the database so far, as flushed: (committed, rolled back).
    async fn xacts(&self) -> (i64, i64) {
        let row = self
            .pg
            .query_one(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
                &[&self.db],
            )
            .await
            .unwrap_or_else(|e| panic!("reading pg_stat_database: {e}"));
        (row.get(0), row.get(1))
    }

    /// The server's clock, in seconds since the Unix epoch.
    async fn now(&self) -> f64 {
        self.pg
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await
            .unwrap_or_else(|e| panic!("reading postgres' clock: {e}"))
            .get(0)
    }

    /// syncar's backends of the database, by `application_name` and `backend_type`.
    async fn connections(&self) -> BTreeMap<String, i64> {
        self.pg
            .query(
                "SELECT application_name || ' (' || coalesce(backend_type, '') || ')', count(*)::int8 \
                 FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'syncar%' \
                 GROUP BY 1",
                &[&self.db],
            )
            .await
            .unwrap_or_else(|e| panic!("reading pg_stat_activity: {e}"))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Every backend of the database whose last statement started at or after `since`
    /// (server clock): (pid, start in microseconds) and what it ran.
    async fn activity(&self, since: f64) -> Vec<((i32, i64), Seen)> {
        let rows = self
            .pg
            .query(
                "SELECT pid, (extract(epoch FROM query_start) * 1000000)::int8, \
                        coalesce(application_name, ''), coalesce(backend_type, ''), \
                        coalesce(query, '') \
                 FROM pg_stat_activity \
                 WHERE datname = $1 AND query_start >= to_timestamp($2)",
                &[&self.db, &since],
            )
            .await
            .unwrap_or_else(|e| panic!("sampling pg_stat_activity: {e}"));
        rows.iter()
            .map(|r| {
                let query: String = r.get(4);
                let query = query.split_whitespace().collect::<Vec<_>>().join(" ");
                (
                    (r.get(0), r.get(1)),
                    Seen {
                        application_name: r.get(2),
                        backend_type: r.get(3),
                        query: query.chars().take(160).collect(),
                    },
                )
            })
            .collect()
    }
}

/// Each statement seen once per (backend, start), grouped: how many (a lower bound of how many
/// ran: sampled every 100 ms) and from how many backends.
fn group_statements(seen: HashMap<(i32, i64), Seen>) -> BTreeMap<Seen, (usize, usize)> {
    let mut grouped: BTreeMap<Seen, (usize, HashSet<i32>)> = BTreeMap::new();
    for ((pid, _), s) in seen {
        let entry = grouped.entry(s).or_default();
        entry.0 += 1;
        entry.1.insert(pid);
    }
    grouped
        .into_iter()
        .map(|(s, (n, pids))| (s, (n, pids.len())))
        .collect()
}

/// Transactions per second between the first and the last step of the counter, from samples
/// of (seconds, count). Closer than the difference over the whole window: the count moves
/// only when a backend flushes its statistics (a busy one about once a second), so at each
/// end of a window it lags by up to a second of that backend's transactions. `None` with
/// fewer than two steps.
fn rate_between_steps(samples: &[(f64, i64)]) -> Option<f64> {
    let first = samples.first()?.1;
    let i = samples.iter().position(|s| s.1 != first)?;
    let j = (1..samples.len())
        .rev()
        .find(|&j| samples[j].1 != samples[j - 1].1)?;
    (j > i).then(|| (samples[j].1 - samples[i].1) as f64 / (samples[j].0 - samples[i].0))
}

/// The benchmark's own connection to Redis.
struct RedisWatch {
    conn: redis::aio::MultiplexedConnection,
    own_id: i64,
}

impl RedisWatch {
    async fn connect(url: &str) -> RedisWatch {
        let mut conn = redis::Client::open(url)
            .unwrap_or_else(|e| panic!("redis url {url}: {e}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to redis at {url}: {e}"));
        let own_id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CLIENT ID: {e}"));
        RedisWatch { conn, own_id }
    }

    /// Calls so far of every command (`INFO commandstats`), by name.
    async fn commandstats(&mut self) -> BTreeMap<String, u64> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("INFO commandstats: {e}"));
        text.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect()
    }

    /// Clients connected, the benchmark's own excluded: (all, subscribed).
    async fn clients(&mut self) -> (usize, usize) {
        let text: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("CLIENT LIST: {e}"));
        let own = format!("id={} ", self.own_id);
        let field = |line: &str, name: &str| -> u64 {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let others: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with(&own))
            .collect();
        let subscribed = others
            .iter()
            .filter(|l| field(l, "sub") + field(l, "psub") + field(l, "ssub") > 0)
            .count();
        (others.len(), subscribed)
    }
}

/// `after - before`, command by command.
fn calls_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, n)| {
            (
                name.clone(),
                n.saturating_sub(before.get(name).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// What an idle window showed.
struct Idle {
    secs: f64,
    pg_xacts: i64,
    pg_rollbacks: i64,
    /// See [`rate_between_steps`].
    pg_rate_between_steps: Option<f64>,
    redis_calls: BTreeMap<String, u64>,
    redis_secs: f64,
    /// Statements seen: (how many, from how many backends).
    statements: BTreeMap<Seen, (usize, usize)>,
}

impl Idle {
    /// Postgres transactions per second: between the counter's steps when it moved at
    /// least twice, else over the window.
    fn pg_rate(&self) -> f64 {
        self.pg_rate_between_steps
            .unwrap_or(self.pg_xacts as f64 / self.secs)
    }

    fn redis_rate(&self) -> f64 {
        self.redis_calls.values().sum::<u64>() as f64 / self.redis_secs
    }

    fn json(&self) -> Value {
        json!({
            "secs": self.secs,
            "pg_transactions": self.pg_xacts,
            "pg_rollbacks": self.pg_rollbacks,
            "pg_transactions_per_sec": self.pg_rate(),
            "pg_transactions_per_sec_over_window": self.pg_xacts as f64 / self.secs,
            "redis_commands_per_sec": self.redis_rate(),
            "redis_commands": self.redis_calls,
            "statements_seen": statements_json(&self.statements),
        })
    }
}

fn statements_json(statements: &BTreeMap<Seen, (usize, usize)>) -> Vec<Value> {
    statements
        .iter()
        .map(|(s, (n, backends))| {
            json!({
                "application_name": s.application_name,
                "backend_type": s.backend_type,
                "query": s.query,
                "seen": n,
                "backends": backends,
            })
        })
        .collect()
}

/// Nothing asked of the fleet for `secs`: Postgres transactions, Redis commands, and the
/// statements `pg_stat_activity` shows, sampled every 100 ms.
async fn idle_window(watch: &PgWatch, redis: &mut RedisWatch, secs: Duration) -> Idle {
    let since = watch.now().await;
    let (r0, t0) = (redis.commandstats().await, Instant::now());
    let mut counts: Vec<(f64, i64)> = Vec::new();
    let mut rollbacks = (0, 0);
    let mut seen: HashMap<(i32, i64), Seen> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let (commits, rolled_back) = watch.xacts().await;
        counts.push((t0.elapsed().as_secs_f64(), commits + rolled_back));
        if counts.len() == 1 {
            rollbacks.0 = rolled_back;
        }
        rollbacks.1 = rolled_back;
        seen.extend(watch.activity(since).await);
        if t0.elapsed() >= secs {
            break;
        }
    }
    let (r1, redis_secs) = (redis.commandstats().await, t0.elapsed().as_secs_f64());
    let (first, last) = (counts[0], counts[counts.len() - 1]);
    Idle {
        secs: last.0 - first.0,
        pg_xacts: last.1 - first.1,
        pg_rollbacks: rollbacks.1 - rollbacks.0,
        pg_rate_between_steps: rate_between_steps(&counts),
        redis_calls: calls_between(&r0, &r1),
        redis_secs,
        statements: group_statements(seen),
    }
}

/// Cumulative bucket counts of `syncar_invalidation_delay_seconds{feed="postgres"}` by `le`,
/// and its count.
#[derive(Clone, Default)]
struct Delays {
    buckets: HashMap<String, u64>,
    count: u64,
}

impl Delays {
    fn parse(text: &str) -> Delays {
        let mut d = Delays::default();
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !series.contains("feed=\"postgres\"") {
                continue;
            }
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if series.starts_with("syncar_invalidation_delay_seconds_bucket{") {
                if let Some(le) = series
                    .split("le=\"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                {
                    d.buckets.insert(le.to_string(), value as u64);
                }
            } else if series.starts_with("syncar_invalidation_delay_seconds_count") {
                d.count = value as u64;
            }
        }
        d
    }

    fn minus(&self, before: &Delays) -> Delays {
        Delays {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    (
                        le.clone(),
                        n.saturating_sub(before.buckets.get(le).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            count: self.count.saturating_sub(before.count),
        }
    }

    fn add(&mut self, other: &Delays) {
        for (le, n) in &other.buckets {
            *self.buckets.entry(le.clone()).or_default() += n;
        }
        self.count += other.count;
    }

    /// The buckets by upper bound, ascending (`+Inf` last).
    fn sorted(&self) -> Vec<(f64, u64)> {
        let mut v: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()
                        .unwrap_or_else(|_| panic!("bucket bound {le:?} is not a number"))
                };
                (le, *n)
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// The `q` quantile in seconds, interpolated linearly within its bucket (as Prometheus'
    /// `histogram_quantile`); in the `+Inf` bucket, the largest finite bound. `None` if empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        let buckets = self.sorted();
        let total = buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for (le, n) in buckets {
            if n as f64 >= rank && n > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                return Some(lower + (le - lower) * (rank - below as f64) / (n - below) as f64);
            }
            (lower, below) = (le, n);
        }
        Some(lower)
    }
}

/// Every instance's delay histogram, in port order (`None` where `/metrics` did not answer).
async fn scrape_delays(ports: &[u16]) -> Vec<Option<Delays>> {
    let mut out = Vec::new();
    for port in ports {
        let text = Http::new(*port).get("/metrics").await.ok();
        out.push(text.map(|(_, _, body)| Delays::parse(&String::from_utf8_lossy(&body))));
    }
    out
}

/// What the write window showed.
struct Writes {
    writes: u64,
    secs: f64,
    delays: Delays,
    /// Evictions each instance counted.
    per_instance: Vec<u64>,
    /// Each UPDATE's commit as the writer waited, in ms, sorted.
    commit_ms: Vec<f64>,
    redis_calls: BTreeMap<String, u64>,
    redis_secs: f64,
}

/// Plain-SQL single-row UPDATEs at `--writes-per-sec` for `--write-secs`, each its own
/// transaction, committed with `synchronous_commit = on` (Postgres' default; the test server
/// turns it off for speed). Logical decoding sends only flushed WAL, so asynchronous commits
/// would reach the relay only when the WAL writer flushes (every 200 ms): a delay production
/// servers do not add.
async fn write_window(args: &Args, url: &str, ports: &[u16], redis: &mut RedisWatch) -> Writes {
    let (pg, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting the writer to {url}: {e}"));
    let driver = tokio::spawn(conn);
    pg.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap_or_else(|e| panic!("SET synchronous_commit: {e}"));
    let update = pg
        .prepare("UPDATE syncar_kv SET value = to_jsonb($2::int8) WHERE key = $1")
        .await
        .unwrap_or_else(|e| panic!("preparing the UPDATE: {e}"));
    let before = scrape_delays(ports).await;
    let (r0, t0) = (redis.commandstats().await, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.writes_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut writes = 0u64;
    let mut commit_ms = Vec::new();
    while t0.elapsed() < args.write {
        tick.tick().await;
        let key = format!("k{}", writes as usize % args.keys + 1);
        let started = Instant::now();
        let n = pg
            .execute(&update, &[&key, &(writes as i64)])
            .await
            .unwrap_or_else(|e| panic!("UPDATE of {key}: {e}"));
        commit_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(n, 1, "the UPDATE of {key} changed {n} rows");
        writes += 1;
    }
    commit_ms.sort_by(f64::total_cmp);
    let secs = t0.elapsed().as_secs_f64();
    // Closed now: a backend that exits flushes its statistics at once, not in the idle window.
    drop(update);
    drop(pg);
    let _ = driver.await;
    tokio::time::sleep(PROPAGATION).await;
    let after = scrape_delays(ports).await;
    let (r1, redis_secs) = (redis.commandstats().await, t0.elapsed().as_secs_f64());
    let mut delays = Delays::default();
    let mut per_instance = Vec::new();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (Some(b), Some(a)) = (b, a) else {
            panic!("instance {i} did not answer /metrics around the write window");
        };
        let d = a.minus(b);
        per_instance.push(d.count);
        delays.add(&d);
    }
    Writes {
        writes,
        secs,
        delays,
        per_instance,
        commit_ms,
        redis_calls: calls_between(&r0, &r1),
        redis_secs,
    }
}

/// Everything measured for one source.
struct SourceResult {
    source: Source,
    instances: usize,
    ready_secs: f64,
    /// With `wal`: the relay's instance id and index.
    relay: Option<(String, usize)>,
    fleet_idle: Idle,
    one_idle: Idle,
    pg_connections: BTreeMap<String, i64>,
    redis_clients: (usize, usize),
    writes: Writes,
}

impl SourceResult {
    /// Postgres transactions per second of one idle instance: what the fleet sends beyond
    /// the one left alone (the relay with `wal`), per other instance.
    fn pg_rate_per_idle_instance(&self) -> f64 {
        (self.fleet_idle.pg_rate() - self.one_idle.pg_rate()) / (self.instances - 1) as f64
    }

    fn pg_connections_total(&self) -> i64 {
        self.pg_connections.values().sum()
    }

    fn pg_connections_relay(&self) -> i64 {
        self.pg_connections
            .iter()
            .filter(|(k, _)| k.starts_with("syncar-relay "))
            .map(|(_, n)| n)
            .sum()
    }

    /// Redis commands per write, less the idle fleet's, by command.
    fn redis_per_write(&self) -> BTreeMap<String, f64> {
        let w = &self.writes;
        let idle = &self.fleet_idle;
        let names: HashSet<&String> = w
            .redis_calls
            .keys()
            .chain(idle.redis_calls.keys())
            .collect();
        names
            .into_iter()
            .map(|name| {
                let during = w.redis_calls.get(name).copied().unwrap_or(0) as f64;
                let background = idle.redis_calls.get(name).copied().unwrap_or(0) as f64
                    / idle.redis_secs
                    * w.redis_secs;
                (name.clone(), (during - background) / w.writes.max(1) as f64)
            })
            .collect()
    }

    /// (every command, commands from clients) per write.
    fn redis_totals_per_write(&self) -> (f64, f64) {
        let per = self.redis_per_write();
        let all = per.values().sum();
        let clients = per
            .iter()
            .filter(|(name, _)| !SCRIPT_ONLY.contains(&name.as_str()))
            .map(|(_, n)| n)
            .sum();
        (all, clients)
    }

    fn json(&self) -> Value {
        let n = self.instances as f64;
        let w = &self.writes;
        let (all, clients) = self.redis_totals_per_write();
        let ms = |q: f64| w.delays.quantile(q).map(|s| s * 1000.0);
        let mut per_write: Vec<(String, f64)> = self
            .redis_per_write()
            .into_iter()
            .filter(|(_, v)| v.abs() >= 0.005)
            .collect();
        per_write.sort_by(|a, b| b.1.total_cmp(&a.1));
        json!({
            "source": self.source.name(),
            "instances": self.instances,
            "ready_secs": self.ready_secs,
            "relay": self.relay.as_ref().map(|(id, i)| json!({"id": id, "index": i})),
            "postgres_idle": {
                "fleet": self.fleet_idle.json(),
                "one_instance": self.one_idle.json(),
                "one_instance_is": if self.relay.is_some() { "the relay" } else { "instance 0" },
                "transactions_per_sec_per_idle_instance": self.pg_rate_per_idle_instance(),
            },
            "connections": {
                "postgres": self.pg_connections,
                "postgres_total": self.pg_connections_total(),
                "postgres_per_instance": self.pg_connections_total() as f64 / n,
                "postgres_relay": self.pg_connections_relay(),
                "postgres_per_instance_without_relay":
                    (self.pg_connections_total() - self.pg_connections_relay()) as f64 / n,
                "redis_total": self.redis_clients.0,
                "redis_subscribed": self.redis_clients.1,
                "redis_per_instance": self.redis_clients.0 as f64 / n,
            },
            "writes": {
                "count": w.writes,
                "secs": w.secs,
                "per_sec": w.writes as f64 / w.secs,
                "evictions_counted": w.delays.count,
                "evictions_expected": w.writes * self.instances as u64,
                "evictions_per_instance_min": w.per_instance.iter().min(),
                "evictions_per_instance_max": w.per_instance.iter().max(),
                "commit_p50_ms": quantile(&w.commit_ms, 0.5),
                "commit_p99_ms": quantile(&w.commit_ms, 0.99),
                "commit_to_eviction_p50_ms": ms(0.5),
                "commit_to_eviction_p99_ms": ms(0.99),
                "commit_to_eviction_buckets": w.delays.sorted().iter()
                    .map(|(le, c)| json!([if le.is_finite() { json!(le) } else { json!("+Inf") }, c]))
                    .collect::<Vec<_>>(),
            },
            "redis_per_write": {
                "all_commands": all,
                "from_clients": clients,
                "by_command": per_write.into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<String, Value>>(),
                "write_window": w.redis_calls,
                "write_window_secs": w.redis_secs,
            },
        })
    }
}

/// The `q` quantile of `sorted` (nearest rank), if any.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((q * last as f64).round() as usize).min(last)])
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_syncar"));
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench-fleet");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
    let servers = servers::servers();
    eprintln!(
        "fleet benchmark: {} instances, {} keys, idle windows of {:?}, {} writes/s for {:?}, sources {:?}",
        args.instances, args.keys, args.idle, args.writes_per_sec, args.write, args.sources
    );
    if !args.only_hot_key {
        let mut results = Vec::new();
        for (n, source) in args.sources.iter().enumerate() {
            results.push(run_source(&args, *source, n, &bin, servers.pg_port, &out).await);
        }
        report(&args, &results, &out);
    }
    if args.hot_rounds > 0 {
        hot_key::run(&args, &bin, servers.pg_port, &out).await;
    }
}

async fn run_source(
    args: &Args,
    source: Source,
    n: usize,
    bin: &Path,
    pg_port: u16,
    out: &Path,
) -> SourceResult {
    let started = Instant::now();
    let db = format!("fleet_{}_{n}", std::process::id());
    // The relay as a synchronous standby for this source's run only (the server is shared).
    let synchronous = |names: &'static str| async move {
        let admin = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
        let (pg, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
        let driver = tokio::spawn(conn);
        pg.batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ))
        .await
        .unwrap_or_else(|e| panic!("setting synchronous_standby_names: {e}"));
        pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        drop(pg);
        let _ = driver.await;
    };
    if source == Source::WalSync {
        synchronous("\"syncar-relay\"").await;
    }
    let (mut fleet, redis_server, watch) = Fleet::start(
        bin,
        pg_port,
        &db,
        args.instances,
        &out.join(source.name()),
        (source, ""),
    )
    .await;
    let pg_url = fleet.pg_url.clone();
    let bench_url = format!("{pg_url}?application_name=fleet-bench");
    let ready_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{}: {} instances ready in {ready_secs:.1} s",
        source.name(),
        args.instances
    );

    // The instance left alone in the second idle window: the relay with `wal`.
    let relay = if source.relays() {
        Some(find_relay(&fleet).await)
    } else {
        None
    };
    let keep = relay.as_ref().map_or(0, |(_, i)| *i);

    // Seed, then read every key through every instance so that each L1 holds it.
    {
        let (pg, conn) = tokio_postgres::connect(&bench_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {db} to seed it: {e}"));
        let driver = tokio::spawn(conn);
        pg.execute(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '1' FROM generate_series(1, $1::int8) i",
            &[&(args.keys as i64)],
        )
        .await
        .unwrap_or_else(|e| panic!("seeding {} keys: {e}", args.keys));
        drop(pg);
        let _ = driver.await;
    }
    let mut tiers: BTreeMap<String, usize> = BTreeMap::new();
    for (i, port) in fleet.ports.iter().enumerate() {
        let mut http = Http::new(*port);
        for k in 1..=args.keys {
            let (status, cache, _) = http
                .get(&format!("/v1/kv/k{k}"))
                .await
                .unwrap_or_else(|e| panic!("reading k{k} through instance {i}: {e}"));
            assert_eq!(status, 200, "reading k{k} through instance {i}");
            *tiers.entry(cache.unwrap_or_default()).or_default() += 1;
        }
    }
    // The last time the benchmark made an instance touch Postgres.
    let touched = Instant::now();
    eprintln!(
        "{}: every key read through every instance (answered by {tiers:?})",
        source.name()
    );

    let mut redis = RedisWatch::connect(&redis_server.url()).await;
    tokio::time::sleep(PROPAGATION).await; // the seed's invalidations, before measuring any
    let writes = write_window(args, &bench_url, &fleet.ports, &mut redis).await;
    eprintln!(
        "{}: {} writes in {:.1} s; {} evictions counted",
        source.name(),
        writes.writes,
        writes.secs,
        writes.delays.count
    );
    let pg_connections = watch.connections().await;
    let redis_clients = redis.clients().await;

    if let Some(rest) = STATS_IDLE_FLUSH.checked_sub(touched.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let fleet_idle = idle_window(&watch, &mut redis, args.idle).await;
    eprintln!(
        "{}: idle fleet: {:.2} Postgres transactions/s, {:.0} Redis commands/s",
        source.name(),
        fleet_idle.pg_rate(),
        fleet_idle.redis_rate()
    );

    // Only one instance left: stopped backends flush their statistics as they exit.
    fleet.stop_where(|i| i != keep);
    tokio::time::sleep(STATS_BUSY_FLUSH).await;
    let one_idle = idle_window(&watch, &mut redis, args.idle).await;
    eprintln!(
        "{}: only instance {keep} left: {:.2} Postgres transactions/s",
        source.name(),
        one_idle.pg_rate()
    );
    fleet.stop_where(|_| true);
    if source == Source::WalSync {
        synchronous("").await;
    }
    if source.relays() {
        // The slot would retain WAL for nobody for the rest of the run.
        let _ = watch
            .pg
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = $1 AND NOT active",
                &[&db],
            )
            .await;
    }
    drop(fleet);
    drop(redis_server);
    SourceResult {
        source,
        instances: args.instances,
        ready_secs,
        relay,
        fleet_idle,
        one_idle,
        pg_connections,
        redis_clients,
        writes,
    }
}

/// The relay's instance id (`fleet-{i}-{random}`, from `/readyz`) and index.
async fn find_relay(fleet: &Fleet) -> (String, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = readyz(fleet.ports[0]).await;
        let id = r
            .as_ref()
            .and_then(|r| r["feeds"]["postgres"]["relay"]["relay"].as_str())
            .map(str::to_string);
        if let Some(id) = id {
            let index = id
                .rsplit_once('-')
                .and_then(|(name, _)| name.strip_prefix("fleet-"))
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < fleet.ports.len())
                .unwrap_or_else(|| panic!("the relay {id:?} is none of this fleet's instances"));
            return (id, index);
        }
        assert!(
            Instant::now() < deadline,
            "instance 0's /readyz names no relay (feeds.postgres.relay.relay): {}",
            r.map_or("no answer".into(), |r| r.to_string())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report(args: &Args, results: &[SourceResult], out: &Path) {
    println!();
    println!(
        "{:<12} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>15} {:>8} {:>8} {:>9} {:>9}",
        "source",
        "inst",
        "pg tx/s",
        "1 inst",
        "per idle",
        "pg conn",
        "relay",
        "redis",
        "evictions",
        "p50 ms",
        "p99 ms",
        "redis/wr",
        "clients/wr"
    );
    println!(
        "{:<12} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>15} {:>8} {:>8} {:>9} {:>9}",
        "",
        "",
        "idle",
        "left",
        "instance",
        "/inst",
        "conns",
        "conn/in",
        "counted/want",
        "",
        "",
        "all",
        ""
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in results {
        let w = &r.writes;
        let (all, clients) = r.redis_totals_per_write();
        println!(
            "{:<12} {:>5} {:>9.2} {:>9.2} {:>9.3} {:>8.2} {:>7} {:>8.2} {:>15} {:>8} {:>8} {:>9.2} {:>9.2}",
            r.source.name(),
            r.instances,
            r.fleet_idle.pg_rate(),
            r.one_idle.pg_rate(),
            r.pg_rate_per_idle_instance(),
            r.pg_connections_total() as f64 / r.instances as f64,
            r.pg_connections_relay(),
            r.redis_clients.0 as f64 / r.instances as f64,
            format!("{}/{}", w.delays.count, w.writes * r.instances as u64),
            opt(w.delays.quantile(0.5).map(|s| s * 1000.0)),
            opt(w.delays.quantile(0.99).map(|s| s * 1000.0)),
            all,
            clients,
        );
    }
    println!(
        "\npg tx/s: transactions of the database per second, whole fleet idle; 1 inst left: only the \
         relay (wal) or instance 0 (changes_log) running; per idle instance: the difference over \
         the other N - 1. Redis per write: background (the idle fleet's rate) subtracted; \
         clients/wr leaves out what scripts run inside (GET, SET, HGET, HSET, DEL)."
    );
    for r in results {
        println!(
            "\n{}: plain-SQL commits as the writer waited: p50 {:.2} ms, p99 {:.2} ms",
            r.source.name(),
            quantile(&r.writes.commit_ms, 0.5).unwrap_or(0.0),
            quantile(&r.writes.commit_ms, 0.99).unwrap_or(0.0),
        );
        println!(
            "{}: {} writes in {:.1} s ({:.0}/s); evictions per instance {}..{}; Postgres backends {:?}; \
             Redis clients {} ({} subscribed){}",
            r.source.name(),
            r.writes.writes,
            r.writes.secs,
            r.writes.writes as f64 / r.writes.secs,
            r.writes.per_instance.iter().min().unwrap_or(&0),
            r.writes.per_instance.iter().max().unwrap_or(&0),
            r.pg_connections,
            r.redis_clients.0,
            r.redis_clients.1,
            r.relay
                .as_ref()
                .map_or(String::new(), |(id, i)| format!("; relay {id} (instance {i})")),
        );
        let mut per: Vec<(String, f64)> = r
            .redis_per_write()
            .into_iter()
            .filter(|(_, v)| v.abs() >= 0.005)
            .collect();
        per.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!(
            "  Redis commands per write: {}",
            per.iter()
                .map(|(name, v)| format!("{name} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (label, idle) in [
            ("whole fleet idle", &r.fleet_idle),
            ("one instance left", &r.one_idle),
        ] {
            println!(
                "  statements seen in pg_stat_activity, {label} ({:.1} s, {} transactions):",
                idle.secs, idle.pg_xacts
            );
            if idle.statements.is_empty() {
                println!("    none");
            }
            for (s, (seen, backends)) in &idle.statements {
                println!(
                    "    {seen:>5} from {backends:>2} backend(s)  {} ({}): {}",
                    s.application_name, s.backend_type, s.query
                );
            }
        }
    }
    let json = json!({
        "args": format!("{args:?}"),
        "sources": results.iter().map(SourceResult::json).collect::<Vec<_>>(),
    });
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("\nwrote {}", path.display());
    for r in results.iter().filter(|r| r.source == Source::Wal) {
        let idle_rate = r.pg_rate_per_idle_instance();
        let stray: usize = r
            .fleet_idle
            .statements
            .iter()
            .filter(|(s, _)| {
                s.application_name.starts_with("syncar") && s.application_name != "syncar-relay"
            })
            .map(|(_, (n, _))| n)
            .sum();
        println!(
            "goal (wal): Postgres transactions per idle instance = {idle_rate:.3}/s, statements \
             seen from syncar connections other than the relay's = {stray} (want about 0, and 0): {}",
            // The rate is a difference of two windows, each off by up to a second of the
            // relay's flushes: within 0.1/s is nothing.
            if idle_rate.abs() < 0.1 && stray == 0 {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}
