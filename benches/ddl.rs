//! How long after a DDL commits every instance serves the table's new shape
//! (`make bench-ddl`).
//!
//! For each source (`wal`, `changes_log`, `notify`): three syncar instances (in this process)
//! serve a table of 100 rows, each with rows 1 to 20 cached in L1. Then, `--rounds` times
//! (10), an `ALTER TABLE ... ADD COLUMN c{n} integer DEFAULT {n}` commits, and every instance
//! is asked for row 1 every 2 ms until it answers with the new column: the time from the
//! DDL's commit to that answer is the window in which an instance served the old shape (the
//! goal: within `feeds.lease`, 1 s). Also reported: the status of a PUT naming the new column
//! sent right after the commit (it must not be 422 or 500: it waits for the catalog to be
//! read again), and the reads that answered with an error. Options: `--rounds N`.

#[path = "common/pg.rs"]
mod pg;

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)] // the tests use more of it
mod servers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pg::connect;
use syncar::config::PostgresSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() {
    let rounds: usize = pg::number_option("rounds", 10);
    let s = servers::servers();
    println!(
        "| source | DDL commit to the new shape on every instance: p50, p90, max | PUT naming the new column at once | reads that failed |"
    );
    println!("|---|---|---|---|");
    for (n, source) in [
        PostgresSource::Wal,
        PostgresSource::ChangesLog,
        PostgresSource::Notify,
    ]
    .into_iter()
    .enumerate()
    {
        let db = format!("ddl_bench_{n}");
        pg::recreate_database(s.pg_port, &db).await;
        let pg = connect(s.pg_port, &db).await;
        pg.batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, name text); \
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g",
        )
        .await
        .unwrap();
        let mut apps = Vec::new();
        for _ in 0..3 {
            let mut c = syncar::Config::default();
            c.server.listen = "127.0.0.1:0".into();
            c.postgres.url = format!("postgres://postgres@127.0.0.1:{}/{db}", s.pg_port);
            c.redis.url = format!("redis://127.0.0.1:{}", s.redis_port);
            c.redis.key_prefix = format!("{db}:");
            c.feeds.postgres_source = source;
            c.log.level = "error".into();
            c.resources.push(pg::resource("items"));
            c.validate().expect("a valid config");
            let app = syncar::App::start(c).await.expect("syncar starts");
            app.ready(Duration::from_secs(30))
                .await
                .expect("syncar becomes ready");
            apps.push(app);
        }
        let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr()).collect();
        // Let the first shape announcement and its flush pass.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut windows = Vec::new();
        let mut puts = std::collections::BTreeMap::<u16, usize>::new();
        let mut failed = 0;
        for round in 0..rounds {
            for addr in &addrs {
                for id in 1..=20 {
                    get(*addr, &format!("/v1/items/{id}")).await;
                }
            }
            let column = format!("c{round}");
            pg.batch_execute(&format!(
                "ALTER TABLE items ADD COLUMN {column} integer DEFAULT {round}"
            ))
            .await
            .unwrap();
            let committed = Instant::now();
            let put = request(
                addrs[round % addrs.len()],
                "PUT",
                "/v1/items/50",
                &format!(r#"{{"name": "fifty", "{column}": 1}}"#),
            )
            .await;
            *puts.entry(put.0).or_default() += 1;
            for addr in &addrs {
                let window = loop {
                    let (status, body) = get(*addr, "/v1/items/1").await;
                    if status != 200 {
                        failed += 1;
                    } else if body.contains(&format!("\"{column}\"")) {
                        break committed.elapsed();
                    }
                    assert!(
                        committed.elapsed() < Duration::from_secs(30),
                        "{source:?}: no new shape after 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                windows.push(window);
            }
        }
        windows.sort();
        let at = |q: usize| windows[(windows.len() * q / 100).min(windows.len() - 1)];
        let puts: Vec<String> = puts.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!(
            "| {} | {:.0} ms, {:.0} ms, {:.0} ms | {} | {failed} |",
            source.as_str(),
            ms(at(50)),
            ms(at(90)),
            ms(*windows.last().unwrap()),
            puts.join(", "),
        );
        for app in apps {
            app.shutdown().await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, "").await
}

/// One HTTP/1.1 request on a connection of its own: the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: syncar\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}
