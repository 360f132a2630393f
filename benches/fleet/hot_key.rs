//! `--only hot-key`: what a plain-SQL write to a key every instance reads costs Postgres, with
//! fill leases (`cache.fill_lease = "100ms"`, the default) and without (`"0s"`), in one run.
//!
//! For each setting: a fleet of `--instances` on a database of its own (`wal` source), one
//! key read through every instance (so each L1 and Redis hold it), then `--hot-rounds`
//! rounds of: a plain-SQL `UPDATE` of the key (committed synchronously), a pause of
//! [`SETTLE`] so that every instance has the change (the relay leaves a tombstone in Redis
//! and every L1), then one `GET` of the key through every instance at once: the moment every
//! pod misses the same key. It reports Postgres reads per write (the instances'
//! `syncar_cache_hits_total{tier="db"}`, summed, before and after, over the rounds: one per
//! load, however many requests joined it), how the reads were answered, and the p50 and p99
//! of their latency.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};

use super::{Args, Fleet, Http, Source};

/// From a write's commit to the reads: the relay's delivery to every instance takes a few
/// ms (`make bench-fleet`, "commit to eviction").
const SETTLE: Duration = Duration::from_millis(300);

/// One setting's figures.
struct HotKey {
    lease: &'static str,
    rounds: usize,
    pg_reads: u64,
    answered: BTreeMap<String, usize>,
    latencies_ms: Vec<f64>,
}

impl HotKey {
    fn reads_per_write(&self) -> f64 {
        self.pg_reads as f64 / self.rounds as f64
    }

    fn percentile(&self, q: f64) -> f64 {
        let i = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[i]
    }
}

/// Runs both settings and prints and writes their figures (`target/bench-fleet/hot-key.json`).
pub async fn run(args: &Args, bin: &Path, pg_port: u16, out: &Path) {
    let mut results = Vec::new();
    for (n, lease) in ["100ms", "0s"].into_iter().enumerate() {
        results.push(one(args, bin, pg_port, out, n, lease).await);
    }
    println!();
    println!(
        "hot key: {} instances, {} writes, every instance reading it at once after each",
        args.instances, args.hot_rounds
    );
    println!(
        "{:<14} {:>18} {:>9} {:>9}  answered by",
        "fill_lease", "postgres reads/wr", "p50 ms", "p99 ms"
    );
    for r in &results {
        println!(
            "{:<14} {:>18.1} {:>9.2} {:>9.2}  {:?}",
            r.lease,
            r.reads_per_write(),
            r.percentile(0.5),
            r.percentile(0.99),
            r.answered
        );
    }
    println!(
        "with leases / without: {:.2}x the Postgres reads, p99 {:.2}x (goal: at most 2 reads per write instead of {})",
        results[0].reads_per_write() / results[1].reads_per_write(),
        results[0].percentile(0.99) / results[1].percentile(0.99),
        args.instances
    );
    let report: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "fill_lease": r.lease, "instances": args.instances, "writes": r.rounds,
                "postgres_reads_per_write": r.reads_per_write(),
                "p50_ms": r.percentile(0.5), "p99_ms": r.percentile(0.99),
                "answered": r.answered,
            })
        })
        .collect();
    let path = out.join("hot-key.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("wrote {}", path.display());
}

async fn one(
    args: &Args,
    bin: &Path,
    pg_port: u16,
    out: &Path,
    n: usize,
    lease: &'static str,
) -> HotKey {
    let db = format!("fleet_hot_{}_{n}", std::process::id());
    let (mut fleet, redis_server, _watch) = Fleet::start(
        bin,
        pg_port,
        &db,
        args.instances,
        &out.join(format!("hot-key-{lease}")),
        (Source::Wal, &format!("fill_lease = \"{lease}\"\n")),
    )
    .await;
    let url = format!("{}?application_name=fleet-bench", fleet.pg_url);
    let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting the writer to {url}: {e}"));
    let driver = tokio::spawn(conn);
    pg.batch_execute(
        "SET synchronous_commit = on; INSERT INTO syncar_kv (key, value) VALUES ('hot', '0')",
    )
    .await
    .unwrap_or_else(|e| panic!("seeding the hot key: {e}"));
    let mut clients: Vec<Http> = fleet.ports.iter().map(|p| Http::new(*p)).collect();
    tokio::time::sleep(SETTLE).await;
    read_everywhere(&mut clients).await;

    let before = db_reads(&fleet.ports).await;
    let mut answered = BTreeMap::new();
    let mut latencies_ms = Vec::new();
    for round in 1..=args.hot_rounds {
        pg.execute(
            "UPDATE syncar_kv SET value = to_jsonb($1::int8) WHERE key = 'hot'",
            &[&(round as i64)],
        )
        .await
        .unwrap_or_else(|e| panic!("UPDATE of the hot key: {e}"));
        tokio::time::sleep(SETTLE).await;
        for (tier, ms) in read_everywhere(&mut clients).await {
            *answered.entry(tier).or_insert(0) += 1;
            latencies_ms.push(ms);
        }
    }
    let pg_reads = db_reads(&fleet.ports).await - before;
    latencies_ms.sort_by(f64::total_cmp);
    drop(pg);
    let _ = driver.await;
    fleet.stop_where(|_| true);
    drop(redis_server);
    eprintln!(
        "hot key, fill_lease {lease}: {pg_reads} Postgres reads for {} writes",
        args.hot_rounds
    );
    HotKey {
        lease,
        rounds: args.hot_rounds,
        pg_reads,
        answered,
        latencies_ms,
    }
}

/// One `GET /v1/kv/hot` through every instance at once: each one's `X-Cache` and latency.
async fn read_everywhere(clients: &mut [Http]) -> Vec<(String, f64)> {
    join_all(clients.iter_mut().map(|http| async move {
        let started = Instant::now();
        let (status, cache, body) = http
            .get("/v1/kv/hot")
            .await
            .unwrap_or_else(|e| panic!("reading the hot key: {e}"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        (
            cache.unwrap_or_default(),
            started.elapsed().as_secs_f64() * 1e3,
        )
    }))
    .await
}

/// Postgres reads the fleet made so far: `syncar_cache_hits_total{tier="db"}`, summed.
async fn db_reads(ports: &[u16]) -> u64 {
    let mut total = 0;
    for port in ports {
        let (_, _, body) = Http::new(*port)
            .get("/metrics")
            .await
            .unwrap_or_else(|e| panic!("scraping 127.0.0.1:{port}/metrics: {e}"));
        total += String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("syncar_cache_hits_total{tier=\"db\"} "))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap_or(0.0) as u64);
    }
    total
}
