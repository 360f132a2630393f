//! `--only network`: the hit and the PUT with a network between the tiers. Postgres (with
//! `fsync`, `synchronous_commit` and `full_page_writes` on, as in production) and Redis sit
//! behind delay lines (`common/delay.rs`, `--delay-ms` each way, 0.25 ms by default: a 0.5 ms
//! round trip, one zone) while syncar and the load generators stay local, as a sidecar is.
//! Side by side in one run:
//! 1. the line alone: `redis-benchmark` GET on one connection, straight to Redis and across
//!    the line (what the line adds beyond its delay, with nothing else running), and straight
//!    over Redis' own Unix socket (this machine's floor for one request between two
//!    processes);
//! 2. an L1 hit (wrk) against a GET to Redis across the line (`redis-benchmark`), on one
//!    connection and on `--connections`; and an L1 hit on one connection from a blocking
//!    client that reads and writes raw HTTP/1.1 (`unix::raw_get_run`, as light as
//!    `redis-benchmark`), over loopback TCP and over syncar's Unix socket, as an app beside
//!    the sidecar calls it;
//! 3. a PUT through syncar (wrk) against the upsert-and-commit it wraps (pgbench, prepared)
//!    across the line, on one connection and at the pool size, answered as by default (once
//!    Redis holds it) and with `consistency=eventual` (at commit, Redis behind the answer);
//!    and on one connection on a table of the app's own (`items`), whose PUT statement is
//!    built per request.
//!
//! `--pin` runs the far side as deployed, on a core of its own: Postgres (and every process
//! it starts), Redis, both delay lines and a relay of its own (`syncar relay`, across the
//! lines) on CPU 0; syncar (`feeds.relay = false`), this benchmark and its clients on the
//! others. Unpinned, everything shares every core and the one syncar is also the relay.
//!
//! Each row says the lines' CPU per operation. Goals (issue #27): an L1 hit's p50 at least
//! 20 times below a Redis GET's across the line; a PUT's p50 at most 1.2 times the upsert's.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::delay::DelayLine;
use super::{
    document, pgbench_run, psql, redis_benchmark_with, servers, spawn_syncar, wait_ready, wrk,
    Args, Children, Figures,
};
use super::{pinned, unix};

/// One measured row and the delay lines' CPU per operation, in µs.
struct Row {
    figures: Figures,
    line_cpu_us: f64,
}

/// With `--pin`: the far side's CPUs and the near side's (`taskset` lists).
struct Sides {
    far: &'static str,
    near: String,
}

pub fn run(args: &Args, bin: &Path, out: &Path) {
    let one_way = Duration::from_secs_f64(args.delay_ms / 1000.0);
    let round_trip_ms = 2.0 * args.delay_ms;
    let sides = args.pin.then(|| {
        let near = pinned::all_but_cpu_0("--pin (the far side)");
        // This process and everything it starts (syncar, wrk, pgbench, redis-benchmark) on
        // the near side; the far side's processes are moved once started.
        pinned::pin(std::process::id(), &near);
        Sides { far: "0", near }
    });
    let pg_port =
        servers::postgres_with("-c fsync=on -c synchronous_commit=on -c full_page_writes=on");
    let sockets = tempfile::tempdir().unwrap();
    let redis_socket = unix::socket(sockets.path(), "redis.sock");
    let redis = servers::RedisServer::start_persistent(&[
        "--unixsocket",
        &redis_socket.to_string_lossy(),
        "--unixsocketperm",
        "700",
    ]);
    let pg_line = DelayLine::spawn(pg_port, one_way, servers::free_port());
    let redis_line = DelayLine::spawn(redis.port, one_way, servers::free_port());
    if let Some(sides) = &sides {
        pinned::pin_postgres(pg_port, sides.far);
        pinned::pin(redis.pid().expect("Redis runs"), sides.far);
        for line in [&pg_line, &redis_line] {
            pinned::pin(line.pid(), sides.far);
        }
    }
    let lines = [&pg_line, &redis_line];
    let line_cpu = || lines.iter().map(|l| l.cpu_secs()).sum::<f64>();
    let measure = |run: &dyn Fn() -> Figures, secs: f64| -> Row {
        let before = line_cpu();
        let figures = run();
        let ops = (figures.rps * secs).max(1.0);
        Row {
            line_cpu_us: (line_cpu() - before) * 1e6 / ops,
            figures,
        }
    };
    // As many requests as a run's time allows at one per round trip (redis-benchmark runs
    // a count, not a time).
    let link_requests = |conns: usize| {
        ((args.secs as f64 * 1000.0 / (round_trip_ms + 0.05)) * conns as f64) as usize
    };
    let secs = args.secs as f64;
    let mut rows = Vec::new();

    // 1. The line alone.
    let direct = redis_benchmark_with(redis.port, None, 1, 20_000 * args.secs as usize, true, args);
    let mut row = measure(
        &|| redis_benchmark_with(redis_line.port, None, 1, link_requests(1), false, args),
        secs,
    );
    let line_added_ms = row.figures.p50_ms - direct.p50_ms;
    row.figures.name = "redis GET across the line, 1 conn".into();
    rows.push(Row {
        figures: Figures {
            name: "redis GET straight, 1 conn".into(),
            ..direct
        },
        line_cpu_us: 0.0,
    });
    rows.push(row);
    // The machine's floor for one request between two processes: Redis over its own Unix
    // socket, one connection.
    let floor = redis_benchmark_with(
        redis.port,
        Some(&redis_socket),
        1,
        20_000 * args.secs as usize,
        false,
        args,
    );
    rows.push(Row {
        figures: Figures {
            name: "redis GET straight, Unix socket, 1 conn".into(),
            ..floor
        },
        line_cpu_us: 0.0,
    });

    // syncar behind both lines.
    let db = format!("hot_net_{}", std::process::id());
    psql(pg_port, "postgres", &format!("CREATE DATABASE {db}"));
    // A table of the app's own beside `kv`: its PUTs are built per request (the body names
    // the columns), not prepared once.
    psql(
        pg_port,
        &db,
        "CREATE TABLE items (id text PRIMARY KEY, v text)",
    );
    let config = out.join("network.toml");
    let socket = unix::socket(sockets.path(), "syncar.sock");
    // Pinned, the relay is a process of its own on the far side (as one pod's sidecar, or a
    // `syncar relay` Deployment, is to the writer's): this syncar does not stand for it.
    let feeds = if sides.is_some() {
        "[feeds]\nrelay = false\n"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "[server]\nworker_threads = 2\nlisten_unix = \"{}\"\n[postgres]\npool_size = {}\n[redis]\nkey_prefix = \"{db}:\"\n\
             [cache]\nl1 = true\n[log]\nlevel = \"warn\"\n{feeds}\
             [[resource]]\nname = \"items\"\ntable = \"items\"\nkey = \"id\"\n",
            socket.display(),
            args.pool
        ),
    )
    .unwrap();
    let port = servers::free_port();
    let pg_url = format!("postgres://postgres@127.0.0.1:{}/{db}", pg_line.port);
    let redis_url = format!("redis://127.0.0.1:{}", redis_line.port);
    let mut children = Vec::new();
    if let Some(sides) = &sides {
        super::migrate(bin, &config, &pg_url);
        let mut relay = super::start_relay(bin, &config, pg_line.port, &db, &redis_url);
        pinned::pin(relay.0[0].id(), sides.far);
        children.append(&mut relay.0);
    }
    children.push(spawn_syncar(bin, &config, port, &pg_url, &redis_url));
    let _children = Children(children);
    wait_ready(port);
    let body = document(args.value_bytes);
    psql(
        pg_port,
        &db,
        &format!(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '{body}'::jsonb FROM generate_series(1, {}) i",
            args.keys
        ),
    );
    let (c, k, s) = (args.connections, args.keys, args.secs);
    wrk("warm", port, "GET", "", k, c, 3, out);

    // 2. The hit.
    for conns in [1, c] {
        rows.push(measure(
            &|| {
                wrk(
                    &format!("syncar GET, L1 hit, {conns} conn"),
                    port,
                    "GET",
                    "",
                    k,
                    conns,
                    s,
                    out,
                )
            },
            secs,
        ));
        let mut row = measure(
            &|| {
                redis_benchmark_with(
                    redis_line.port,
                    None,
                    conns,
                    link_requests(conns),
                    false,
                    args,
                )
            },
            secs,
        );
        row.figures.name = format!("redis GET across the line, {conns} conn");
        rows.push(row);
    }

    // An app's single call: one connection, a client as light as redis-benchmark, TCP and
    // the Unix socket.
    for (name, target) in [
        (
            "syncar GET, L1 hit, 1 conn, TCP, raw client",
            unix::Target::Tcp(port),
        ),
        (
            "syncar GET, L1 hit, 1 conn, Unix socket, raw client",
            unix::Target::Unix(socket.clone()),
        ),
    ] {
        rows.push(measure(
            &|| {
                let run = unix::raw_get_run(&target, k, s);
                Figures {
                    name: name.into(),
                    rps: run.rps,
                    p50_ms: run.p50_ms,
                    p99_ms: run.p99_ms,
                    p999_ms: run.p999_ms,
                    bypassed: None,
                    from_l1: None,
                }
            },
            secs,
        ));
    }

    // 3. The PUT.
    let upsert = format!(
        "\\set id random(1, {k})\nINSERT INTO syncar_kv (key, value) VALUES ('k' || :id, '{body}') \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;\n"
    );
    for conns in [1, args.pool] {
        rows.push(measure(
            &|| {
                wrk(
                    &format!("syncar PUT, {conns} conn"),
                    port,
                    "PUT",
                    &body,
                    k,
                    conns,
                    s,
                    out,
                )
            },
            secs,
        ));
        rows.push(measure(
            &|| {
                super::wrk_on(
                    &format!("syncar PUT, eventual, {conns} conn"),
                    port,
                    "kv?consistency=eventual",
                    "PUT",
                    &body,
                    k,
                    conns,
                    conns.min(2),
                    s,
                    out,
                )
            },
            secs,
        ));
        rows.push(measure(
            &|| {
                pgbench_run(
                    &format!("postgres upsert+commit across the line, {conns} conn"),
                    pg_line.port,
                    &db,
                    &upsert,
                    conns,
                    s,
                    out,
                )
            },
            secs,
        ));
    }

    // The same on the app's table, one connection.
    let table_upsert = format!(
        "\\set id random(1, {k})\nINSERT INTO items (id, v) SELECT 'k' || :id, v FROM \
         json_populate_record(NULL::items, '{body}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;\n"
    );
    rows.push(measure(
        &|| {
            super::wrk_on(
                "syncar PUT, table, 1 conn",
                port,
                "items",
                "PUT",
                &body,
                k,
                1,
                1,
                s,
                out,
            )
        },
        secs,
    ));
    rows.push(measure(
        &|| {
            pgbench_run(
                "postgres upsert+commit on the table across the line, 1 conn",
                pg_line.port,
                &db,
                &table_upsert,
                1,
                s,
                out,
            )
        },
        secs,
    ));

    println!(
        "\nnetwork: Postgres (fsync on) and Redis behind delay lines of {} ms each way ({round_trip_ms} ms round trip)",
        args.delay_ms
    );
    if let Some(sides) = &sides {
        println!(
            "pinned: Postgres, Redis, the delay lines and the relay on CPU {}; syncar (not the relay), \
             this benchmark and its clients on CPU {}",
            sides.far, sides.near
        );
    }
    println!(
        "{:<58} {:>9} {:>8} {:>8} {:>8}  {:>14}",
        "run", "req/s", "p50 ms", "p99 ms", "p99.9", "line CPU µs/op"
    );
    for r in &rows {
        let f = &r.figures;
        println!(
            "{:<58} {:>9.0} {:>8.3} {:>8.3} {:>8.3}  {:>14.1}",
            f.name, f.rps, f.p50_ms, f.p99_ms, f.p999_ms, r.line_cpu_us
        );
    }
    println!(
        "the line alone adds {line_added_ms:.3} ms at p50 to a Redis GET on one connection \
         (its delay: {round_trip_ms} ms)"
    );
    let find = |name: &str| {
        &rows
            .iter()
            .find(|r| r.figures.name == name)
            .unwrap_or_else(|| panic!("no row {name}"))
            .figures
    };
    let floor_ms = find("redis GET straight, Unix socket, 1 conn").p50_ms;
    let across_ms = find("redis GET across the line, 1 conn").p50_ms;
    println!(
        "this machine's floor, a GET straight to Redis over its Unix socket: {floor_ms:.3} ms at \
         p50; 20x below a GET across the line needs {:.3} ms",
        across_ms / 20.0
    );
    let mut goals = Vec::new();
    for conns in [1, c] {
        let (hit, get) = (
            find(&format!("syncar GET, L1 hit, {conns} conn")),
            find(&format!("redis GET across the line, {conns} conn")),
        );
        let ratio = get.p50_ms / hit.p50_ms;
        println!(
            "{conns} conn: Redis GET across the line / L1 hit: p50 {ratio:.1}x, throughput {:.2}x \
             (goal: p50 at least 20x)",
            hit.rps / get.rps
        );
        goals.push(json!({"what": format!("L1 hit p50 vs Redis GET across the line, {conns} conn"), "ratio": ratio, "goal": ">= 20"}));
    }
    for client in ["TCP", "Unix socket"] {
        let (hit, get) = (
            find(&format!("syncar GET, L1 hit, 1 conn, {client}, raw client")),
            find("redis GET across the line, 1 conn"),
        );
        let ratio = get.p50_ms / hit.p50_ms;
        println!(
            "1 conn, raw client over {client}: Redis GET across the line / L1 hit: p50 \
             {ratio:.1}x, p99 {:.1}x (goal: p50 at least 20x)",
            get.p99_ms / hit.p99_ms
        );
        goals.push(json!({"what": format!("L1 hit p50 ({client}, raw client) vs Redis GET across the line, 1 conn"), "ratio": ratio, "goal": ">= 20"}));
    }
    for conns in [1, args.pool] {
        let upsert = find(&format!(
            "postgres upsert+commit across the line, {conns} conn"
        ));
        for (what, row) in [("PUT", ""), ("PUT, eventual", ", eventual")] {
            let put = find(&format!("syncar PUT{row}, {conns} conn"));
            let ratio = put.p50_ms / upsert.p50_ms;
            println!(
                "{conns} conn: {what} / upsert+commit: p50 {ratio:.2}x, p99 {:.2}x (goal: p50 at most 1.2x)",
                put.p99_ms / upsert.p99_ms
            );
            goals.push(json!({"what": format!("{what} p50 / upsert+commit p50, {conns} conn"), "ratio": ratio, "goal": "<= 1.2"}));
        }
    }
    let (put, upsert) = (
        find("syncar PUT, table, 1 conn"),
        find("postgres upsert+commit on the table across the line, 1 conn"),
    );
    let ratio = put.p50_ms / upsert.p50_ms;
    println!(
        "1 conn, the app's table: PUT / upsert+commit: p50 {ratio:.2}x, p99 {:.2}x (goal: p50 at most 1.2x)",
        put.p99_ms / upsert.p99_ms
    );
    goals.push(json!({"what": "PUT p50 / upsert+commit p50, the app's table, 1 conn", "ratio": ratio, "goal": "<= 1.2"}));
    let json = json!({
        "delay_ms_each_way": args.delay_ms,
        "pinned": sides.as_ref().map(|s| json!({"far": s.far, "near": s.near})),
        "line_added_ms_p50": line_added_ms,
        "floor_ms_p50": floor_ms,
        "rows": rows.iter().map(|r| {
            let mut v: Value = r.figures.json();
            v["line_cpu_us_per_op"] = json!(r.line_cpu_us);
            v
        }).collect::<Vec<_>>(),
        "goals": goals,
    });
    let path = out.join("results-network.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}
