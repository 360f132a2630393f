//! Hot-path benchmark: a cache hit through syncar against the alternatives a user has,
//! measured side by side in one run on one machine, and what syncar's triggers cost every
//! writer of a cached table.
//!
//! `make bench-hot` (or `cargo bench --bench hot -- [options]`) starts its own Postgres and
//! Redis and two syncar processes of the release binary (one with L1, one without), then
//! runs, at the same concurrency and payload:
//! 1. `GET /v1/kv/{key}` from L1 (wrk);
//! 2. the same from Redis, L1 disabled (wrk);
//! 3. `redis-benchmark` GET against the same redis-server;
//! 4. a primary-key select on Postgres (pgbench, custom script);
//! 5. PUT through syncar against a plain upsert-and-commit (pgbench), both at the pool size;
//! 6. plain-SQL UPDATE throughput with pgbench at 1, 8 and 32 clients, on a table without
//!    triggers, with the version stamp alone, and with syncar's triggers for each
//!    `feeds.postgres_source` (`wal`, with a `syncar relay` decoding the slot meanwhile, since
//!    the walsender's decoding runs on the same Postgres; `changes_log`; `notify`); and the
//!    same for 50-row UPDATEs on one client;
//! 7. 100 keys in one batch get against 100 sequential GETs on one connection and against
//!    the same GETs on 50 connections, from L1, Redis and Postgres (`hot/batch.rs`).
//!
//! Options (defaults in brackets): `--connections 50`, `--secs 5`, `--keys 1000`,
//! `--value-bytes 200`, `--pool 16`, `--rounds 3` (of every trigger variant, interleaved;
//! each trigger figure is the median of its rounds), `--only batch` (the batch rows alone),
//! `--only unix` (the Unix-socket rows alone), `--only put` (where a PUT's time goes,
//! `hot/put.rs`), `--only network` (the hit and the PUT with Postgres and Redis behind a
//! delay line, `hot/network.rs`), `--delay-ms 0.25` (that line's delay each way), `--only
//! pinned` (what the `wal` source costs plain-SQL writers with Postgres on a core of its own,
//! durable commits and not, `hot/pinned.rs`), `--clients 32` (its pgbench clients).
//! `SYNCAR_BENCH_BIN=/path/to/syncar` measures that build instead of this one (an earlier
//! commit's release binary, for a before-and-after).
//! Needs `wrk` (Debian package `wrk`), `redis-benchmark`
//! (`redis-tools`) and `pgbench` (`postgresql`).

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

#[path = "hot/batch.rs"]
mod batch;

#[path = "hot/unix.rs"]
mod unix;

#[path = "hot/put.rs"]
mod put;

#[path = "hot/network.rs"]
mod network;

#[path = "hot/pinned.rs"]
mod pinned;

#[path = "common/delay.rs"]
mod delay;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    connections: usize,
    secs: u64,
    keys: usize,
    value_bytes: usize,
    pool: usize,
    /// Rounds of every trigger variant; each figure is the median of its rounds.
    rounds: usize,
    /// `--only batch`: the batch-get rows alone.
    only_batch: bool,
    /// `--only unix`: the Unix-socket rows alone.
    only_unix: bool,
    /// `--only put`: the PUT breakdown alone.
    only_put: bool,
    /// `--only network`: the hit and the PUT across a delay line (`hot/network.rs`).
    only_network: bool,
    /// `--delay-ms`: the delay line's delay in each direction, in ms.
    delay_ms: f64,
    /// `--only pinned`: the writers' cost with Postgres on a core of its own (`hot/pinned.rs`).
    only_pinned: bool,
    /// `--only tcp`: an L1 hit over TCP with `wrk` against `redis-benchmark` GET, `--rounds`
    /// times, with two workers and wrk's two threads, and with one worker and one thread.
    only_tcp: bool,
    /// `--clients`: pgbench's clients in `--only pinned`.
    pinned_clients: usize,
    /// `--pin` with `--only network`: the far side (Postgres, Redis, the delay lines and a
    /// relay of its own) on CPU 0, syncar and the load generators on the others, as
    /// deployed: the tiers a network away do not run on the sidecar's cores.
    pin: bool,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            connections: 50,
            secs: 5,
            keys: 1000,
            value_bytes: 200,
            pool: 16,
            rounds: 3,
            only_batch: false,
            only_unix: false,
            only_put: false,
            only_network: false,
            delay_ms: 0.25,
            only_pinned: false,
            only_tcp: false,
            pinned_clients: 32,
            pin: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue;
            }
            if flag == "--pin" {
                a.pin = true;
                continue;
            }
            let mut v = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--connections" => a.connections = v().parse().unwrap(),
                "--secs" => a.secs = v().parse().unwrap(),
                "--keys" => a.keys = v().parse().unwrap(),
                "--value-bytes" => a.value_bytes = v().parse().unwrap(),
                "--pool" => a.pool = v().parse().unwrap(),
                "--rounds" => a.rounds = v().parse().unwrap(),
                "--only" => match v().as_str() {
                    "batch" => a.only_batch = true,
                    "unix" => a.only_unix = true,
                    "put" => a.only_put = true,
                    "network" => a.only_network = true,
                    "pinned" => a.only_pinned = true,
                    "tcp" => a.only_tcp = true,
                    other => {
                        panic!("--only takes batch, unix, put, network, pinned or tcp, not {other}")
                    }
                },
                "--clients" => a.pinned_clients = v().parse().unwrap(),
                "--delay-ms" => a.delay_ms = v().parse().unwrap(),
                other => panic!("unknown option {other}"),
            }
        }
        a
    }
}

/// Throughput and latency percentiles of one measurement.
#[derive(Clone, Debug)]
struct Figures {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// syncar runs: reads that skipped L1 during the run because a feed was down.
    bypassed: Option<u64>,
    /// syncar runs: the share of reads answered by L1.
    from_l1: Option<f64>,
}

impl Figures {
    fn json(&self) -> Value {
        json!({"name": self.name, "rps": self.rps, "p50_ms": self.p50_ms,
               "p99_ms": self.p99_ms, "p999_ms": self.p999_ms, "l1_bypassed": self.bypassed,
               "from_l1": self.from_l1})
    }
}

/// The syncar processes of a run, killed however the run ends (a failed assertion included).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads that skipped L1 because a feed was down, and reads answered by L1, by Redis and by
/// Postgres, from the `/metrics` of the instance on `port`.
fn read_counts(port: u16) -> [u64; 4] {
    use std::io::{Read, Write};
    let mut text = String::new();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to syncar");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.read_to_string(&mut text).unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    [
        value("syncar_l1_bypassed_reads_total"),
        value("syncar_cache_hits_total{tier=\"l1\"}"),
        value("syncar_cache_hits_total{tier=\"l2\"}"),
        value("syncar_cache_hits_total{tier=\"db\"}"),
    ]
}

fn need(tool: &str, package: &str) -> PathBuf {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.unwrap_or_else(|| panic!("{tool} not found: install it with `apt-get install {package}`"))
}

fn pgbench() -> PathBuf {
    let bindir = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_default();
    let p = bindir.join("pgbench");
    if p.exists() {
        p
    } else {
        need("pgbench", "postgresql")
    }
}

/// `syncar migrate` with `config` against `pg_url`; panics with its stderr if it fails.
fn migrate(bin: &Path, config: &Path, pg_url: &str) {
    let migrated = Command::new(bin)
        .args(["migrate", "--config"])
        .arg(config)
        .env("SYNCAR_POSTGRES_URL", pg_url)
        .output()
        .expect("syncar migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
}

/// A `syncar relay` with `config` for database `db` on the Postgres at `pg_port`, its output
/// thrown away, killed when dropped; returns once it streams from the database's slot (which
/// is first advanced to the current WAL position: what earlier runs left there is not this
/// one's to decode).
fn start_relay(bin: &Path, config: &Path, pg_port: u16, db: &str, redis_url: &str) -> Children {
    let slot = format!("syncar_{db}");
    psql(
        pg_port,
        db,
        &format!("SELECT pg_replication_slot_advance('{slot}', pg_current_wal_lsn())"),
    );
    let relay = Children(vec![Command::new(bin)
        .args(["relay", "--config"])
        .arg(config)
        .env(
            "SYNCAR_POSTGRES_URL",
            format!("postgres://postgres@127.0.0.1:{pg_port}/{db}"),
        )
        .env("SYNCAR_REDIS_URL", redis_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start syncar relay")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let active = format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'");
    while psql(pg_port, db, &active) != "t" {
        assert!(
            Instant::now() < deadline,
            "the relay never streamed from slot {slot}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    relay
}

/// Each variant's median round (by throughput), from rounds that each ran every variant in
/// the same order.
fn median_rounds(rounds: Vec<Vec<Figures>>) -> Vec<Figures> {
    (0..rounds[0].len())
        .map(|v| {
            let mut runs: Vec<Figures> = rounds.iter().map(|r| r[v].clone()).collect();
            runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            runs.swap_remove(runs.len() / 2)
        })
        .collect()
}

/// A JSON document of about `bytes` bytes: `{"v":"xxx..."}`.
fn document(bytes: usize) -> String {
    format!("{{\"v\":\"{}\"}}", "x".repeat(bytes.saturating_sub(12)))
}

/// Starts syncar; its warnings go to `syncar-{port}.log` beside the config.
fn spawn_syncar(bin: &Path, config: &Path, port: u16, pg: &str, redis: &str) -> Child {
    let log = config.with_file_name(format!("syncar-{port}.log"));
    Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("SYNCAR_LISTEN", format!("127.0.0.1:{port}"))
        .env("SYNCAR_POSTGRES_URL", pg)
        .env("SYNCAR_REDIS_URL", redis)
        .env("SYNCAR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the syncar log"))
        .spawn()
        .expect("start syncar")
}

fn wait_ready(port: u16) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        if text.contains("\"ready\":true") && text.contains("\"l1_in_use\":true") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "syncar on {port} never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--only tcp`: an L1 hit over loopback TCP with `wrk` against `redis-benchmark` GET on the
/// same Redis, interleaved for `--rounds` rounds: syncar with two workers under wrk's two
/// threads (the other rows' setup), and with one worker under one thread, as Redis (one
/// thread) runs under `redis-benchmark` (one thread). Medians of the rounds, and each
/// round's ratios.
fn tcp_rows(two: u16, one: u16, redis: &servers::RedisServer, args: &Args, out: &Path) {
    let (c, s, k) = (args.connections, args.secs, args.keys);
    let mut rows: Vec<[Figures; 3]> = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let r = redis_benchmark(redis.port, args);
        let w2 = wrk_threads(
            "syncar GET, L1 hit, 2 workers, wrk -t2",
            two,
            "GET",
            "",
            k,
            c,
            2,
            s,
            out,
        );
        let w1 = wrk_threads(
            "syncar GET, L1 hit, 1 worker, wrk -t1",
            one,
            "GET",
            "",
            k,
            c,
            1,
            s,
            out,
        );
        rows.push([r, w2, w1]);
    }
    let median = |i: usize, f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(|r| f(&r[i])).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\n{:<44} {:>10} {:>9} {:>9}",
        "L1 hit over TCP and Redis GET (median)", "req/s", "p50 ms", "p99 ms"
    );
    for (i, name) in [
        "redis-benchmark GET",
        "syncar GET, L1 hit, 2 workers, wrk -t2",
        "syncar GET, L1 hit, 1 worker, wrk -t1",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "{:<44} {:>10.0} {:>9.3} {:>9.3}",
            name,
            median(i, |f| f.rps),
            median(i, |f| f.p50_ms),
            median(i, |f| f.p99_ms)
        );
    }
    for (n, r) in rows.iter().enumerate() {
        println!(
            "round {}: throughput / Redis: 2 workers {:.2}x (p99 {:.2}x), 1 worker {:.2}x (p99 {:.2}x)",
            n + 1,
            r[1].rps / r[0].rps,
            r[1].p99_ms / r[0].p99_ms,
            r[2].rps / r[0].rps,
            r[2].p99_ms / r[0].p99_ms
        );
    }
}

/// Runs wrk with a Lua script that picks random keys and prints the figures we need.
#[allow(clippy::too_many_arguments)] // one run's settings, read at the call sites
fn wrk(
    name: &str,
    port: u16,
    method: &str,
    body: &str,
    keys: usize,
    conns: usize,
    secs: u64,
    dir: &Path,
) -> Figures {
    wrk_threads(
        name,
        port,
        method,
        body,
        keys,
        conns,
        conns.min(2),
        secs,
        dir,
    )
}

/// [`wrk`] with `threads` threads.
#[allow(clippy::too_many_arguments)] // one run's settings, read at the call sites
fn wrk_threads(
    name: &str,
    port: u16,
    method: &str,
    body: &str,
    keys: usize,
    conns: usize,
    threads: usize,
    secs: u64,
    dir: &Path,
) -> Figures {
    wrk_on(
        name, port, "kv", method, body, keys, conns, threads, secs, dir,
    )
}

/// [`wrk_threads`] on the keys `k1`..`k{keys}` of `resource`, which may end in a query sent
/// with every request (`kv?consistency=eventual`).
#[allow(clippy::too_many_arguments)] // one run's settings, read at the call sites
pub(crate) fn wrk_on(
    name: &str,
    port: u16,
    resource: &str,
    method: &str,
    body: &str,
    keys: usize,
    conns: usize,
    threads: usize,
    secs: u64,
    dir: &Path,
) -> Figures {
    // Measure L1 only while it is in use: after a heavy Postgres run the feeds may still be
    // recovering (a poll slower than the lease takes a feed down).
    wait_ready(port);
    let before = read_counts(port);
    let (resource, query) = resource
        .split_once('?')
        .map_or((resource, String::new()), |(r, q)| (r, format!("?{q}")));
    let script = dir.join(format!("{}.lua", name.replace(' ', "_")));
    std::fs::write(
        &script,
        format!(
            r#"
local body = [[{body}]]
-- Every request formatted once, up front: formatting one per request in Lua cost the load
-- generator more CPU than syncar spends answering it, on the cores they share.
local requests = {{}}
init = function(args)
  for i = 1, {keys} do
    local path = "/v1/{resource}/k" .. i .. "{query}"
    if "{method}" == "PUT" then
      requests[i] = wrk.format("PUT", path, {{["Content-Type"] = "application/json"}}, body)
    else
      requests[i] = wrk.format("GET", path)
    end
  end
end
request = function()
  return requests[math.random(1, {keys})]
end
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format("RESULT %d %d %d %f %f %f\n", summary.requests, errors, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
  io.write(string.format("ERRORS connect %d, read %d, write %d, status %d, timeout %d\n",
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#
        ),
    )
    .unwrap();
    let out = Command::new(need("wrk", "wrk"))
        .args([
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("wrk printed no result:\n{text}"));
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let errors = text.lines().find(|l| l.starts_with("ERRORS")).unwrap_or("");
    assert_eq!(
        f[1],
        0.0,
        "{name}: wrk saw {} errors ({errors}); syncar's warnings are in {}",
        f[1],
        dir.display()
    );
    let after = read_counts(port);
    Figures {
        name: name.into(),
        rps: f[0] / (f[2] / 1e6),
        p50_ms: f[3] / 1000.0,
        p99_ms: f[4] / 1000.0,
        p999_ms: f[5] / 1000.0,
        bypassed: Some(after[0] - before[0]),
        from_l1: (method == "GET").then(|| {
            let reads: u64 = (1..4).map(|i| after[i] - before[i]).sum();
            (after[1] - before[1]) as f64 / reads.max(1) as f64
        }),
    }
}

fn redis_benchmark(port: u16, args: &Args) -> Figures {
    redis_benchmark_at(port, None, args)
}

/// `redis-benchmark` GET on `port`, or on the Unix socket `socket` when given.
fn redis_benchmark_at(port: u16, socket: Option<&Path>, args: &Args) -> Figures {
    // About as long as the other runs.
    redis_benchmark_with(
        port,
        socket,
        args.connections,
        60_000 * args.secs as usize,
        true,
        args,
    )
}

/// `redis-benchmark` GET with `connections` clients and `requests` requests in all, after
/// SETting the keys first when `prefill`.
fn redis_benchmark_with(
    port: u16,
    socket: Option<&Path>,
    connections: usize,
    requests: usize,
    prefill: bool,
    args: &Args,
) -> Figures {
    let rb = need("redis-benchmark", "redis-tools");
    let common = |test: &str, n: usize| {
        let mut c = Command::new(&rb);
        match socket {
            Some(path) => c.arg("-s").arg(path),
            None => c.args(["-p", &port.to_string()]),
        };
        c.args(["-c", &connections.to_string()])
            .args([
                "-n",
                &n.to_string(),
                "-t",
                test,
                "-d",
                &args.value_bytes.to_string(),
            ])
            .args(["-r", &args.keys.to_string()])
            .output()
            .expect("run redis-benchmark")
    };
    if prefill {
        common("set", args.keys * 20);
    }
    let out = common("get", requests);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("throughput summary: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no throughput in redis-benchmark output:\n{text}"));
    // "99.900% <= 1.903 milliseconds (cumulative count 19979)"
    let dist: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once("% <= ")?;
            let ms = rest.split_whitespace().next()?;
            Some((pct.parse().ok()?, ms.parse().ok()?))
        })
        .collect();
    let at = |q: f64| {
        dist.iter()
            .find(|(p, _)| *p >= q)
            .map_or(f64::NAN, |(_, ms)| *ms)
    };
    Figures {
        name: "redis-benchmark GET".into(),
        rps,
        p50_ms: at(50.0),
        p99_ms: at(99.0),
        p999_ms: at(99.9),
        bypassed: None,
        from_l1: None,
    }
}

/// pgbench with a custom script; percentiles from its per-transaction log.
fn pgbench_run(
    name: &str,
    pg_port: u16,
    db: &str,
    script: &str,
    clients: usize,
    secs: u64,
    dir: &Path,
) -> Figures {
    let file = dir.join(format!("{}.sql", name.replace(' ', "_")));
    std::fs::write(&file, script).unwrap();
    let logs = dir.join(format!("log_{}", name.replace(' ', "_")));
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let out = Command::new(pgbench())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg_port.to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args([
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &secs.to_string(), "-f"])
        .arg(&file)
        .args(["--log", "--log-prefix"])
        .arg(logs.join("tx"))
        .arg(db)
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let tps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{text}"));
    let mut lat: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap().flatten() {
        let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
        lat.extend(
            content
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((q * (lat.len() - 1) as f64).round() as usize).min(lat.len() - 1)] / 1000.0
    };
    Figures {
        name: name.into(),
        rps: tps,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        bypassed: None,
        from_l1: None,
    }
}

/// An L1 hit over syncar's Unix socket and over TCP (one client for both), and Redis GET
/// over its Unix socket and over TCP (redis-benchmark), side by side.
fn unix_rows(
    tcp_port: u16,
    syncar_socket: &Path,
    redis: &servers::RedisServer,
    redis_socket: &Path,
    args: &Args,
) {
    let (c, s, k) = (args.connections, args.secs, args.keys);
    // Warm L1 over TCP first.
    unix::get_run(&unix::Target::Tcp(tcp_port), c, k, 2);
    let tcp = unix::get_run(&unix::Target::Tcp(tcp_port), c, k, s);
    let uds = unix::get_run(&unix::Target::Unix(syncar_socket.to_path_buf()), c, k, s);
    let redis_tcp = redis_benchmark_at(redis.port, None, args);
    let redis_uds = redis_benchmark_at(redis.port, Some(redis_socket), args);
    println!(
        "\n{:<34} {:>10} {:>9} {:>9}",
        "L1 hit and Redis GET", "req/s", "p50 ms", "p99 ms"
    );
    for (name, rps, p50, p99) in [
        (
            "syncar L1 hit, TCP (hyper client)",
            tcp.rps,
            tcp.p50_ms,
            tcp.p99_ms,
        ),
        (
            "syncar L1 hit, Unix socket",
            uds.rps,
            uds.p50_ms,
            uds.p99_ms,
        ),
        (
            "redis-benchmark GET, TCP",
            redis_tcp.rps,
            redis_tcp.p50_ms,
            redis_tcp.p99_ms,
        ),
        (
            "redis-benchmark GET, Unix socket",
            redis_uds.rps,
            redis_uds.p50_ms,
            redis_uds.p99_ms,
        ),
    ] {
        println!("{name:<34} {rps:>10.0} {p50:>9.3} {p99:>9.3}");
    }
    println!(
        "syncar Unix / TCP {:.2}x; Redis Unix / TCP {:.2}x; syncar / Redis on Unix sockets {:.2}x (goal >= 1.2), p99 {:.2}x",
        uds.rps / tcp.rps,
        redis_uds.rps / redis_tcp.rps,
        uds.rps / redis_uds.rps,
        uds.p99_ms / redis_uds.p99_ms
    );
}

/// The batch rows as a table, with the ratios the goals are stated in.
fn print_batch(rows: &[batch::Row]) {
    println!(
        "\n{:<10} {:<28} {:>12} {:>14}",
        "tier", "100 keys as", "keys/s", "p99 call ms"
    );
    for r in rows {
        println!(
            "{:<10} {:<28} {:>12.0} {:>14.3}",
            r.tier, r.way, r.keys_per_sec, r.p99_call_ms
        );
    }
    for tier in ["l1", "redis", "postgres"] {
        let of = |way: &str| {
            rows.iter()
                .find(|r| r.tier == tier && r.way == way)
                .map_or(f64::NAN, |r| r.keys_per_sec)
        };
        println!(
            "{tier}: batch / sequential GETs {:.1}x, batch / 50 concurrent GETs {:.1}x",
            of("batch of 100") / of("100 sequential GETs"),
            of("batch of 100") / of("100 GETs on 50 connections"),
        );
    }
    println!("(goal: batch >= 10x sequential from L1, >= 5x from Postgres)");
}

/// `sql` on `database` of the Postgres on `port`, with psql from Postgres' own bindir.
/// Runs `sql` with psql against `database`; returns what it printed (unaligned, tuples
/// only), trimmed. Panics with psql's stderr if it fails.
fn psql(port: u16, database: &str, sql: &str) -> String {
    let bindir = pgbench().parent().unwrap().to_path_buf();
    let o = Command::new(bindir.join("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-d", database, "-c", sql])
        .output()
        .expect("psql");
    assert!(
        o.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn main() {
    delay::serve_if_asked();
    let args = Args::parse();
    // SYNCAR_BENCH_BIN: another build of syncar to measure (an earlier commit's, for a
    // before-and-after), instead of this one's.
    let bin = std::env::var_os("SYNCAR_BENCH_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_syncar")),
        PathBuf::from,
    );
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench-hot");
    std::fs::create_dir_all(&out).unwrap();
    need("wrk", "wrk");
    need("redis-benchmark", "redis-tools");
    pgbench();
    if args.only_network {
        network::run(&args, &bin, &out);
        return;
    }
    if args.only_pinned {
        pinned::run(&args, &bin, &out);
        return;
    }
    let servers = servers::servers();
    let redis = servers::RedisServer::start();
    let db = format!("hot_{}", std::process::id());
    let psql = |sql: &str, database: &str| psql(servers.pg_port, database, sql);
    psql(&format!("CREATE DATABASE {db}"), "postgres");
    let pg_url = format!("postgres://postgres@127.0.0.1:{}/{db}", servers.pg_port);

    let config = |name: &str, l1: bool, workers: usize| {
        let p = out.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "[server]\nworker_threads = {workers}\n[postgres]\npool_size = {}\n[redis]\nkey_prefix = \"{db}:\"\n[cache]\nl1 = {l1}\n[log]\nlevel = \"warn\"\n",
                args.pool
            ),
        )
        .unwrap();
        p
    };
    let (p1, p2, p3) = (
        servers::free_port(),
        servers::free_port(),
        servers::free_port(),
    );
    let sockets = tempfile::tempdir().unwrap();
    let syncar_socket = unix::socket(sockets.path(), "syncar.sock");
    let redis_socket = unix::socket(sockets.path(), "redis.sock");
    let redis_unix = servers::RedisServer::start_persistent(&[
        "--unixsocket",
        &redis_socket.to_string_lossy(),
        "--unixsocketperm",
        "700",
    ]);
    let l1_config = config("l1", true, 2);
    std::fs::write(
        &l1_config,
        std::fs::read_to_string(&l1_config).unwrap().replace(
            "[server]\n",
            &format!("[server]\nlisten_unix = \"{}\"\n", syncar_socket.display()),
        ),
    )
    .unwrap();
    let children = Children(vec![
        spawn_syncar(&bin, &l1_config, p1, &pg_url, &redis.url()),
        spawn_syncar(&bin, &config("l2", false, 2), p2, &pg_url, &redis.url()),
        spawn_syncar(&bin, &config("l1-1w", true, 1), p3, &pg_url, &redis.url()),
    ]);
    wait_ready(p1);
    wait_ready(p2);
    wait_ready(p3);

    // A value of the configured size, as JSON.
    let body = document(args.value_bytes);
    eprintln!(
        "hot-path benchmark: {} connections, {}-byte values, {} keys, {} s per run",
        args.connections,
        body.len(),
        args.keys,
        args.secs
    );
    psql(
        &format!(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '{body}'::jsonb FROM generate_series(1, {}) i",
            args.keys
        ),
        &db,
    );
    let (c, s) = (args.connections, args.secs);
    // Warm both instances (L1 and Redis), then measure.
    wrk("warm", p1, "GET", "", args.keys, c, 2, &out);
    wrk("warm", p2, "GET", "", args.keys, c, 2, &out);
    wrk("warm", p3, "GET", "", args.keys, c, 2, &out);
    // Batch gets against single GETs, while nothing writes (a write run's invalidations
    // would turn hits into misses).
    if args.only_unix {
        unix_rows(p1, &syncar_socket, &redis_unix, &redis_socket, &args);
        return;
    }
    if args.only_tcp {
        tcp_rows(p1, p3, &redis, &args, &out);
        return;
    }
    if args.only_put {
        let two = put::Target {
            port: p1,
            pid: children.0[0].id(),
            label: "",
        };
        let one = put::Target {
            port: p3,
            pid: children.0[2].id(),
            label: ", 1 worker",
        };
        let rows = put::rows(
            &two,
            &one,
            &body,
            args.keys,
            args.pool,
            s,
            (servers.pg_port, &db),
            &out,
        );
        put::print(&rows);
        let path = out.join("results-put.json");
        let rows: Vec<Value> = rows.iter().map(put::Row::json).collect();
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        println!("\nwrote {}", path.display());
        return;
    }
    let batch_rows = batch::rows(p1, p2, s);
    print_batch(&batch_rows);
    if args.only_batch {
        let path = out.join("results-batch.json");
        let rows: Vec<Value> = batch_rows.iter().map(batch::Row::json).collect();
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        println!("\nwrote {}", path.display());
        return;
    }
    let l1_hit = wrk("syncar GET, L1 hit", p1, "GET", "", args.keys, c, s, &out);
    // Before any write run: the invalidations of a write run reach every instance and would
    // turn this one's hits into misses while it catches up.
    let one_worker = wrk(
        "syncar GET, L1 hit, 1 worker",
        p3,
        "GET",
        "",
        args.keys,
        c,
        s,
        &out,
    );
    let mut reads = vec![
        l1_hit,
        wrk(
            "syncar GET, L2 (L1 off)",
            p2,
            "GET",
            "",
            args.keys,
            c,
            s,
            &out,
        ),
        redis_benchmark(redis.port, &args),
    ];
    reads.push(pgbench_run(
        "postgres PK select",
        servers.pg_port,
        &db,
        &format!(
            "\\set id random(1, {})\nSELECT value FROM syncar_kv WHERE key = 'k' || :id;\n",
            args.keys
        ),
        c,
        s,
        &out,
    ));
    let writes = vec![
        wrk("syncar PUT", p1, "PUT", &body, args.keys, args.pool, s, &out),
        pgbench_run(
            "postgres upsert+commit",
            servers.pg_port,
            &db,
            &format!(
                "\\set id random(1, {})\nINSERT INTO syncar_kv (key, value) VALUES ('k' || :id, '{body}') \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;\n",
                args.keys
            ),
            args.pool,
            s,
            &out,
        ),
    ];
    reads.push(one_worker);
    drop(children);

    // What the triggers cost plain-SQL writers: one table (syncar_kv), vacuumed before every
    // run, with its triggers switched off, the version stamp alone, or each source's. (Two
    // tables, one bloated by the runs above, measured the tables as much as the triggers.)
    let no_triggers = || psql("ALTER TABLE syncar_kv DISABLE TRIGGER USER", &db);
    let stamp_only = || {
        psql(
            "ALTER TABLE syncar_kv DISABLE TRIGGER USER; \
             ALTER TABLE syncar_kv ENABLE ALWAYS TRIGGER syncar_stamp_version",
            &db,
        )
    };
    let vacuum = || psql("VACUUM syncar_kv", &db);
    // With the wal source, a relay decodes the slot while writers run: its walsender's work
    // is on the same Postgres and counts.
    let relay_config = out.join("relay.toml");
    std::fs::write(
        &relay_config,
        format!(
            "[redis]\nkey_prefix = \"{db}:\"\n[feeds]\npostgres_source = \"wal\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let decoding_relay = || start_relay(&bin, &relay_config, servers.pg_port, &db, &redis.url());
    // Each source's triggers in turn (the migration rewrites them), interleaved with the plain
    // table at every client count so that drifts of the machine hit all alike.
    let migrate = |source: &str| {
        let path = out.join(format!("{source}.toml"));
        std::fs::write(&path, format!("[feeds]\npostgres_source = \"{source}\"\n")).unwrap();
        migrate(&bin, &path, &pg_url);
    };
    let update = |table: &str| {
        format!(
            "\\set id random(1, {})\nUPDATE {table} SET value = '{body}' WHERE key = 'k' || :id;\n",
            args.keys
        )
    };
    // Every variant in turn, the same workload: without triggers, the version stamp alone,
    // wal with the slot not read (the writers' path), wal with a relay decoding meanwhile,
    // changes_log, notify.
    let variants = |run: &dyn Fn(&str) -> Figures| -> Vec<Figures> {
        let measure = |name: &str| {
            vacuum();
            run(name)
        };
        no_triggers();
        let without = measure("no triggers");
        stamp_only();
        let stamped = measure("version stamp only");
        migrate("wal");
        let wal_path = measure("wal triggers, slot not read");
        let relay = decoding_relay();
        let walled = measure("wal triggers + relay");
        drop(relay);
        migrate("changes_log");
        let logged = measure("changes_log triggers");
        migrate("notify");
        let notified = measure("notify triggers");
        vec![without, stamped, wal_path, walled, logged, notified]
    };
    // Rounds interleaved, so that drifts of a shared machine hit every variant alike; the
    // median round of each.
    let medians = |run: &dyn Fn(&str) -> Figures| -> Vec<Figures> {
        median_rounds((0..args.rounds.max(1)).map(|_| variants(run)).collect())
    };
    let mut triggers = Vec::new();
    for clients in [1, 8, 32] {
        let run = |name: &str| {
            pgbench_run(
                &format!("update {clients} clients, {name}"),
                servers.pg_port,
                &db,
                &update("syncar_kv"),
                clients,
                s,
                &out,
            )
        };
        let m = medians(&run);
        triggers.push((
            clients,
            m[0].clone(),
            m[1].clone(),
            m[2].clone(),
            m[3].clone(),
            m[4].clone(),
            m[5].clone(),
        ));
    }
    // Bulk statements: 50 rows per UPDATE, one client (no lock waits between clients).
    let bulk_update = |table: &str| {
        format!(
            "\\set b random(0, {})\nUPDATE {table} SET value = '{body}' WHERE key IN \
             (SELECT 'k' || g FROM generate_series(:b * 50 + 1, :b * 50 + 50) g);\n",
            (args.keys / 50).max(1) - 1
        )
    };
    let bulk_run = |name: &str| {
        pgbench_run(
            &format!("50-row update, {name}"),
            servers.pg_port,
            &db,
            &bulk_update("syncar_kv"),
            1,
            s,
            &out,
        )
    };
    let bulk = medians(&bulk_run);
    let (bulk_without, bulk_stamped, bulk_wal_path, bulk_walled, bulk_logged, bulk_notified) = (
        bulk[0].clone(),
        bulk[1].clone(),
        bulk[2].clone(),
        bulk[3].clone(),
        bulk[4].clone(),
        bulk[5].clone(),
    );

    println!();
    println!(
        "{:<30} {:>10} {:>9} {:>9} {:>9} {:>12} {:>8}",
        "reads", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "L1 bypassed", "from L1"
    );
    for f in reads.iter().chain(&writes) {
        println!(
            "{:<30} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>12} {:>8}",
            f.name,
            f.rps,
            f.p50_ms,
            f.p99_ms,
            f.p999_ms,
            f.bypassed.map_or(String::new(), |b| b.to_string()),
            f.from_l1
                .map_or(String::new(), |r| format!("{:.1}%", r * 100.0))
        );
    }
    let ratio = |a: &Figures, b: &Figures| a.rps / b.rps;
    println!(
        "\nratios: L1 hit / Redis GET throughput {:.2} (goal >= 1.2), p99 {:.2}x; with 1 worker {:.2}, p99 {:.2}x; L1 hit / Postgres select {:.2}; L2 / Redis {:.2}",
        ratio(&reads[0], &reads[2]),
        reads[0].p99_ms / reads[2].p99_ms,
        ratio(&reads[4], &reads[2]),
        reads[4].p99_ms / reads[2].p99_ms,
        ratio(&reads[0], &reads[3]),
        ratio(&reads[1], &reads[2]),
    );
    println!(
        "PUT / plain upsert latency: p50 {:.2}x, p99 {:.2}x (goal <= 1.2)",
        writes[0].p50_ms / writes[1].p50_ms,
        writes[0].p99_ms / writes[1].p99_ms
    );
    println!(
        "\n{:<8} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>11} {:>7} {:>9} {:>7}",
        "clients",
        "no trig.",
        "stamp",
        "loss",
        "wal path",
        "loss",
        "wal+relay",
        "loss",
        "changes_log",
        "loss",
        "notify",
        "loss"
    );
    let mut trigger_json = Vec::new();
    for (clients, without, stamped, wal_path, walled, logged, notified) in &triggers {
        let loss = |with: &Figures| 1.0 - with.rps / without.rps;
        println!(
            "{clients:<8} {:>9.0} {:>9.0} {:>6.1}% {:>9.0} {:>6.1}% {:>9.0} {:>6.1}% {:>11.0} {:>6.1}% {:>9.0} {:>6.1}%",
            without.rps,
            stamped.rps,
            loss(stamped) * 100.0,
            wal_path.rps,
            loss(wal_path) * 100.0,
            walled.rps,
            loss(walled) * 100.0,
            logged.rps,
            loss(logged) * 100.0,
            notified.rps,
            loss(notified) * 100.0,
        );
        trigger_json.push(json!({
            "clients": clients, "without": without.json(),
            "stamp_only": stamped.json(), "stamp_only_loss": loss(stamped),
            "wal_slot_not_read": wal_path.json(), "wal_slot_not_read_loss": loss(wal_path),
            "wal": walled.json(), "wal_loss": loss(walled),
            "changes_log": logged.json(), "changes_log_loss": loss(logged),
            "notify": notified.json(), "notify_loss": loss(notified),
        }));
    }
    println!(
        "(goal: wal loses at most 10% at 32 clients. \"wal path\": the triggers and logical WAL alone, \
         the slot not read; \"wal+relay\": a syncar relay decoding meanwhile, its walsender on \
         the same Postgres and the relay and Redis on the same cores as the writers)"
    );
    let bulk_loss = |with: &Figures| 1.0 - with.rps / bulk_without.rps;
    println!(
        "50-row UPDATEs, 1 client: {:.0} statements/s without triggers, stamp only {:.0} (loss {:.1}%), wal path {:.0} (loss {:.1}%), wal+relay {:.0} (loss {:.1}%), changes_log {:.0} (loss {:.1}%), notify {:.0} (loss {:.1}%)",
        bulk_without.rps,
        bulk_stamped.rps,
        bulk_loss(&bulk_stamped) * 100.0,
        bulk_wal_path.rps,
        bulk_loss(&bulk_wal_path) * 100.0,
        bulk_walled.rps,
        bulk_loss(&bulk_walled) * 100.0,
        bulk_logged.rps,
        bulk_loss(&bulk_logged) * 100.0,
        bulk_notified.rps,
        bulk_loss(&bulk_notified) * 100.0
    );
    print_batch(&batch_rows);
    let report = json!({
        "batch_get": batch_rows.iter().map(batch::Row::json).collect::<Vec<_>>(),
        "reads": reads.iter().map(Figures::json).collect::<Vec<_>>(),
        "writes": writes.iter().map(Figures::json).collect::<Vec<_>>(),
        "triggers": trigger_json,
        "bulk_50_rows": {
            "without": bulk_without.json(),
            "stamp_only": bulk_stamped.json(), "stamp_only_loss": bulk_loss(&bulk_stamped),
            "wal_slot_not_read": bulk_wal_path.json(), "wal_slot_not_read_loss": bulk_loss(&bulk_wal_path),
            "wal": bulk_walled.json(), "wal_loss": bulk_loss(&bulk_walled),
            "changes_log": bulk_logged.json(), "changes_log_loss": bulk_loss(&bulk_logged),
            "notify": bulk_notified.json(), "notify_loss": bulk_loss(&bulk_notified),
        },
    });
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}
