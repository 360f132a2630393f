//! `--only put`: where a PUT's time goes, against the plain upsert-and-commit it wraps.
//!
//! Pairs of runs, PUT through syncar and the same upsert by pgbench (prepared, `INSERT ... ON
//! CONFLICT DO UPDATE` on the same table, triggers included), on one connection (the latency
//! of one write with nothing else running) and at the pool size (throughput), see [`rows`].
//! During
//! each, the CPU time of every process on the machine is sampled from `/proc/[pid]/stat`
//! every 50 ms and grouped: the syncar instance answering the PUTs, the other syncar
//! instances (their feeds, and the relay of the `wal` source, whichever instance holds it),
//! Postgres (every backend), Redis and the load generator. CPU per operation by group is the
//! breakdown: on these two shared cores, at the pool size, throughput (and so latency) is
//! total CPU per operation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{pgbench_run, wrk, Figures};

/// The groups CPU is reported by, in print order.
const GROUPS: [&str; 5] = [
    "syncar (answering)",
    "syncar (others)",
    "postgres",
    "redis",
    "load generator",
];

/// One run and the CPU each group spent per operation, in µs.
pub struct Row {
    figures: Figures,
    cpu_us: [f64; 5],
}

impl Row {
    pub fn json(&self) -> Value {
        let cpu: serde_json::Map<String, Value> = GROUPS
            .iter()
            .zip(self.cpu_us)
            .map(|(g, us)| (g.to_string(), json!(us)))
            .collect();
        json!({"run": self.figures.json(), "cpu_us_per_op": cpu})
    }
}

/// A syncar instance PUTs go to: its port and pid, and what distinguishes it in a row's name.
pub struct Target {
    pub port: u16,
    pub pid: u32,
    pub label: &'static str,
}

/// Pairs of runs, each a PUT and the same upsert by pgbench: on one connection and at the
/// pool size on `two` (two worker threads); on one connection on `one` (one worker thread).
/// The benchmark's Postgres runs with `fsync` and `synchronous_commit` off (command-line
/// settings, which `ALTER SYSTEM` cannot override), so a commit here costs no disk flush.
#[allow(clippy::too_many_arguments)]
pub fn rows(
    two: &Target,
    one: &Target,
    body: &str,
    keys: usize,
    pool: usize,
    secs: u64,
    (pg_port, db): (u16, &str),
    out: &Path,
) -> Vec<Row> {
    let upsert = format!(
        "\\set id random(1, {keys})\nINSERT INTO syncar_kv (key, value) VALUES ('k' || :id, '{body}') \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;\n"
    );
    let mut rows = Vec::new();
    let mut pair = |target: &Target, conns: usize| {
        let name = format!("syncar PUT, {conns} conn{}", target.label);
        let (figures, cpu_us) = with_cpu(target.pid, secs, || {
            wrk(&name, target.port, "PUT", body, keys, conns, secs, out)
        });
        rows.push(Row { figures, cpu_us });
        let name = format!("postgres upsert+commit, {conns} conn");
        let (figures, cpu_us) = with_cpu(target.pid, secs, || {
            pgbench_run(&name, pg_port, db, &upsert, conns, secs, out)
        });
        rows.push(Row { figures, cpu_us });
    };
    pair(two, 1);
    pair(two, pool);
    pair(one, 1);
    rows
}

pub fn print(rows: &[Row]) {
    println!(
        "\n{:<36} {:>8} {:>8} {:>8}   CPU µs per operation: {}",
        "PUT breakdown",
        "req/s",
        "p50 ms",
        "p99 ms",
        GROUPS.join(" | ")
    );
    for r in rows {
        let cpu: Vec<String> = r.cpu_us.iter().map(|us| format!("{us:.0}")).collect();
        println!(
            "{:<36} {:>8.0} {:>8.3} {:>8.3}   {} (total {:.0})",
            r.figures.name,
            r.figures.rps,
            r.figures.p50_ms,
            r.figures.p99_ms,
            cpu.join(" | "),
            r.cpu_us.iter().sum::<f64>()
        );
    }
    for pair in rows.chunks(2) {
        if let [put, upsert] = pair {
            println!(
                "{} / upsert: p50 {:.2}x, p99 {:.2}x, CPU per operation {:.2}x (goal p50 <= 1.2)",
                put.figures.name,
                put.figures.p50_ms / upsert.figures.p50_ms,
                put.figures.p99_ms / upsert.figures.p99_ms,
                put.cpu_us.iter().sum::<f64>() / upsert.cpu_us.iter().sum::<f64>()
            );
        }
    }
}

/// Runs `run` (of `secs`) while sampling every process' CPU time; the CPU per operation of
/// each group.
fn with_cpu(answering: u32, secs: u64, run: impl FnOnce() -> Figures) -> (Figures, [f64; 5]) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // pid -> (group, ticks at the first sample or 0 if it started later, last ticks)
            let mut seen: HashMap<u32, (usize, u64, u64)> = HashMap::new();
            let mut first = true;
            while !stop.load(Ordering::SeqCst) {
                for (pid, comm, ticks) in processes() {
                    let Some(group) = group(pid, &comm, answering) else {
                        continue;
                    };
                    let entry =
                        seen.entry(pid)
                            .or_insert((group, if first { ticks } else { 0 }, ticks));
                    entry.2 = ticks;
                }
                first = false;
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut ticks = [0u64; 5];
            for (group, start, last) in seen.into_values() {
                ticks[group] += last.saturating_sub(start);
            }
            ticks
        })
    };
    let figures = run();
    stop.store(true, Ordering::SeqCst);
    let ticks = sampler.join().expect("the CPU sampler");
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ops = figures.rps * secs as f64;
    let cpu_us = ticks.map(|t| t as f64 / per_sec * 1e6 / ops.max(1.0));
    (figures, cpu_us)
}

/// The group a process counts in, if any.
fn group(pid: u32, comm: &str, answering: u32) -> Option<usize> {
    match comm {
        "syncar" if pid == answering => Some(0),
        "syncar" => Some(1),
        c if c == "postgres" || c.starts_with("postgres:") => Some(2),
        "redis-server" => Some(3),
        "wrk" | "pgbench" => Some(4),
        _ => None,
    }
}

/// Every process: its pid, name (`comm`) and CPU time so far (user + system, in clock ticks).
fn processes() -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let (head, tail) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1.to_string();
            let fields: Vec<&str> = tail.split_whitespace().collect();
            // utime and stime are fields 14 and 15; `tail` starts at field 3.
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((pid, comm, ticks))
        })
        .collect()
}
