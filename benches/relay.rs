//! Relay throughput: how many row changes per second one relay carries before its lag grows,
//! where a busy primary outgrows it.
//!
//! `make bench-relay` (or `cargo bench --bench relay -- [options]`) starts its own Redis, a
//! database on the benchmark Postgres (`wal_level = logical`, commits with
//! `synchronous_commit = on` so the WAL reaches the relay at once), `--keys` rows in
//! `syncar_kv` and one syncar process of the release binary on the `wal` source (the relay).
//! Then, for each rate of `--rates` (row changes per second), `--writers` connections run
//! multi-row `UPDATE`s of `--rows-per-statement` keys each, paced to the rate, for `--secs`,
//! and after each commit read `pg_current_wal_lsn()` (at or past the commit's end).
//! Meanwhile a sampler asks the instance for a key held in its L1 every millisecond and
//! reads `X-Syncar-LSN`: the WAL position whose every change is applied to Redis, published
//! and applied there. A commit's lag is the first sample at or past its LSN, less the
//! moment the writer saw the commit (within a millisecond). With one writer (the default)
//! that position is the commit's own end; with several it may fall inside another writer's
//! transaction still running, whose commit the lag then includes, so several writers
//! overstate it. Reported per rate: the rate achieved, lag
//! p50, p99 and max, the drain (last commit to everything applied), and the syncar
//! process' CPU per row change.
//!
//! Goal (issue #27): 50,000 row changes per second with lag p99 at most 10 ms, and everything
//! applied within 200 ms of the last commit. Options (defaults in brackets): `--rates
//! 5000,10000,20000,50000`, `--writers 1`, `--rows-per-statement 100`, `--secs 5`, `--keys
//! 100000`.

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

#[derive(Debug)]
struct Args {
    rates: Vec<f64>,
    writers: usize,
    rows_per_statement: usize,
    secs: f64,
    keys: usize,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            rates: vec![5_000.0, 10_000.0, 20_000.0, 50_000.0],
            writers: 1,
            rows_per_statement: 100,
            secs: 5.0,
            keys: 100_000,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue;
            }
            let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--rates" => a.rates = value().split(',').map(|r| r.parse().unwrap()).collect(),
                "--writers" => a.writers = value().parse().unwrap(),
                "--rows-per-statement" => a.rows_per_statement = value().parse().unwrap(),
                "--secs" => a.secs = value().parse().unwrap(),
                "--keys" => a.keys = value().parse().unwrap(),
                other => panic!("unknown option {other}"),
            }
        }
        assert!(a.keys >= a.rows_per_statement * a.writers, "--keys too few");
        a
    }
}

/// The syncar process, killed however the benchmark ends.
struct Syncar(Child);

impl Drop for Syncar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A keep-alive HTTP connection asking for one path; returns `X-Syncar-LSN` as a number.
struct Probe {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Probe {
    async fn connect(port: u16) -> Probe {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Probe { sender }
    }

    async fn applied(&mut self) -> Option<u64> {
        self.sender.ready().await.ok()?;
        let req = http::Request::builder()
            .uri("/v1/kv/probe")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.sender.send_request(req).await.ok()?;
        let lsn = resp
            .headers()
            .get("x-syncar-lsn")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_lsn);
        let _ = resp.into_body().collect().await;
        lsn
    }
}

/// `X/Y` (Postgres' text form of an LSN) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// CPU time of `pid` so far (user + system), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, tail)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_syncar"));
    let out = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench-relay");
    std::fs::create_dir_all(&out).unwrap();
    let servers = servers::servers();
    let redis = servers::RedisServer::start();
    let db = format!("relay_{}", std::process::id());
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", servers.pg_port);
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for sql in [
        format!("CREATE DATABASE {db}"),
        format!("ALTER DATABASE {db} SET synchronous_commit = on"),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", servers.pg_port);
    let config = out.join("syncar.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\npool_size = 4\n[redis]\nkey_prefix = \"{db}:\"\n\
             [feeds]\npostgres_source = \"wal\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    let port = servers::free_port();
    let syncar = Syncar(
        Command::new(&bin)
            .args(["serve", "--config"])
            .arg(&config)
            .env("SYNCAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("SYNCAR_POSTGRES_URL", &url)
            .env("SYNCAR_REDIS_URL", redis.url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(out.join("syncar.log")).unwrap())
            .spawn()
            .expect("start syncar"),
    );
    let pid = syncar.0.id();
    let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Ready once the relay has created the schema and a read is answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut probe = loop {
        if pg
            .execute(
                "INSERT INTO syncar_kv (key, value) VALUES ('probe', '0') ON CONFLICT DO NOTHING",
                &[],
            )
            .await
            .is_ok()
        {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
                drop(stream);
                let mut p = Probe::connect(port).await;
                if p.applied().await.is_some() {
                    break p;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "syncar never answered with its position"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    pg.execute(
        "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '0' FROM generate_series(1, $1::int8) i",
        &[&(args.keys as i64)],
    )
    .await
    .unwrap();
    // The seed's changes applied before anything is measured.
    let seeded: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let seeded = parse_lsn(&seeded).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.applied().await.is_none_or(|lsn| lsn < seeded) {
        assert!(
            Instant::now() < deadline,
            "the seed never reached the instance"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "relay benchmark: {} writers, {} rows per UPDATE, {} s per rate, rates {:?} row changes/s",
        args.writers, args.rows_per_statement, args.secs, args.rates
    );

    // Every millisecond: (when, the position the instance had applied).
    let samples: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let sampling = {
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                if let Some(lsn) = probe.applied().await {
                    samples.lock().unwrap().push((Instant::now(), lsn));
                }
            }
        })
    };

    let mut rows = Vec::new();
    for &rate in &args.rates {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.lock().unwrap().clear();
        let cpu0 = cpu_secs(pid);
        let started = Instant::now();
        let statements_per_sec = rate / args.rows_per_statement as f64 / args.writers as f64;
        let mut tasks = Vec::new();
        for w in 0..args.writers {
            let (url, args_rows, keys, secs, writers) = (
                url.clone(),
                args.rows_per_statement,
                args.keys,
                args.secs,
                args.writers,
            );
            tasks.push(tokio::spawn(async move {
                let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let update = pg
                    .prepare("UPDATE syncar_kv SET value = to_jsonb($2::int8) WHERE key = ANY($1)")
                    .await
                    .unwrap();
                let lsn = pg
                    .prepare("SELECT pg_current_wal_lsn()::text")
                    .await
                    .unwrap();
                let mut tick =
                    tokio::time::interval(Duration::from_secs_f64(1.0 / statements_per_sec));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut commits: Vec<(Instant, u64)> = Vec::new();
                let mut changed = 0u64;
                let mut n = 0usize;
                while started.elapsed().as_secs_f64() < secs {
                    tick.tick().await;
                    // Each writer its own slice of the keys, statement after statement.
                    let first = (w * (keys / writers) + n * args_rows) % (keys - args_rows);
                    let batch: Vec<String> = (first..first + args_rows)
                        .map(|i| format!("k{}", i + 1))
                        .collect();
                    n += 1;
                    changed += pg.execute(&update, &[&batch, &(n as i64)]).await.unwrap();
                    let committed = Instant::now();
                    let at: String = pg.query_one(&lsn, &[]).await.unwrap().get(0);
                    commits.push((committed, parse_lsn(&at).unwrap()));
                }
                (commits, changed)
            }));
        }
        let mut commits = Vec::new();
        let mut changed = 0u64;
        for t in tasks {
            let (c, n) = t.await.unwrap();
            commits.extend(c);
            changed += n;
        }
        let writing = started.elapsed().as_secs_f64();
        let last_commit = commits.iter().map(|c| c.0).max().unwrap();
        let last_lsn = commits.iter().map(|c| c.1).max().unwrap();
        // Drained: the instance has applied the last commit's position.
        let drain_deadline = Instant::now() + Duration::from_secs(30);
        let drained = loop {
            let reached = samples
                .lock()
                .unwrap()
                .iter()
                .find(|(_, lsn)| *lsn >= last_lsn)
                .map(|(at, _)| *at);
            if let Some(at) = reached {
                break Some(at.saturating_duration_since(last_commit));
            }
            if Instant::now() > drain_deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let cpu = cpu_secs(pid) - cpu0;
        let taken = samples.lock().unwrap().clone();
        let mut lags: Vec<f64> = commits
            .iter()
            .filter_map(|(at, lsn)| {
                let i = taken.partition_point(|(_, applied)| applied < lsn);
                taken
                    .get(i)
                    .map(|(seen, _)| seen.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        lags.sort_by(f64::total_cmp);
        let achieved = changed as f64 / writing;
        let row = json!({
            "target_rows_per_sec": rate,
            "achieved_rows_per_sec": achieved,
            "commits": commits.len(),
            "lag_p50_ms": percentile(&lags, 0.5),
            "lag_p99_ms": percentile(&lags, 0.99),
            "lag_max_ms": percentile(&lags, 1.0),
            "drain_ms": drained.map(|d| d.as_secs_f64() * 1000.0),
            "syncar_cpu_us_per_change": cpu * 1e6 / changed.max(1) as f64,
            "syncar_cpu_share": cpu / (writing + drained.map_or(0.0, |d| d.as_secs_f64())),
        });
        eprintln!("{row}");
        rows.push(row);
    }
    sampling.abort();

    println!(
        "\n{:>12} {:>12} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9}",
        "target/s",
        "achieved/s",
        "commits",
        "lag p50",
        "lag p99",
        "lag max",
        "drain",
        "CPU µs/chg",
        "CPU %"
    );
    for r in &rows {
        let ms = |k: &str| {
            r[k].as_f64()
                .map_or("-".to_string(), |v| format!("{v:.1}ms"))
        };
        println!(
            "{:>12.0} {:>12.0} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12.1} {:>8.0}%",
            r["target_rows_per_sec"].as_f64().unwrap(),
            r["achieved_rows_per_sec"].as_f64().unwrap(),
            r["commits"],
            ms("lag_p50_ms"),
            ms("lag_p99_ms"),
            ms("lag_max_ms"),
            ms("drain_ms"),
            r["syncar_cpu_us_per_change"].as_f64().unwrap(),
            r["syncar_cpu_share"].as_f64().unwrap() * 100.0
        );
    }
    let path = out.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"args": format!("{args:?}"), "rates": rows})).unwrap(),
    )
    .unwrap();
    println!("\nwrote {}", path.display());
}
