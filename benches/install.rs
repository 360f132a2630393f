//! What installing syncar on a large, busy table costs that table (`make bench-install`).
//!
//! Two identical tables of `--rows` rows (5 million by default) on the benchmark's own
//! Postgres. While a reader (point SELECTs) and a writer (point UPDATEs) run against a
//! table without pause, one of them is installed on:
//!
//! - `syncar migrate`: the version column added nullable and without a default (a change of
//!   the catalog only), the triggers, all in one transaction with a 20 ms `lock_timeout`;
//! - the way earlier releases did it, for comparison: `ADD COLUMN version bigint NOT NULL
//!   DEFAULT nextval(...)`, which rewrites the table under ACCESS EXCLUSIVE.
//!
//! Reported for each: the install's duration, whether the table's file changed
//! (`pg_relation_filenode`, a rewrite), and the reader's and writer's slowest statement and
//! p99 while the install ran. Options: `--rows N`.

#[path = "common/pg.rs"]
mod pg;

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg::connect;

/// Statement latencies of one client while an install ran.
struct Waits {
    count: usize,
    p99: Duration,
    max: Duration,
}

struct Outcome {
    how: &'static str,
    took: Duration,
    rewritten: bool,
    reader: Waits,
    writer: Waits,
}

#[tokio::main]
async fn main() {
    let rows: i64 = pg::number_option("rows", 5_000_000);
    let port = servers::servers().pg_port;
    pg::recreate_database(port, "install_bench").await;
    let db = connect(port, "install_bench").await;
    eprintln!("install benchmark: two tables of {rows} rows each");
    let filled = Instant::now();
    for table in ["big", "big_old"] {
        db.batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, body text NOT NULL, n integer NOT NULL); \
             INSERT INTO {table} SELECT g, md5(g::text) || md5((g + 1)::text), 0 \
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
        db.batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .unwrap();
    }
    db.batch_execute("CREATE SEQUENCE old_versions")
        .await
        .unwrap();
    let size: String = db
        .query_one("SELECT pg_size_pretty(pg_total_relation_size('big'))", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "filled in {:.1} s; each table {size}",
        filled.elapsed().as_secs_f64()
    );

    let url = format!("postgres://postgres@127.0.0.1:{port}/install_bench");
    let mut config = syncar::Config::default();
    config.postgres.url = url;
    config.feeds.postgres_source = syncar::config::PostgresSource::ChangesLog;
    config.resources.push(pg::resource("big"));
    let syncar = measure(port, "big", rows, "syncar migrate", || async {
        syncar::app::run_migration(&config)
            .await
            .expect("the migration succeeds");
    })
    .await;
    let old = measure(port, "big_old", rows, "NOT NULL DEFAULT nextval (earlier releases)", || async {
        let db = connect(port, "install_bench").await;
        db.batch_execute(
            "ALTER TABLE big_old ADD COLUMN version bigint NOT NULL DEFAULT nextval('old_versions')",
        )
        .await
        .unwrap();
    })
    .await;
    println!();
    println!("| install ({rows} rows, {size}) | took | table rewritten | reader: statements, p99, slowest | writer: statements, p99, slowest |");
    println!("|---|---|---|---|---|");
    for o in [syncar, old] {
        println!(
            "| {} | {:.0} ms | {} | {}, {:.1} ms, {:.1} ms | {}, {:.1} ms, {:.1} ms |",
            o.how,
            o.took.as_secs_f64() * 1e3,
            if o.rewritten { "yes" } else { "no" },
            o.reader.count,
            ms(o.reader.p99),
            ms(o.reader.max),
            o.writer.count,
            ms(o.writer.p99),
            ms(o.writer.max),
        );
    }
    drop(db);
    let admin = connect(port, "postgres").await;
    let _ = admin
        .batch_execute("DROP DATABASE IF EXISTS install_bench")
        .await;
}

/// Runs `install` on `table` while a reader and a writer work on it without pause, from
/// 200 ms before it starts to 200 ms after it ends; reports their statements' latencies.
async fn measure<F, Fut>(
    port: u16,
    table: &'static str,
    rows: i64,
    how: &'static str,
    install: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let client = |sql: String| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let db = connect(port, "install_bench").await;
            let statement = db.prepare(&sql).await.unwrap();
            let mut waits = Vec::new();
            let mut id: i64 = 1;
            while !stop.load(Ordering::Relaxed) {
                id = (id * 48271) % rows.max(2) + 1;
                let start = Instant::now();
                db.execute(&statement, &[&id]).await.unwrap();
                waits.push(start.elapsed());
            }
            waits
        })
    };
    let reader = client(format!("SELECT body FROM {table} WHERE id = $1"));
    let writer = client(format!("UPDATE {table} SET n = n + 1 WHERE id = $1"));
    let db = connect(port, "install_bench").await;
    let file_before: u32 = db
        .query_one(&format!("SELECT pg_relation_filenode('{table}')::oid"), &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    install().await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let file_after: u32 = db
        .query_one(&format!("SELECT pg_relation_filenode('{table}')::oid"), &[])
        .await
        .unwrap()
        .get(0);
    let summarize = |mut waits: Vec<Duration>| {
        waits.sort();
        Waits {
            count: waits.len(),
            p99: waits[(waits.len() * 99 / 100).min(waits.len() - 1)],
            max: *waits.last().unwrap(),
        }
    };
    let outcome = Outcome {
        how,
        took,
        rewritten: file_before != file_after,
        reader: summarize(reader.await.unwrap()),
        writer: summarize(writer.await.unwrap()),
    };
    eprintln!(
        "{how}: {:.0} ms, reader slowest {:.1} ms, writer slowest {:.1} ms",
        took.as_secs_f64() * 1e3,
        ms(outcome.reader.max),
        ms(outcome.writer.max)
    );
    outcome
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
