//! `--only pinned`: what the `wal` source costs Postgres' plain-SQL writers, with Postgres on
//! a core of its own (issue #27, item 2). Postgres (the postmaster and every process it
//! starts: backends, the walsender, the WAL writer) runs on CPU 0; this benchmark, pgbench's
//! client, Redis and the relay on the others, so what is measured is Postgres' own work.
//!
//! Single-row `UPDATE`s by 32 clients (`--clients`), interleaved rounds (`--rounds`), the
//! median round of each variant:
//! 1. a plain table with the same columns and no trigger, the slot not read;
//! 2. syncar's table with the `wal` source's triggers and the PL/pgSQL version stamp
//!    (`postgres.stamp = "plpgsql"`), the slot not read;
//! 3. the same with the C stamp of the `syncar_stamp` extension (`"extension"`; `make
//!    stamp-extension` installs it), in a database of its own;
//! 4. the plain table while a `syncar relay` decodes the slot (the walsender decodes every
//!    transaction, published or not);
//! 5. and 6. syncar's table with either stamp while a relay decodes its database's slot:
//!    what a writer of a cached table pays.
//!
//! Twice, side by side: with durable commits (`fsync`, `synchronous_commit` and
//! `full_page_writes` on, as in production) and without (every commit CPU only: the worst
//! case for the ratio). Goal: variant 5 or 6 loses at most 10 % against variant 1 at 32
//! clients.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::{
    document, median_rounds, migrate, pgbench_run, psql, servers, start_relay, Args, Figures,
};

/// `taskset -a -p -c {cpus} {pid}`: every thread of `pid` to `cpus`.
pub(super) fn pin(pid: u32, cpus: &str) {
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

/// The pid of the postmaster listening on `port`.
fn postmaster(port: u16) -> u32 {
    let data = psql(port, "postgres", "SHOW data_directory");
    let pid_file = std::fs::read_to_string(Path::new(&data).join("postmaster.pid"))
        .expect("read postmaster.pid");
    pid_file.lines().next().unwrap().trim().parse().unwrap()
}

/// The processes `pid` has started and not yet reaped.
fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("run pgrep (Debian package procps)");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Pins the postmaster listening on `port` and every process it has started to `cpus`;
/// processes it starts later (backends, walsenders) inherit the postmaster's affinity.
pub(super) fn pin_postgres(port: u16, cpus: &str) {
    let postmaster = postmaster(port);
    pin(postmaster, cpus);
    for pid in children(postmaster) {
        pin(pid, cpus);
    }
}

/// CPU time, in clock ticks, from `/proc/{pid}/stat`: the process' own (`utime`, `stime`)
/// and, with `reaped`, that of its children it has waited for (`cutime`, `cstime`). 0 for a
/// process gone meanwhile.
fn cpu_ticks(pid: u32, reaped: bool) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command's closing parenthesis, from `state` (field 3) on.
    let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14 to 17 (proc(5)).
    let own = fields[10] + fields[11];
    if reaped {
        own + fields[12] + fields[13]
    } else {
        own
    }
}

/// CPU seconds Postgres has used so far: the postmaster's own, every child's it has reaped
/// (backends of finished connections included), every running child's.
fn postgres_cpu_secs(postmaster: u32) -> f64 {
    let ticks = cpu_ticks(postmaster, true)
        + children(postmaster)
            .into_iter()
            .map(|pid| cpu_ticks(pid, false))
            .sum::<u64>();
    // Linux reports these in USER_HZ, 100 a second on every architecture it runs on.
    ticks as f64 / 100.0
}

/// One round: each variant's figures, and the CPU Postgres spent per transaction, in µs.
#[derive(Clone)]
struct Round {
    figures: Vec<Figures>,
    cpu_us: Vec<f64>,
}

/// Each round's six variants at one durability setting, in the order of the module's doc.
fn measure(args: &Args, bin: &Path, out: &Path, durable: bool) -> Vec<Round> {
    let settings = if durable {
        "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    } else {
        ""
    };
    let pg_port = servers::postgres_with(settings);
    pin_postgres(pg_port, "0");
    let postmaster = postmaster(pg_port);
    let redis = servers::RedisServer::start();
    let body = document(args.value_bytes);
    // Two databases, each migrated by syncar with one stamp: the PL/pgSQL one (and the plain
    // table beside it), and the C one of the syncar_stamp extension.
    let setup = |stamp: &str| {
        let db = format!("pinned_{}_{durable}_{stamp}", std::process::id());
        psql(pg_port, "postgres", &format!("CREATE DATABASE {db}"));
        let config = out.join(format!("pinned-{durable}-{stamp}.toml"));
        std::fs::write(
            &config,
            format!(
                "[postgres]\nstamp = \"{stamp}\"\n[redis]\nkey_prefix = \"{db}:\"\n\
                 [feeds]\npostgres_source = \"wal\"\n[log]\nlevel = \"warn\"\n"
            ),
        )
        .unwrap();
        migrate(
            bin,
            &config,
            &format!("postgres://postgres@127.0.0.1:{pg_port}/{db}"),
        );
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
        (db, config)
    };
    let (pl_db, pl_config) = setup("plpgsql");
    let (c_db, c_config) = setup("extension");
    let run = |name: &str, db: &str, table: &str| {
        psql(pg_port, db, &format!("VACUUM {table}"));
        let before = postgres_cpu_secs(postmaster);
        let children_before = children(postmaster).len();
        let figures = pgbench_run(
            &format!("{name} ({})", if durable { "durable" } else { "fsync off" }),
            pg_port,
            db,
            &format!(
                "\\set id random(1, {})\nUPDATE {table} SET value = '{body}' WHERE key = 'k' || :id;\n",
                args.keys
            ),
            args.pinned_clients,
            args.secs,
            out,
        );
        // Until the postmaster has reaped pgbench's backends, their CPU is in no count.
        let reaped = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while children(postmaster).len() > children_before && std::time::Instant::now() < reaped {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let cpu = postgres_cpu_secs(postmaster) - before;
        let transactions = figures.rps * args.secs as f64;
        (figures, cpu / transactions * 1e6)
    };
    (0..args.rounds.max(1))
        .map(|_| {
            let plain = run("plain table", &pl_db, "plain_kv");
            let stamped = run("plpgsql stamp, slot not read", &pl_db, "syncar_kv");
            let c_stamped = run("C stamp, slot not read", &c_db, "syncar_kv");
            let relay = start_relay(bin, &pl_config, pg_port, &pl_db, &redis.url());
            let plain_decoded = run("plain table, relay decoding", &pl_db, "plain_kv");
            let stamped_decoded = run("plpgsql stamp, relay decoding", &pl_db, "syncar_kv");
            drop(relay);
            let relay = start_relay(bin, &c_config, pg_port, &c_db, &redis.url());
            let c_decoded = run("C stamp, relay decoding", &c_db, "syncar_kv");
            drop(relay);
            let runs = [
                plain,
                stamped,
                c_stamped,
                plain_decoded,
                stamped_decoded,
                c_decoded,
            ];
            Round {
                figures: runs.iter().map(|r| r.0.clone()).collect(),
                cpu_us: runs.iter().map(|r| r.1).collect(),
            }
        })
        .collect()
}

/// The median of `values`, and their least and greatest.
fn median_and_spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// Every CPU but CPU 0, as a `taskset` list; `what` needs two cores at least (what runs on
/// CPU 0, and the rest).
pub(super) fn all_but_cpu_0(what: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "{what} needs two cores (one on CPU 0, the rest on the others); this machine has {cpus}"
    );
    if cpus == 2 {
        "1".to_string()
    } else {
        format!("1-{}", cpus - 1)
    }
}

pub fn run(args: &Args, bin: &Path, out: &Path) {
    // This process and everything it starts from now on (pgbench, Redis, the relay) off
    // Postgres' core.
    let others = all_but_cpu_0("--only pinned (Postgres)");
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
    let names = ["plain", "pl", "c", "plain+dec", "pl+dec", "c+dec"];
    print!("{:<10}", "commits");
    for (i, name) in names.iter().enumerate() {
        print!(" {name:>9}");
        if i > 0 {
            print!(" {:>6}", "loss");
        }
    }
    println!();
    let mut results = Vec::new();
    let mut spreads = Vec::new();
    let mut cpu_lines = Vec::new();
    for (durable, rounds) in &table {
        let v = median_rounds(rounds.iter().map(|r| r.figures.clone()).collect());
        // Each variant's loss against the plain table of its own round (the runs of a round
        // are seconds apart, so the machine's slower drifts cancel), then the median round.
        let losses: Vec<(f64, f64, f64)> = (0..names.len())
            .map(|i| {
                median_and_spread(
                    rounds
                        .iter()
                        .map(|r| 1.0 - r.figures[i].rps / r.figures[0].rps)
                        .collect(),
                )
            })
            .collect();
        // Postgres' CPU per transaction: what a variant costs the primary, whatever else the
        // machine does meanwhile (wall-clock throughput is what suffers from that).
        let cpu: Vec<(f64, f64, f64)> = (0..names.len())
            .map(|i| median_and_spread(rounds.iter().map(|r| r.cpu_us[i]).collect()))
            .collect();
        let cpu_cost: Vec<(f64, f64, f64)> = (0..names.len())
            .map(|i| {
                median_and_spread(
                    rounds
                        .iter()
                        .map(|r| r.cpu_us[i] / r.cpu_us[0] - 1.0)
                        .collect(),
                )
            })
            .collect();
        cpu_lines.push(format!(
            "{:<10} {}",
            if *durable { "durable" } else { "fsync off" },
            names
                .iter()
                .zip(&cpu)
                .zip(&cpu_cost)
                .map(|((n, (us, _, _)), (cost, lo, hi))| format!(
                    "{n} {us:.0} ({:+.1}%, {:+.1} to {:+.1})",
                    cost * 100.0,
                    lo * 100.0,
                    hi * 100.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        print!("{:<10}", if *durable { "durable" } else { "fsync off" });
        for (i, f) in v.iter().enumerate() {
            print!(" {:>9.0}", f.rps);
            if i > 0 {
                print!(" {:>5.1}%", losses[i].0 * 100.0);
            }
        }
        println!();
        spreads.push(format!(
            "{}: {}",
            if *durable { "durable" } else { "fsync off" },
            names
                .iter()
                .zip(&losses)
                .skip(1)
                .map(|(n, (_, lo, hi))| format!("{n} {:.1} to {:.1}%", lo * 100.0, hi * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut row = json!({ "durable": durable });
        for (i, ((name, f), (loss, lo, hi))) in names.iter().zip(&v).zip(&losses).enumerate() {
            row[name] = f.json();
            row[format!("{name}_loss")] = json!(loss);
            row[format!("{name}_loss_range")] = json!([lo, hi]);
            row[format!("{name}_cpu_us_per_tx")] = json!(cpu[i].0);
            row[format!("{name}_cpu_cost")] = json!(cpu_cost[i].0);
            row[format!("{name}_cpu_cost_range")] = json!([cpu_cost[i].1, cpu_cost[i].2]);
        }
        row["rounds_rps"] = json!(rounds
            .iter()
            .map(|r| r.figures.iter().map(|f| f.rps).collect::<Vec<_>>())
            .collect::<Vec<_>>());
        row["rounds_cpu_us_per_tx"] =
            json!(rounds.iter().map(|r| r.cpu_us.clone()).collect::<Vec<_>>());
        results.push(row);
    }
    println!("loss per round, least to greatest: {}", spreads.join("; "));
    println!(
        "Postgres CPU per transaction, µs (median round; its cost above the plain table's, \
         median and range over the rounds):"
    );
    for line in &cpu_lines {
        println!("{line}");
    }
    println!(
        "(TPS: the median round; loss: the median of each round's loss against that round's \
         plain table. pl: syncar's table with the PL/pgSQL stamp, c: with the C stamp of \
         extension syncar_stamp; the slot not read; +dec: a relay decoding the slot \
         meanwhile. Goal: the stamp with a relay decoding loses at most 10%)"
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
