//! `--only pinned`: what the `wal` source costs Postgres' plain-SQL writers, with Postgres on
//! a core of its own (issue #27, item 2). Postgres (the postmaster and every process it
//! starts: backends, the walsender, the WAL writer) runs on CPU 0; this benchmark, pgbench's
//! client, Redis and the relay on the others, so what is measured is Postgres' own work.
//!
//! Single-row `UPDATE`s by 32 clients (`--clients`), interleaved rounds (`--rounds`), the
//! median round of each variant:
//! 1. a plain table with the same columns and no trigger, the slot not read;
//! 2. syncar's table with the `wal` source's triggers (the version stamp), the slot not read;
//! 3. the plain table while a `syncar relay` decodes the slot (the walsender decodes every
//!    transaction, published or not);
//! 4. syncar's table while the relay decodes: what a writer of a cached table pays.
//!
//! Twice, side by side: with durable commits (`fsync`, `synchronous_commit` and
//! `full_page_writes` on, as in production) and without (every commit CPU only: the worst
//! case for the ratio). Goal: variant 4 loses at most 10 % against variant 1 at 32 clients.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::{
    document, median_rounds, migrate, pgbench_run, psql, servers, start_relay, Args, Figures,
};

/// `taskset -a -p -c {cpus} {pid}`: every thread of `pid` to `cpus`.
fn pin(pid: u32, cpus: &str) {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .expect("run taskset (Debian package util-linux)");
    assert!(
        out.status.success(),
        "taskset -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pins the postmaster listening on `port` and every process it has started to `cpus`;
/// processes it starts later (backends, walsenders) inherit the postmaster's affinity.
fn pin_postgres(port: u16, cpus: &str) {
    let data = psql(port, "postgres", "SHOW data_directory");
    let pid_file = std::fs::read_to_string(Path::new(&data).join("postmaster.pid"))
        .expect("read postmaster.pid");
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    pin(postmaster, cpus);
    let children = Command::new("pgrep")
        .args(["-P", &postmaster.to_string()])
        .output()
        .expect("run pgrep (Debian package procps)");
    for pid in String::from_utf8_lossy(&children.stdout).split_whitespace() {
        pin(pid.parse().unwrap(), cpus);
    }
}

/// The four variants' medians at one durability setting, in the order of the module's doc.
fn measure(args: &Args, bin: &Path, out: &Path, durable: bool) -> Vec<Figures> {
    let settings = if durable {
        "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    } else {
        ""
    };
    let pg_port = servers::postgres_with(settings);
    pin_postgres(pg_port, "0");
    let redis = servers::RedisServer::start();
    let db = format!("pinned_{}_{}", std::process::id(), durable);
    psql(pg_port, "postgres", &format!("CREATE DATABASE {db}"));
    let pg_url = format!("postgres://postgres@127.0.0.1:{pg_port}/{db}");
    let config = out.join(format!("pinned-{durable}.toml"));
    std::fs::write(
        &config,
        format!(
            "[redis]\nkey_prefix = \"{db}:\"\n[feeds]\npostgres_source = \"wal\"\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .unwrap();
    migrate(bin, &config, &pg_url);
    let body = document(args.value_bytes);
    psql(
        pg_port,
        &db,
        &format!(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '{body}'::jsonb \
             FROM generate_series(1, {keys}) i; \
             CREATE TABLE plain_kv (LIKE syncar_kv INCLUDING ALL); \
             INSERT INTO plain_kv SELECT * FROM syncar_kv;",
            keys = args.keys
        ),
    );
    let run = |name: &str, table: &str| {
        psql(pg_port, &db, &format!("VACUUM {table}"));
        pgbench_run(
            &format!("{name} ({})", if durable { "durable" } else { "fsync off" }),
            pg_port,
            &db,
            &format!(
                "\\set id random(1, {})\nUPDATE {table} SET value = '{body}' WHERE key = 'k' || :id;\n",
                args.keys
            ),
            args.pinned_clients,
            args.secs,
            out,
        )
    };
    let rounds = (0..args.rounds.max(1))
        .map(|_| {
            let plain = run("plain table", "plain_kv");
            let stamped = run("syncar table, slot not read", "syncar_kv");
            let relay = start_relay(bin, &config, pg_port, &db, &redis.url());
            let plain_decoded = run("plain table, relay decoding", "plain_kv");
            let stamped_decoded = run("syncar table, relay decoding", "syncar_kv");
            drop(relay);
            vec![plain, stamped, plain_decoded, stamped_decoded]
        })
        .collect();
    median_rounds(rounds)
}

pub fn run(args: &Args, bin: &Path, out: &Path) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "--only pinned needs two cores (Postgres on one, the rest on the others); this machine has {cpus}"
    );
    // This process and everything it starts from now on (pgbench, Redis, the relay) off
    // Postgres' core.
    let others = if cpus == 2 {
        "1".to_string()
    } else {
        format!("1-{}", cpus - 1)
    };
    pin(std::process::id(), &others);
    let mut table = Vec::new();
    for durable in [true, false] {
        table.push((durable, measure(args, bin, out, durable)));
    }
    println!(
        "\nPostgres pinned to CPU 0, everything else to CPU {others}; {} clients, single-row UPDATEs, \
         median of {} interleaved rounds of {} s",
        args.pinned_clients, args.rounds, args.secs
    );
    println!(
        "{:<12} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
        "commits", "plain", "stamp", "loss", "plain+dec", "loss", "stamp+dec", "loss"
    );
    let mut results = Vec::new();
    for (durable, v) in &table {
        let loss = |f: &Figures| 1.0 - f.rps / v[0].rps;
        println!(
            "{:<12} {:>10.0} {:>10.0} {:>6.1}% {:>10.0} {:>6.1}% {:>10.0} {:>6.1}%",
            if *durable { "durable" } else { "fsync off" },
            v[0].rps,
            v[1].rps,
            loss(&v[1]) * 100.0,
            v[2].rps,
            loss(&v[2]) * 100.0,
            v[3].rps,
            loss(&v[3]) * 100.0,
        );
        results.push(json!({
            "durable": durable,
            "plain": v[0].json(),
            "stamp": v[1].json(), "stamp_loss": loss(&v[1]),
            "plain_decoded": v[2].json(), "plain_decoded_loss": loss(&v[2]),
            "stamp_decoded": v[3].json(), "stamp_decoded_loss": loss(&v[3]),
        }));
    }
    println!(
        "(stamp: syncar's table with the wal triggers, slot not read; +dec: a relay decoding the \
         slot meanwhile; loss against the plain table. Goal: stamp+dec loses at most 10%)"
    );
    let path = out.join("results-pinned.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "clients": args.pinned_clients, "rounds": args.rounds, "secs": args.secs,
            "results": results,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("wrote {}", path.display());
}
