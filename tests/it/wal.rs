//! The `wal` source against a real Postgres with `wal_level = logical`: the relay and its
//! election, faults of the replication connection and of the slot, TRUNCATE and rows written
//! under `session_replication_role = replica` (on every source), `auto`, `syncar relay` and
//! `syncar uninstall`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use syncar::config::PostgresSource;
use syncar::l2::L2;
use syncar::model::{CacheKey, Cached, Version};

use crate::support::{eventually, free_port, query_value, request, Env, Instance, RedisServer};

/// How long a change may take to reach every instance here (the product's window is about
/// a second; a relay hand-over adds the lease and a reconnect; the margin absorbs a loaded CI
/// machine).
const WINDOW: Duration = Duration::from_secs(10);

fn wal(c: &mut syncar::Config) {
    c.feeds.postgres_source = PostgresSource::Wal;
}

async fn sees(instance: &Instance, path: &str, version: i64) {
    instance.sees(path, version, WINDOW).await;
}

async fn sees_absent(instance: &Instance, path: &str) {
    instance.sees_absent(path, WINDOW).await;
}

/// Names the relay in `synchronous_standby_names`: from now on Postgres holds a commit that
/// waits (`synchronous_commit = on`) until the relay confirms it.
async fn name_the_relay(pg: &tokio_postgres::Client) {
    pg.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '\"syncar-relay\"'")
        .await
        .unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

/// Under a synchronous relay an instance uses L1 only once the relay waits for it: one that
/// joins (here hearing Redis 60 ms late, so its first reports come late) is listed by a
/// heartbeat before its feed is up, and the relay records whom it waits for, for a
/// successor.
#[tokio::test]
async fn a_joining_instance_uses_l1_only_once_the_synchronous_relay_waits_for_it() {
    let (env, pg, a) = synchronous_relay().await;
    let (_line, c) = behind_a_line_of(&env, Duration::from_millis(60)).await;
    let first_up = eventually(WINDOW, "c's feed up", || async {
        let feed = c.readyz().await["feeds"]["postgres"].clone();
        (feed["up"] == true).then_some(feed)
    })
    .await;
    assert_eq!(first_up["relay"]["sync"], true);
    assert_eq!(
        first_up["relay"]["listed"], true,
        "c used L1 before the relay waited for it: {first_up}"
    );
    let mut redis = env.redis().await;
    let listed: String = redis::cmd("GET")
        .arg(format!("{}relay-listed", env.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(listed.split_whitespace().count(), 2, "a and c: {listed}");
    // And a commit then waits for c too: it never serves the older copy after it returns.
    let v = a.put("/v1/kv/j", "0").await.etag_version();
    sees(&c, "/v1/kv/j", v).await;
    for round in 1..6 {
        eventually(WINDOW, "the key in c's L1", || async {
            (c.get("/v1/kv/j").await.header("x-cache") == Some("l1")).then_some(())
        })
        .await;
        let v: i64 = query_value(
            &pg,
            &format!("UPDATE syncar_kv SET value = '{round}' WHERE key = 'j' RETURNING version"),
        )
        .await;
        assert_eq!(c.get("/v1/kv/j").await.etag_version(), v, "round {round}");
    }
}

/// An instance on `wal` that never relays and hears Redis through a proxy (`delay` it to
/// make its evictions, and its reports to the relay, come late).
async fn behind_a_line(env: &Env) -> (crate::support::Proxy, Instance) {
    behind_a_line_of(env, Duration::ZERO).await
}

/// [`behind_a_line`], the line holding every chunk for `delay` from the start (its first
/// reports come late too).
async fn behind_a_line_of(env: &Env, delay: Duration) -> (crate::support::Proxy, Instance) {
    let redis: SocketAddr = env
        .redis_url
        .trim_start_matches("redis://")
        .parse()
        .unwrap();
    let line = crate::support::Proxy::start(redis).await;
    line.delay(delay);
    let instance = env
        .on_redis(format!("redis://{}", line.addr))
        .start(|c| {
            wal(c);
            c.feeds.relay = false;
        })
        .await;
    (line, instance)
}

/// TRUNCATE is seen by every source (the WAL says it; the log-based sources get a trigger):
/// every copy, in every L1 and in Redis, is gone, and the table refills normally.
#[tokio::test]
async fn truncate_flushes_every_copy_on_every_source() {
    for source in [
        PostgresSource::Wal,
        PostgresSource::ChangesLog,
        PostgresSource::Notify,
    ] {
        let env = Env::new().await;
        let a = env.start(|c| c.feeds.postgres_source = source).await;
        let b = env.start(|c| c.feeds.postgres_source = source).await;
        let v = a.put("/v1/kv/t1", "1").await.etag_version();
        a.put("/v1/kv/t2", "2").await;
        for i in [&a, &b] {
            sees(i, "/v1/kv/t1", v).await;
            assert_eq!(i.get("/v1/kv/t1").await.header("x-cache"), Some("l1"));
        }
        env.pg()
            .await
            .batch_execute("TRUNCATE syncar_kv")
            .await
            .unwrap();
        for i in [&a, &b] {
            sees_absent(i, "/v1/kv/t1").await;
            sees_absent(i, "/v1/kv/t2").await;
        }
        let entry = env.redis_entry("kv", "t1").await;
        assert!(
            entry.as_deref().is_none_or(|e| e.contains(":a:")),
            "{source:?}: Redis serves no copy from before the TRUNCATE: {entry:?}"
        );
        let v2 = a.put("/v1/kv/t1", "3").await.etag_version();
        for i in [&a, &b] {
            sees(i, "/v1/kv/t1", v2).await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A fill that read before a resource-wide flush lands in the generation it read in, where
/// nobody reads any more: no older fill can undo a flush.
#[tokio::test]
async fn a_fill_read_before_a_flush_lands_where_nobody_reads() {
    let env = Env::new().await;
    let config = syncar::config::RedisConfig {
        url: env.redis_url.clone(),
        key_prefix: env.prefix.clone(),
        ..Default::default()
    };
    let l2 = L2::new(&config).unwrap();
    l2.trust(None, l2.distrusts());
    let ck = CacheKey::new("kv", "slow");
    let read_in = l2.generation("kv");
    let old = Cached::value(Version(5), bytes::Bytes::from_static(b"\"old\""));
    // The TRUNCATE's flush lands while the slow fill is in flight...
    l2.raise_generation("kv", 9).await.unwrap();
    // ...then the fill arrives.
    l2.offer_checked(read_in, &ck, &old, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(l2.get(&ck).await.unwrap(), None, "nobody reads it");
    // Another instance learns the generation from Redis.
    let other = L2::new(&config).unwrap();
    assert_eq!(other.generation("kv"), 0);
    other.load_generations().await.unwrap();
    assert_eq!(other.generation("kv"), 9);
    assert_eq!(
        other.raise_generation("kv", 7).await.unwrap(),
        9,
        "generations are only raised"
    );
}

/// Rows written by logical replication apply or a restore tool run under
/// `session_replication_role = replica`, where ordinary triggers do not fire. syncar's fire
/// always: the row takes a version and every instance hears of it, whatever the source.
#[tokio::test]
async fn rows_written_as_a_replica_take_a_version_and_reach_everyone() {
    for source in [PostgresSource::Wal, PostgresSource::ChangesLog] {
        let env = Env::new().await;
        let a = env.start(|c| c.feeds.postgres_source = source).await;
        let b = env.start(|c| c.feeds.postgres_source = source).await;
        let v1 = a.put("/v1/kv/r", "1").await.etag_version();
        sees(&b, "/v1/kv/r", v1).await;
        let pg = env.pg().await;
        pg.batch_execute("SET session_replication_role = replica")
            .await
            .unwrap();
        let v2: i64 = query_value(
            &pg,
            "UPDATE syncar_kv SET value = '2' WHERE key = 'r' RETURNING version",
        )
        .await;
        assert!(v2 > v1, "{source:?}: the stamp fired as a replica too");
        pg.execute("DELETE FROM syncar_kv WHERE key = 'r'", &[])
            .await
            .unwrap();
        for i in [&a, &b] {
            sees_absent(i, "/v1/kv/r").await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// The relay's replication connection (and its plain one) terminated: the relay reconnects
/// and nothing committed meanwhile is lost.
#[tokio::test]
async fn a_terminated_replication_connection_comes_back_and_loses_nothing() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/k", "1").await.etag_version();
    sees(&b, "/v1/kv/k", v1).await;
    let pg = env.pg().await;
    // (A relay between two terms has no connection: wait for one that streams.)
    eventually(WINDOW, "a relay streaming, then terminated", || async {
        (env.terminate("syncar-relay").await >= 1).then_some(())
    })
    .await;
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'k' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/k", v2).await;
    }
    for i in [&a, &b] {
        i.feed_becomes("postgres", true, WINDOW).await;
    }
}

/// A key deleted and inserted again in one statement: the insert's row trigger stamps the
/// row, the delete's statement trigger takes its version at the statement's end, above the
/// row's; relayed as an absence, it outranked the live row and every instance answered 404
/// until its tombstone expired. In the other order (a put, then a delete, in one
/// transaction) the key ends absent.
#[tokio::test]
async fn a_key_deleted_and_inserted_again_in_one_statement_is_served() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/re", "1").await.etag_version();
    for i in [&a, &b] {
        sees(i, "/v1/kv/re", v1).await;
    }
    let pg = env.pg().await;
    let v2: i64 = query_value(
        &pg,
        "WITH d AS (DELETE FROM syncar_kv WHERE key = 're' RETURNING key) \
         INSERT INTO syncar_kv (key, value) SELECT key, '2' FROM d RETURNING version",
    )
    .await;
    assert!(v2 > v1);
    for i in [&a, &b] {
        sees(i, "/v1/kv/re", v2).await;
        assert_eq!(i.get("/v1/kv/re").await.json(), serde_json::json!(2));
    }
    pg.batch_execute(
        "BEGIN; UPDATE syncar_kv SET value = '3' WHERE key = 're'; \
         DELETE FROM syncar_kv WHERE key = 're'; COMMIT",
    )
    .await
    .unwrap();
    for i in [&a, &b] {
        sees_absent(i, "/v1/kv/re").await;
    }
}

/// A Redis user that may not run `SCRIPT` (`+@all -script`, which keeps `SCRIPT FLUSH` from an
/// application), and the script cache emptied under the fleet twice: every script goes by
/// `EVAL` when Redis answers `NOSCRIPT` (redis-rs' own reload is a `SCRIPT LOAD`, refused
/// here, and a second flush between its load and its retry fails the call). The relay is
/// elected, every PUT reaches Redis, and a plain-SQL write every instance's L1.
#[tokio::test]
async fn a_redis_user_without_script_runs_every_script_after_the_cache_is_flushed() {
    let server = RedisServer::start();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let flush = |mut admin: redis::aio::MultiplexedConnection| async move {
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
    };
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "app",
            "on",
            ">app-secret",
            "~*",
            "&*",
            "+@all",
            "-script",
        ])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let env = Env::new()
        .await
        .on_redis(format!("redis://app:app-secret@127.0.0.1:{}", server.port));
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    for i in [&a, &b] {
        i.feed_becomes("postgres", true, WINDOW).await;
    }
    let redis_version = || async {
        env.redis_entry("kv", "s")
            .await
            .map(|e| e.split(':').next().unwrap().parse::<i64>().unwrap())
    };
    let v1 = a.put("/v1/kv/s", "1").await.etag_version();
    assert_eq!(redis_version().await, Some(v1), "the PUT reached Redis");
    sees(&b, "/v1/kv/s", v1).await;

    flush(admin.clone()).await;
    let v2 = a.put("/v1/kv/s", "2").await.etag_version();
    assert_eq!(
        redis_version().await,
        Some(v2),
        "the PUT after SCRIPT FLUSH reached Redis"
    );
    sees(&b, "/v1/kv/s", v2).await;

    flush(admin).await;
    let pg = env.pg().await;
    let v3: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '3' WHERE key = 's' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/s", v3).await;
        let r = i.get("/v1/kv/s").await;
        assert_eq!(r.header("x-cache"), Some("l1"), "L1 in use: {:?}", r.body);
    }
    eventually(WINDOW, "the relay's apply in Redis", || async {
        (redis_version().await == Some(v3)).then_some(())
    })
    .await;
    for i in [&a, &b] {
        i.feed_becomes("postgres", true, WINDOW).await;
    }
}

/// The slot dropped under a running relay, with a change committed that the new slot will
/// never stream: the relay recreates the slot, sees that Redis was fed by another one, and
/// flushes every resource, so the change is not missed.
#[tokio::test]
async fn a_slot_dropped_under_the_relay_is_recreated_and_everything_flushed() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/d", "1").await.etag_version();
    for i in [&a, &b] {
        sees(i, "/v1/kv/d", v1).await;
    }
    let slot = a.readyz().await["feeds"]["postgres"]["slot"]
        .as_str()
        .unwrap()
        .to_string();
    let mut pg = env.pg().await;
    // Stop the relay's stream, then, in one transaction, change the row and drop the slot:
    // a slot created afterwards waits for that transaction, so it never sees the change.
    let deadline = Instant::now() + WINDOW;
    let v2 = loop {
        assert!(Instant::now() < deadline, "the slot could not be dropped");
        if let Some(v2) = drop_slot_with_a_change(&mut pg, &slot).await {
            break v2;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pg = env.pg().await;
    eventually(WINDOW, "the relay to recreate the slot", || async {
        let exists: bool = pg
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        exists.then_some(())
    })
    .await;
    // Once every feed is back, caches are trusted again: none holds the older copy.
    for i in [&a, &b] {
        i.feed_becomes("postgres", true, WINDOW).await;
        sees(i, "/v1/kv/d", v2).await;
        for _ in 0..3 {
            assert_eq!(i.get("/v1/kv/d").await.etag_version(), v2);
        }
    }
}

/// Terminates the slot's consumer, then changes `d` and drops the slot in one transaction;
/// `None` when the relay was quicker to take the slot again.
async fn drop_slot_with_a_change(pg: &mut tokio_postgres::Client, slot: &str) -> Option<i64> {
    pg.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = $1 AND active",
        &[&slot],
    )
    .await
    .ok()?;
    let tx = pg.transaction().await.ok()?;
    let v2: i64 = tx
        .query_one(
            "UPDATE syncar_kv SET value = '2' WHERE key = 'd' RETURNING version",
            &[],
        )
        .await
        .ok()?
        .get(0);
    tx.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .ok()?;
    tx.commit().await.ok()?;
    Some(v2)
}

/// An instance whose subscription to the relay was killed catches up when it resubscribes:
/// what was published meanwhile is in Redis, and its L1 is emptied.
#[tokio::test]
async fn an_instance_whose_subscription_dropped_catches_up() {
    // A Redis of its own: killing every subscription of the shared one would cut the other
    // tests' feeds too.
    let server = RedisServer::start();
    let env = Env::new().await.on_redis(server.url());
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/s", "1").await.etag_version();
    sees(&b, "/v1/kv/s", v1).await;
    assert_eq!(b.get("/v1/kv/s").await.header("x-cache"), Some("l1"));
    let mut redis = env.redis().await;
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    let v2: i64 = query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 's' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/s", v2).await;
        i.feed_becomes("postgres", true, WINDOW).await;
    }
}

/// `auto` picks `wal` where the server allows it, and says so; a table without a replica
/// identity (a published table without one refuses UPDATE and DELETE) makes it fall back to
/// the changes log, saying why; `wal` configured there leaves that table out of the
/// publication and unavailable, saying why, and serves the rest.
#[tokio::test]
async fn auto_picks_wal_where_it_can_and_says_why_not_elsewhere() {
    let env = Env::new().await;
    let a = env
        .start(|c| c.feeds.postgres_source = PostgresSource::Auto)
        .await;
    let postgres = &a.readyz().await["feeds"]["postgres"];
    assert_eq!(postgres["source"], "wal", "{postgres}");
    assert!(
        postgres["source_reason"]
            .as_str()
            .unwrap()
            .starts_with("auto:"),
        "{postgres}"
    );
    a.shutdown().await;

    // A table whose key is unique but that has no replica identity.
    let nopk_env = || async {
        let env = Env::new().await;
        env.pg()
            .await
            .batch_execute("CREATE TABLE nopk (id int NOT NULL UNIQUE, name text)")
            .await
            .unwrap();
        env
    };
    let env = nopk_env().await;
    let with_nopk = |c: &mut syncar::Config| {
        c.resources
            .push(crate::support::resource("nopk", "id", "version"));
    };
    let a = env
        .start(|c| {
            with_nopk(c);
            c.feeds.postgres_source = PostgresSource::Auto;
        })
        .await;
    let postgres = &a.readyz().await["feeds"]["postgres"];
    assert_eq!(postgres["source"], "changes_log", "{postgres}");
    let reason = postgres["source_reason"].as_str().unwrap();
    assert!(
        reason.contains("nopk") && reason.contains("replica identity"),
        "{reason}"
    );
    a.shutdown().await;

    // `wal` configured: the table without a replica identity is left out of the publication
    // (published, its UPDATE and DELETE would fail) and unavailable, saying why; the others
    // are served.
    let env = nopk_env().await;
    let mut config = env.config();
    with_nopk(&mut config);
    config.feeds.postgres_source = PostgresSource::Wal;
    let migration = syncar::app::run_migration(&config).await.unwrap();
    assert!(
        migration
            .unavailable
            .iter()
            .any(|u| u.contains("nopk") && u.contains("REPLICA IDENTITY")),
        "{:?}",
        migration.unavailable
    );
    let a = env.start_with(config).await;
    let nopk = &a.readyz().await["resources"]["nopk"];
    assert_eq!(nopk["ok"], false, "{nopk}");
    assert!(
        nopk["error"]
            .as_str()
            .unwrap_or_default()
            .contains("replica identity"),
        "{nopk}"
    );
    env.pg()
        .await
        .batch_execute(
            "INSERT INTO nopk VALUES (1, 'a'); UPDATE nopk SET name = 'b'; DELETE FROM nopk",
        )
        .await
        .expect("the customer's statements on the table left out succeed");
    let v = a.put("/v1/kv/served", "1").await.etag_version();
    a.sees("/v1/kv/served", v, Duration::from_secs(5)).await;
    a.shutdown().await;
}

/// A role that may not replicate: `auto` falls back to the changes log and names the grant
/// it lacks; `wal` is refused with it.
#[tokio::test]
async fn a_role_without_replication_gets_the_changes_log_or_a_clear_error() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let role = format!("{db}_app");
    pg.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT ALL ON DATABASE {db} TO {role}; \
         GRANT ALL ON SCHEMA public TO {role}"
    ))
    .await
    .unwrap();
    let url = env.pg_url.replace("postgres@", &format!("{role}@"));
    let a = env
        .start(|c| {
            c.postgres.url = url.clone();
            c.feeds.postgres_source = PostgresSource::Auto;
        })
        .await;
    let postgres = &a.readyz().await["feeds"]["postgres"];
    assert_eq!(postgres["source"], "changes_log", "{postgres}");
    assert!(
        postgres["source_reason"]
            .as_str()
            .unwrap()
            .contains("REPLICATION"),
        "{postgres}"
    );
    a.shutdown().await;
    let mut config = env.config();
    config.postgres.url = url;
    config.feeds.postgres_source = PostgresSource::Wal;
    let err =
        syncar::telemetry::error_chain(&syncar::app::run_migration(&config).await.unwrap_err());
    assert!(err.contains("ALTER ROLE"), "{err}");
}

/// `syncar uninstall` removes the slot, the publication, the triggers and their functions,
/// and keeps the data.
#[tokio::test]
async fn uninstall_removes_the_slot_the_publication_and_the_triggers() {
    let env = Env::new().await;
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::Wal;
    let installed = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        installed
            .iter()
            .any(|c| c.starts_with("created replication slot")),
        "{installed:?}"
    );
    let pg = env.pg().await;
    // Postgres 14 has no column lists (nor `attnames`): every column is published there.
    let server: i32 = query_value(&pg, "SELECT current_setting('server_version_num')::int").await;
    let published: Vec<String> = if server >= 150_000 {
        query_value(
            &pg,
            "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = 'syncar' \
             AND tablename = 'syncar_kv'",
        )
        .await
    } else {
        let tables: i64 = query_value(
            &pg,
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'syncar' \
             AND tablename = 'syncar_kv'",
        )
        .await;
        assert_eq!(tables, 1, "syncar_kv is published");
        vec!["key".into(), "value".into(), "version".into()]
    };
    assert_eq!(
        published,
        ["key", "value", "version"],
        "every column is published: a column list would make the customer's own \
         REPLICA IDENTITY FULL or DROP COLUMN fail (tests/it/ddl.rs)"
    );
    pg.execute(
        "INSERT INTO syncar_kv (key, value) VALUES ('kept', '1')",
        &[],
    )
    .await
    .unwrap();
    let removed = syncar::app::run_uninstall(&config, false).await.unwrap();
    for what in [
        "dropped replication slot",
        "dropped publication syncar",
        "dropped trigger syncar_stamp_version",
        "dropped function",
    ] {
        assert!(
            removed.iter().any(|c| c.starts_with(what)),
            "{what}: {removed:?}"
        );
    }
    let left: (i64, i64, i64, i64) = {
        let row = pg
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()), \
                        (SELECT count(*) FROM pg_publication), \
                        (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'syncar%'), \
                        (SELECT count(*) FROM syncar_kv)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(
        left,
        (0, 0, 0, 1),
        "nothing of syncar's is left but the data"
    );
    assert!(syncar::app::run_uninstall(&config, false)
        .await
        .unwrap()
        .is_empty());
}

/// A syncar binary of its own, killed with SIGKILL when dropped.
struct Process {
    child: Child,
    api: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    /// Starts `syncar {command}` as its own process. Its log goes nowhere, unless
    /// `SYNCAR_TEST_LOGS` names a directory: then to `{name}-{port}.log` there, at the level
    /// `SYNCAR_TEST_LOG_LEVEL` says (`error` by default), to read what a failing run did.
    fn spawn(env: &Env, command: &str, name: &str, relay: bool) -> Process {
        let (api, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("syncar.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{api}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 [postgres]\nurl = \"{}\"\npool_size = 4\n\
                 [redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n\
                 [feeds]\npostgres_source = \"wal\"\nrelay = {relay}\n",
                env.pg_url, env.redis_url, env.prefix
            ),
        )
        .unwrap();
        let logs = std::env::var("SYNCAR_TEST_LOGS").ok();
        let stderr = match &logs {
            Some(dir) => {
                Stdio::from(std::fs::File::create(format!("{dir}/{name}-{api}.log")).unwrap())
            }
            None => Stdio::null(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_syncar"))
            .args([command, "--config"])
            .arg(&path)
            .env("SYNCAR_INSTANCE", name)
            .env(
                "SYNCAR_LOG",
                std::env::var("SYNCAR_TEST_LOG_LEVEL").unwrap_or("error".into()),
            )
            .env_remove("SYNCAR_CONFIG")
            .env_remove("SYNCAR_LISTEN")
            .env_remove("SYNCAR_ADMIN_LISTEN")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Process {
            child,
            api: format!("127.0.0.1:{api}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        }
    }

    async fn readyz(&self) -> Option<serde_json::Value> {
        tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let r = request(self.admin, "GET", "/readyz", &[], None).await;
        Some(r.json())
    }

    async fn ready(&self) {
        eventually(Duration::from_secs(30), "syncar to be ready", || async {
            let r = self.readyz().await?;
            (r["ready"] == true && r["feeds"]["postgres"]["up"] != false).then_some(())
        })
        .await;
    }

    /// The instance id of the relay, as this process heard it.
    async fn relay(&self) -> Option<String> {
        let r = self.readyz().await?;
        r["feeds"]["postgres"]["relay"]["relay"]
            .as_str()
            .map(str::to_string)
    }

    async fn version(&self, path: &str) -> Option<i64> {
        let r = request(self.api, "GET", path, &[], None).await;
        (r.status == 200).then(|| r.etag_version())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILL of the instance that holds the relay: the other takes over within the relay's
/// lease, a change committed while nobody relayed is not lost (the slot kept it), and no
/// read that starts a lease after the commit returns the older copy.
#[tokio::test]
async fn the_relay_is_taken_over_when_its_instance_is_killed() {
    let env = Env::new().await;
    let mut first = Process::spawn(&env, "serve", "first", true);
    first.ready().await;
    let second = Process::spawn(&env, "serve", "second", true);
    second.ready().await;
    let relay = eventually(WINDOW, "a relay", || async { first.relay().await }).await;
    assert!(
        relay.starts_with("first-"),
        "the first to start relays: {relay}"
    );
    let pg = env.pg().await;
    let v1: i64 = query_value(
        &pg,
        "INSERT INTO syncar_kv (key, value) VALUES ('h', '1') RETURNING version",
    )
    .await;
    eventually(WINDOW, "the row on the second", || async {
        (second.version("/v1/kv/h").await == Some(v1)).then_some(())
    })
    .await;

    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'h' RETURNING version",
    )
    .await;
    let committed = Instant::now();
    let lease = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let seen = second.version("/v1/kv/h").await.expect("served");
        assert!(
            seen == v2 || started < committed + lease,
            "a read {:?} after the commit served version {seen}, older than {v2}",
            started - committed
        );
        if seen == v2 && started > committed + lease {
            break;
        }
        assert!(committed.elapsed() < WINDOW, "the change never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay = eventually(WINDOW, "the second to relay", || async {
        second.relay().await.filter(|r| r.starts_with("second-"))
    })
    .await;
    assert!(relay.starts_with("second-"));
    let v3: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '3' WHERE key = 'h' RETURNING version",
    )
    .await;
    eventually(WINDOW, "relayed by the second", || async {
        (second.version("/v1/kv/h").await == Some(v3)).then_some(())
    })
    .await;
}

/// `syncar relay` alone relays for instances that never do (`feeds.relay = false`), which
/// send Postgres no query while idle.
#[tokio::test]
async fn syncar_relay_alone_relays_for_instances_that_never_do() {
    let env = Env::new().await;
    let relay = Process::spawn(&env, "relay", "relay", true);
    eventually(Duration::from_secs(30), "the relay to be ready", || async {
        (relay.readyz().await?["ready"] == true).then_some(())
    })
    .await;
    let a = env
        .start(|c| {
            wal(c);
            c.feeds.relay = false;
        })
        .await;
    let r = a.readyz().await;
    assert!(
        r["feeds"]["postgres"]["relay"]["relay"]
            .as_str()
            .unwrap()
            .starts_with("relay-"),
        "{r}"
    );
    let v: i64 = query_value(
        &env.pg().await,
        "INSERT INTO syncar_kv (key, value) VALUES ('x', '1') RETURNING version",
    )
    .await;
    sees(&a, "/v1/kv/x", v).await;
    assert_eq!(a.get("/v1/kv/x").await.header("x-cache"), Some("l1"));
    let v2: i64 = query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'x' RETURNING version",
    )
    .await;
    sees(&a, "/v1/kv/x", v2).await;

    // Idle, the instance sends Postgres nothing: none of its connections changes state.
    drop(relay);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy: i64 = query_value(
        &env.pg().await,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'syncar%' AND state_change > now() - interval '1.5 s'",
    )
    .await;
    assert_eq!(
        busy, 0,
        "an idle instance's connections to Postgres stayed idle"
    );
}

/// Anyone who can connect may emit a logical message: malformed or forged `syncar` ones
/// neither stop the relay nor announce what the WAL does not show.
#[tokio::test]
async fn forged_messages_in_the_wal_change_nothing() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/f", "1").await.etag_version();
    sees(&b, "/v1/kv/f", v1).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "SELECT pg_logical_emit_message(true, 'syncar', 'not json'); \
         SELECT pg_logical_emit_message(true, 'syncar', \
           '{\"resource\": \"kv\", \"deletes\": [[\"f\", 999999999]]}'); \
         SELECT pg_logical_emit_message(true, 'syncar', '{\"resource\": \"kv\", \"truncate\": -5}'); \
         SELECT pg_logical_emit_message(false, 'syncar', 'hb:1:nobody')",
    )
    .await
    .unwrap();
    // Still relaying, and nothing was deleted or flushed.
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'f' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/f", v2).await;
    }
    let generation: Option<String> = redis::cmd("HGET")
        .arg(format!("{}generations", env.prefix))
        .arg("kv")
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    assert!(
        generation
            .as_deref()
            .is_none_or(|g| g.parse::<i64>().unwrap() > 0),
        "no forged generation: {generation:?}"
    );

    // A real delete announced at a forged, huge version (by a role that may delete): taken
    // as unannounced (a fresh version), so no instance and no guard ever sees the huge one,
    // and the sequence stays where it was (raised there, its next nextval would fail every
    // write to a cached table).
    pg.batch_execute(
        "BEGIN; DELETE FROM syncar_kv WHERE key = 'f'; \
         SELECT pg_logical_emit_message(true, 'syncar', \
           '{\"resource\": \"kv\", \"deletes\": [[\"f\", 9223372036854775000]]}'); \
         COMMIT",
    )
    .await
    .unwrap();
    for i in [&a, &b] {
        sees_absent(i, "/v1/kv/f").await;
    }
    let v3 = a.put("/v1/kv/f", "3").await.etag_version();
    for i in [&a, &b] {
        sees(i, "/v1/kv/f", v3).await;
    }
    let last: i64 = query_value(&pg, "SELECT last_value FROM syncar_version_seq").await;
    assert!(last < 1 << 40, "the sequence was not moved: {last}");

    // The same just below 2^62, where a version still counts as one Postgres could have
    // handed out: a write of the key then finds every tier holding a version above its own,
    // and the guard moves the sequence up, but never past 2^61, which leaves the versions
    // after it plausible for longer than any database lives. Moved to 2^62 - 1000, the
    // 1000th version after it would be ignored by every instance as forged, and every
    // change after it with it.
    pg.batch_execute(
        "BEGIN; DELETE FROM syncar_kv WHERE key = 'f'; \
         SELECT pg_logical_emit_message(true, 'syncar', \
           '{\"resource\": \"kv\", \"deletes\": [[\"f\", 4611686018427386904]]}'); \
         COMMIT",
    )
    .await
    .unwrap();
    for i in [&a, &b] {
        sees_absent(i, "/v1/kv/f").await;
    }
    let put = a.put("/v1/kv/f", "4").await;
    assert!(put.status < 300, "{put:?}");
    let last: i64 = query_value(&pg, "SELECT last_value FROM syncar_version_seq").await;
    assert!(last <= 1 << 61, "the sequence stays below 2^61: {last}");
    // Coherence holds after it: a plain-SQL write of another key reaches every instance.
    let vg = a.put("/v1/kv/g", "1").await.etag_version();
    sees(&b, "/v1/kv/g", vg).await;
    let vg2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'g' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/g", vg2).await;
    }
}

/// A database migrated by an earlier release (the changes log, no recorded source) keeps the
/// changes log under `auto`: its instances know nothing of the state table, and would keep
/// vouching for a log that no longer hears inserts and updates.
#[tokio::test]
async fn auto_keeps_the_changes_log_of_an_earlier_install() {
    let env = Env::new().await;
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::ChangesLog;
    syncar::app::run_migration(&config).await.unwrap();
    // What the earlier release left: no state table.
    env.pg()
        .await
        .batch_execute("DROP TABLE syncar_state")
        .await
        .unwrap();
    config.feeds.postgres_source = PostgresSource::Auto;
    let changes = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("postgres source is changes_log (auto: kept")),
        "{changes:?}"
    );
    let a = env
        .start(|c| c.feeds.postgres_source = PostgresSource::Auto)
        .await;
    assert_eq!(
        a.readyz().await["feeds"]["postgres"]["source"],
        "changes_log"
    );
}

/// A DELETE racing a re-INSERT of its key: the insert took its version before the delete
/// took the delete's, yet commits after it (held there, deterministically, by a trigger of
/// the test's after syncar's stamp). The relay sees the commits in order and gives the
/// re-inserted row a fresh version, so every instance serves it at once, not a 404 for
/// `tombstone_ttl`.
#[tokio::test]
async fn a_row_reinserted_behind_a_racing_delete_is_served() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, name text); \
             INSERT INTO items VALUES (1, 'one')",
        )
        .await
        .unwrap();
    let items = |c: &mut syncar::Config| {
        wal(c);
        c.resources
            .push(crate::support::resource("items", "id", "version"));
    };
    let a = env.start(items).await;
    let b = env.start(items).await;
    // Waits until the test's own statement starting with `statement` waits on a lock (other
    // sessions of syncar's may wait on locks of their own meanwhile).
    let waiting = |statement: &'static str| {
        let env = env.clone();
        async move {
            eventually(
                WINDOW,
                &format!("{statement} waiting on a lock"),
                || async {
                    let waiting: i64 = env
                        .pg()
                        .await
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                         AND datname = current_database() AND query LIKE $1 || '%'",
                            &[&statement],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    (waiting >= 1).then_some(())
                },
            )
            .await
        }
    };
    // The insert takes its version in syncar's stamp, then a trigger of the test's (fired
    // after it: triggers fire in name order) holds it on an advisory lock while the delete
    // takes its own version and commits.
    let hold = env.pg().await;
    hold.batch_execute(
        "CREATE FUNCTION hold_insert() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_xact_lock(7269); RETURN NEW; END $$; \
         CREATE TRIGGER zz_hold_insert BEFORE INSERT ON items FOR EACH ROW \
         EXECUTE FUNCTION hold_insert(); \
         SELECT pg_advisory_lock(7269)",
    )
    .await
    .unwrap();
    let inserter = env.pg().await;
    let insert = tokio::spawn(async move {
        inserter
            .query_one(
                "INSERT INTO items VALUES (1, 'again') RETURNING version",
                &[],
            )
            .await
    });
    waiting("INSERT INTO items").await;
    env.pg()
        .await
        .batch_execute("DELETE FROM items WHERE id = 1")
        .await
        .unwrap();
    let deleted: i64 =
        query_value(&env.pg().await, "SELECT last_value FROM syncar_version_seq").await;
    hold.batch_execute("SELECT pg_advisory_unlock(7269)")
        .await
        .unwrap();
    let inserted: i64 = insert.await.unwrap().unwrap().get(0);
    assert!(
        inserted < deleted,
        "the insert took its version ({inserted}) before the delete took its own ({deleted})"
    );
    for i in [&a, &b] {
        eventually(WINDOW, "the re-inserted row", || async {
            let r = i.get("/v1/items/1").await;
            (r.status == 200 && r.json()["name"] == "again").then_some(())
        })
        .await;
    }
    // The relay gives the row a version above the delete's (the reads above may have been
    // answered from Postgres before it did: a feed briefly down bypasses the caches).
    eventually(
        WINDOW,
        "the row given a version above the delete's",
        || async {
            let now: i64 =
                query_value(&env.pg().await, "SELECT version FROM items WHERE id = 1").await;
            (now > inserted).then_some(())
        },
    )
    .await;
    for i in [&a, &b] {
        eventually(WINDOW, "the re-inserted row at its new version", || async {
            let r = i.get("/v1/items/1").await;
            (r.status == 200 && r.json()["name"] == "again" && r.etag_version() > inserted)
                .then_some(())
        })
        .await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// The WAL position of a read: every answer carries the position this instance had applied
/// (`X-Syncar-LSN`, in Postgres' `X/Y` form, and its age), on GET and batch get; `min_lsn`
/// taken by a plain-SQL writer from `pg_current_wal_lsn()` after its commit makes a read on
/// another instance wait for it (read-your-writes for writers that never talk to syncar);
/// a position far ahead is answered from Postgres within `feeds.min_lsn_wait`, saying so;
/// a malformed one is a 400 naming the parameter. `min_version` above anything Postgres holds
/// says so too.
#[tokio::test]
async fn min_lsn_gives_a_plain_sql_writer_its_own_write_on_every_instance() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    // Longer than the default 500 ms: on a machine busy with the whole suite the relay once
    // took longer to apply a write, and the read (right, from Postgres) said `unmet`.
    let b = env
        .start(|c| {
            wal(c);
            c.feeds.min_lsn_wait = Duration::from_secs(2);
        })
        .await;
    let v0 = a.put("/v1/kv/r", "0").await.etag_version();
    sees(&b, "/v1/kv/r", v0).await;
    let pg = env.pg().await;
    // The test server commits asynchronously; a writer's own session that waits for its
    // commit's flush (the default) has it written by the time pg_current_wal_lsn() reads.
    pg.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let lsn = |r: &crate::support::Resp| {
        pgwire_replication::Lsn::parse(r.header("x-syncar-lsn").expect("the position header"))
            .unwrap()
            .as_u64()
    };
    for round in 1..=20 {
        // Read into b's L1, then changed behind its back by plain SQL.
        assert_eq!(b.get("/v1/kv/r").await.header("x-cache"), Some("l1"));
        let row = pg
            .query_one(
                &format!(
                    "WITH u AS (UPDATE syncar_kv SET value = '{round}' WHERE key = 'r' \
                     RETURNING version) SELECT version FROM u"
                ),
                &[],
            )
            .await
            .unwrap();
        let version: i64 = row.get(0);
        // Either position will do: the insert position is past the commit even where
        // commits are asynchronous.
        let position = if round % 2 == 0 {
            "SELECT pg_current_wal_lsn()::text"
        } else {
            "SELECT pg_current_wal_insert_lsn()::text"
        };
        let committed: String = query_value(&pg, position).await;
        let r = b.get(&format!("/v1/kv/r?min_lsn={committed}")).await;
        assert_eq!(
            (r.status, r.etag_version()),
            (200, version),
            "round {round}: min_lsn {committed} must give the plain-SQL write ({:?})",
            r.header("x-syncar-min-lsn")
        );
        assert!(
            lsn(&r) >= pgwire_replication::Lsn::parse(&committed).unwrap().as_u64(),
            "round {round}: the answer's position covers the write"
        );
        assert!(r.header("x-syncar-lsn-age-ms").is_some());
        sees(&b, "/v1/kv/r", version).await;
    }

    // Far ahead: Postgres answers, within the bound, saying the position was not reached.
    let started = Instant::now();
    let r = b.get("/v1/kv/r?min_lsn=FFFF/0").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-syncar-min-lsn"), Some("unmet"));
    assert_eq!(r.header("x-cache"), Some("db"));
    assert!(started.elapsed() < Duration::from_secs(5));

    let r = b.get("/v1/kv/r?min_lsn=yesterday").await;
    assert_eq!(r.status, 400);
    assert!(
        String::from_utf8_lossy(&r.body).contains("min_lsn"),
        "{:?}",
        r.body
    );

    // A watcher gets the change, then the position it is complete up to.
    let mut watch = crate::support::Sse::open(b.addr(), "/v1/kv?watch=true", &[]).await;
    pg.batch_execute("UPDATE syncar_kv SET value = '\"watched\"' WHERE key = 'r'")
        .await
        .unwrap();
    let committed: String = query_value(&pg, "SELECT pg_current_wal_lsn()::text").await;
    let committed = pgwire_replication::Lsn::parse(&committed).unwrap().as_u64();
    let mut seen_change = false;
    loop {
        let event = watch
            .next(Duration::from_secs(10))
            .await
            .expect("a change and its position");
        match event.event.as_str() {
            "change" if event.data["key"] == "r" => seen_change = true,
            "position" => {
                let at = pgwire_replication::Lsn::parse(event.data["lsn"].as_str().unwrap())
                    .unwrap()
                    .as_u64();
                if at >= committed {
                    assert!(
                        seen_change,
                        "the change comes before the position covering it"
                    );
                    break;
                }
            }
            _ => {}
        }
    }

    // The batch get carries the position too.
    let r = request(b.addr(), "POST", "/v1/kv", &[], Some(br#"{"keys":["r"]}"#)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(lsn(&r) > 0);

    // min_version above anything Postgres holds: the row, saying it is below.
    let r = b.get("/v1/kv/r?min_version=999999999").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-syncar-min-version"), Some("unmet"));
    assert_eq!(b.get("/v1/kv/r").await.header("x-syncar-min-version"), None);
}

/// The relay named a synchronous standby (`synchronous_standby_names = 'syncar-relay'`):
/// nothing syncar commits for itself (migrations, the slot's epoch, the state table, the
/// changes log, restamps) waits for the relay's confirmation, so instances start, restart
/// and serve; a client's write through syncar and a plain-SQL commit return once the relay
/// confirmed them, which it does as soon as it has applied them, not on a timer.
#[tokio::test]
async fn the_relay_as_a_synchronous_standby_never_deadlocks_syncar() {
    let env = Env::new_on_postgres_with("-c synchronous_commit=on").await;
    let pg = env.pg().await;
    name_the_relay(&pg).await;
    let a = env.start(wal).await;
    // b hears Redis through a delay line: its evictions, and its reports, come late.
    let (line, b) = behind_a_line(&env).await;
    let sync: String = eventually(WINDOW, "the relay is the synchronous standby", || async {
        let state: Option<String> = pg
            .query_opt(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'syncar-relay'",
                &[],
            )
            .await
            .ok()?
            .map(|r| r.get(0));
        state.filter(|s| s == "sync")
    })
    .await;
    assert_eq!(sync, "sync");

    let v = a.put("/v1/kv/s", "1").await.etag_version();
    sees(&b, "/v1/kv/s", v).await;
    // Once every instance reports (within a heartbeat of the relay seeing itself
    // synchronous), a commit returns only when every instance has applied it: a read right
    // after it, anywhere, never gets the older copy, though both held it in L1.
    for i in [&a, &b] {
        eventually(WINDOW, "the relay waits for the instances", || async {
            (i.readyz().await["feeds"]["postgres"]["relay"]["sync"] == true).then_some(())
        })
        .await;
    }
    // Without the wait, b would serve its old copy for the delay after every commit.
    line.delay(Duration::from_millis(40));
    for round in 0..20 {
        for i in [&a, &b] {
            eventually(WINDOW, "the key in L1", || async {
                (i.get("/v1/kv/s").await.header("x-cache") == Some("l1")).then_some(())
            })
            .await;
        }
        let started = Instant::now();
        let v: i64 = query_value(
            &pg,
            &format!("UPDATE syncar_kv SET value = '{round}' WHERE key = 's' RETURNING version"),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {round}: a plain-SQL commit waited {:?} for the relay",
            started.elapsed()
        );
        for (name, i) in [("a", &a), ("b", &b)] {
            let r = i.get("/v1/kv/s").await;
            assert_eq!(
                r.etag_version(),
                v,
                "round {round}: instance {name} served {:?} after the commit returned",
                r.header("x-cache")
            );
        }
    }

    // b goes silent (nothing reaches it, none of its reports leave): it is waited for no
    // longer than its lease, by when it no longer trusts its L1.
    line.blackhole();
    let started = Instant::now();
    let v: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '\"silent\"' WHERE key = 's' RETURNING version",
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "a silent instance held a commit for {waited:?} (its lease is 1 s)"
    );
    sees(&a, "/v1/kv/s", v).await;
    line.restore();
    line.delay(Duration::ZERO);
    // Every instance gone (no relay: the customer's commits would wait, as Postgres
    // documents for a synchronous standby that is gone), then back: starting, migrating and
    // electing a relay commit nothing that waits for it.
    a.shutdown().await;
    b.shutdown().await;
    let a = env.start(wal).await;
    let v = a.put("/v1/kv/s", "\"back\"").await.etag_version();
    sees(&a, "/v1/kv/s", v).await;
    let back: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '\"sql\"' WHERE key = 's' RETURNING version",
    )
    .await;
    sees(&a, "/v1/kv/s", back).await;
    a.shutdown().await;
}

/// The relay as a synchronous standby through the faults that replace it: its instance
/// SIGKILLed mid-run, then Redis restarted empty, then its walsender terminated. A plain-SQL commit waits at most the
/// relay's lease (2 s) plus a second before a new relay confirms it (the margin here is
/// for a loaded machine; bench-stale measures it), and once it returns no instance serves
/// the older copy, not even one that hears Redis 15 ms late. (A new term once read its
/// walsender's `async`, shown before it reports a flush position, and confirmed on publish
/// for half a second: that instance then served the older copy nearly every run.)
#[tokio::test]
async fn a_synchronous_relay_killed_or_its_redis_restarted_stalls_commits_boundedly() {
    let env = Env::new_on_postgres_with("-c synchronous_commit=on").await;
    let redis = RedisServer::start();
    let env = env.on_redis(redis.url());
    let pg = env.pg().await;
    name_the_relay(&pg).await;
    let mut first = Process::spawn(&env, "serve", "first", true);
    first.ready().await;
    // The third hears Redis 15 ms late: a commit that returns before it applied shows.
    let redis_addr: SocketAddr = redis.url().trim_start_matches("redis://").parse().unwrap();
    let line = crate::support::Proxy::start(redis_addr).await;
    line.delay(Duration::from_millis(15));
    let late = env.on_redis(format!("redis://{}", line.addr));
    let others = [
        Process::spawn(&env, "serve", "second", true),
        Process::spawn(&late, "serve", "third", true),
    ];
    for p in &others {
        p.ready().await;
    }
    let relay = eventually(WINDOW, "a relay", || async { first.relay().await }).await;
    assert!(
        relay.starts_with("first-"),
        "the first to start relays: {relay}"
    );
    let v: i64 = query_value(
        &pg,
        "INSERT INTO syncar_kv (key, value) VALUES ('k', '0') RETURNING version",
    )
    .await;
    for p in others.iter().chain([&first]) {
        eventually(WINDOW, "the relay waits for every instance", || async {
            let r = p.readyz().await?;
            (r["feeds"]["postgres"]["relay"]["sync"] == true).then_some(())
        })
        .await;
        eventually(WINDOW, "the row everywhere", || async {
            (p.version("/v1/kv/k").await == Some(v)).then_some(())
        })
        .await;
    }

    // Bound: the relay's lease (2 s) plus a second, as the issue sets it; the rest is margin.
    let bound = Duration::from_secs(5);
    let mut longest = Duration::ZERO;
    let mut round = 0;
    let mut commit_and_read = async |live: &[&Process], round: i32| {
        let started = Instant::now();
        let v: i64 = query_value(
            &pg,
            &format!("UPDATE syncar_kv SET value = '{round}' WHERE key = 'k' RETURNING version"),
        )
        .await;
        let waited = started.elapsed();
        assert!(
            waited < bound,
            "round {round}: a commit waited {waited:?} for the relay"
        );
        longest = longest.max(waited);
        for (i, p) in live.iter().enumerate() {
            let seen = p.version("/v1/kv/k").await;
            assert_eq!(
                seen,
                Some(v),
                "round {round}: instance {i} served {seen:?} after the commit of {v} returned"
            );
        }
    };
    let all = [&first, &others[0], &others[1]];
    for _ in 0..10 {
        round += 1;
        commit_and_read(&all, round).await;
    }
    first.child.kill().unwrap(); // SIGKILL, mid-run: no word to anyone
    first.child.wait().unwrap();
    let survivors = [&others[0], &others[1]];
    for _ in 0..30 {
        round += 1;
        commit_and_read(&survivors, round).await;
    }
    let relay = eventually(WINDOW, "another relay", || async {
        others[0].relay().await.filter(|r| !r.starts_with("first-"))
    })
    .await;
    assert!(!relay.starts_with("first-"), "{relay}");

    redis.restart(); // empty
    for _ in 0..30 {
        round += 1;
        commit_and_read(&survivors, round).await;
    }
    // The relay waits for the instances again (they report after resubscribing).
    for p in survivors {
        eventually(
            WINDOW,
            "the relay waits for the instances again",
            || async {
                let r = p.readyz().await?;
                (r["feeds"]["postgres"]["relay"]["sync"] == true
                    && r["feeds"]["postgres"]["up"] == true)
                    .then_some(())
            },
        )
        .await;
    }
    for _ in 0..10 {
        round += 1;
        commit_and_read(&survivors, round).await;
    }
    // The relay's walsender terminated: its term ends and the next one (the same instance,
    // or another) confirms nothing an instance has not applied.
    pg.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_replication \
         WHERE application_name = 'syncar-relay'",
    )
    .await
    .unwrap();
    for _ in 0..30 {
        round += 1;
        commit_and_read(&survivors, round).await;
    }
    eprintln!("the longest commit through the three faults waited {longest:?}");
}

/// `?consistency=strong` on syncar's own writes, and `feeds.synchronous_writes` for all of
/// them, where the server's commits do not wait (`synchronous_commit = local`): a PUT, a
/// DELETE and a transaction so made return only once every instance applied them (b hears
/// Redis through a 40 ms delay line, so without the wait the other would serve its old copy
/// right after). With the relay no longer a synchronous standby such a write is refused,
/// 503 `not_synchronous`, and writes nothing; on another source it is refused too.
#[tokio::test]
async fn strong_writes_return_once_every_instance_applied_them() {
    let env = Env::new_on_postgres_with("-c synchronous_commit=local").await;
    let pg = env.pg().await;
    name_the_relay(&pg).await;
    // a writes strongly by configuration; b by asking.
    let a = env
        .start(|c| {
            wal(c);
            c.feeds.synchronous_writes = true;
        })
        .await;
    let (line, b) = behind_a_line(&env).await;
    for i in [&a, &b] {
        eventually(WINDOW, "the relay waits for the instances", || async {
            (i.readyz().await["feeds"]["postgres"]["relay"]["sync"] == true).then_some(())
        })
        .await;
    }
    let v = a.put("/v1/kv/s", "0").await.etag_version();
    sees(&b, "/v1/kv/s", v).await;
    line.delay(Duration::from_millis(40));
    let in_l1 = |i: &'static str, instance: &Instance| {
        let addr = instance.addr();
        async move {
            eventually(WINDOW, &format!("the key in {i}'s L1"), || async {
                let r = request(addr, "GET", "/v1/kv/s", &[], None).await;
                (r.header("x-cache") == Some("l1")).then_some(())
            })
            .await;
        }
    };
    for round in 0..5 {
        in_l1("a", &a).await;
        in_l1("b", &b).await;
        // By configuration, from a; read on b, which hears it 40 ms late.
        let v = a.put("/v1/kv/s", &format!("{round}")).await.etag_version();
        assert_eq!(b.get("/v1/kv/s").await.etag_version(), v, "round {round}");
        in_l1("a", &a).await;
        in_l1("b", &b).await;
        // Asked for, from b; read on a.
        let r = request(
            b.addr(),
            "PUT",
            "/v1/kv/s?consistency=strong",
            &[],
            Some(format!("\"b{round}\"").as_bytes()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.code());
        assert_eq!(a.get("/v1/kv/s").await.etag_version(), r.etag_version());
    }
    in_l1("b", &b).await;
    let r = request(a.addr(), "DELETE", "/v1/kv/s", &[], None).await;
    assert_eq!(r.status, 204);
    assert_eq!(b.get("/v1/kv/s").await.status, 404, "deleted, strongly");
    b.put("/v1/kv/t", "1").await;
    in_l1("b", &b).await;
    let body = serde_json::json!({"operations": [
        {"op": "put", "resource": "kv", "key": "s", "document": "tx"},
        {"op": "delete", "resource": "kv", "key": "t"},
    ]});
    let r = request(
        a.addr(),
        "POST",
        "/v1",
        &[],
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.code());
    assert_eq!(b.get("/v1/kv/s").await.json(), "tx");
    // The same transaction through b, opted out: it commits as the session does.
    let r = request(
        b.addr(),
        "POST",
        "/v1?consistency=default",
        &[],
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.code());
    line.delay(Duration::ZERO);

    // The relay no longer a synchronous standby: strong writes are refused, not weakened.
    pg.batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .await
        .unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(WINDOW, "the relay sees itself asynchronous", || async {
        (b.readyz().await["feeds"]["postgres"]["relay"]["sync"] == false).then_some(())
    })
    .await;
    let before: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 's'").await;
    for (i, path) in [(&a, "/v1/kv/s"), (&b, "/v1/kv/s?consistency=strong")] {
        let r = i.put(path, "\"refused\"").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.code(), "not_synchronous");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains("synchronous_standby_names") && message.contains("async"),
            "{message}"
        );
    }
    // A strong DELETE: its statement runs beside the check, in the same round trip, and is
    // rolled back when the check refuses.
    for (i, path) in [(&a, "/v1/kv/s"), (&b, "/v1/kv/s?consistency=strong")] {
        let r = request(i.addr(), "DELETE", path, &[], None).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.code(), "not_synchronous");
    }
    let after: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 's'").await;
    assert_eq!(before, after, "a refused strong write wrote nothing");
    let r = request(
        a.addr(),
        "PUT",
        "/v1/kv/s?consistency=default",
        &[],
        Some(b"1"),
    )
    .await;
    assert_eq!(r.status, 200, "opted out of the configuration");
    let r = request(
        b.addr(),
        "PUT",
        "/v1/kv/s?consistency=eventual",
        &[],
        Some(b"1"),
    )
    .await;
    assert_eq!(r.status, 200, "eventual opts out too");
    let r = request(
        b.addr(),
        "PUT",
        "/v1/kv/s?consistency=weak",
        &[],
        Some(b"1"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.code(), "invalid_query");

    // The changes log has no acknowledgement from the instances to wait for.
    let other = Env::new().await.start(|_| {}).await;
    let r = request(
        other.addr(),
        "PUT",
        "/v1/kv/x?consistency=strong",
        &[],
        Some(b"1"),
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("changes_log"));
    assert_eq!(other.get("/v1/kv/x").await.status, 404, "nothing written");
}

/// Nothing bounding the WAL the slot keeps (`max_slot_wal_keep_size = -1`, Postgres'
/// default) is said by `check-config --db`, with what to set; a bounded one is not.
#[tokio::test]
async fn check_config_warns_when_nothing_bounds_the_slots_wal() {
    for (env, unbounded) in [
        (
            Env::new_on_postgres_with("-c max_slot_wal_keep_size=-1").await,
            true,
        ),
        (Env::new().await, false),
    ] {
        let mut config = env.config();
        config.feeds.postgres_source = PostgresSource::Wal;
        syncar::app::run_migration(&config).await.unwrap();
        let check = syncar::app::run_check(&config).await.unwrap();
        let warned = check
            .notes
            .iter()
            .any(|n| n.starts_with("warning: max_slot_wal_keep_size is -1"));
        assert_eq!(warned, unbounded, "{:?}", check.notes);
    }
}

/// What Postgres decodes for the `syncar` publication, logical messages included, while
/// `run` runs: each change's pgoutput bytes, read through a logical slot of the test's own
/// (dropped after, so that it retains no WAL).
async fn decoded<F: std::future::Future>(
    env: &Env,
    pg: &tokio_postgres::Client,
    run: F,
) -> (F::Output, Vec<Vec<u8>>) {
    let slot = format!("peek_{}", env.prefix.trim_end_matches(':'));
    pg.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    let out = run.await;
    let data = pg
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'syncar', 'messages', 'true')",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    (out, data)
}

/// Whether `data` holds `text`.
fn holds(data: &[u8], text: &str) -> bool {
    data.windows(text.len()).any(|w| w == text.as_bytes())
}

/// A Postgres where commits wait (`synchronous_commit = on`) for the relay, named in
/// `synchronous_standby_names`, and an instance the relay waits for.
async fn synchronous_relay() -> (Env, tokio_postgres::Client, Instance) {
    let env = Env::new_on_postgres_with("-c synchronous_commit=on").await;
    let pg = env.pg().await;
    name_the_relay(&pg).await;
    let a = env.start(wal).await;
    eventually(WINDOW, "the relay waits for a", || async {
        let relay = &a.readyz().await["feeds"]["postgres"]["relay"];
        (relay["sync"] == true && relay["listed"] == true).then_some(())
    })
    .await;
    (env, pg, a)
}

/// `kv`'s generation as Redis holds it.
async fn kv_generation(env: &Env) -> Option<String> {
    let mut conn = env.redis().await;
    redis::cmd("HGET")
        .arg(format!("{}generations", env.prefix))
        .arg("kv")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A bulk statement, changing more than `FLUSH_ABOVE_KEYS` rows of one table, flushes its
/// resource (its generation raised) instead of invalidating each key: the relay keeps no key
/// of it, and the delete trigger emits one flush where it would have named every key in one
/// message (read back from the WAL through a slot of the test's own). Every instance then
/// serves what Postgres holds. A smaller statement is invalidated key by key, no flush.
#[tokio::test]
async fn a_bulk_statement_flushes_its_resource_instead_of_every_key() {
    let env = Env::new().await;
    let a = env.start(wal).await;
    // A relay that may be a synchronous standby keeps every key (a flush would let a read
    // fill the old rows before Postgres shows the commit): wait until it knows it is not.
    eventually(WINDOW, "the relay knows it is asynchronous", || async {
        (a.readyz().await["feeds"]["postgres"]["relay"]["sync"] == false).then_some(())
    })
    .await;
    let pg = env.pg().await;
    let bulk = syncar::schema::FLUSH_ABOVE_KEYS + 500;
    let initial = kv_generation(&env).await;
    pg.execute(
        "INSERT INTO syncar_kv (key, value) \
         SELECT 'k' || i, '{\"n\": 1}' FROM generate_series(1, $1::int) i",
        &[&(bulk as i32)],
    )
    .await
    .unwrap();
    eventually(WINDOW, "the bulk INSERT flushed kv", || async {
        (kv_generation(&env).await != initial).then_some(())
    })
    .await;
    let v1: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'k1'").await;
    sees(&a, "/v1/kv/k1", v1).await;
    let small = a.put("/v1/kv/small", "1").await.etag_version();
    sees(&a, "/v1/kv/small", small).await;

    // Small: key by key.
    let before = kv_generation(&env).await;
    pg.batch_execute("UPDATE syncar_kv SET value = '2' WHERE key = 'small'")
        .await
        .unwrap();
    let small2: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'small'").await;
    sees(&a, "/v1/kv/small", small2).await;
    assert_eq!(kv_generation(&env).await, before, "no flush for one key");

    // A bulk UPDATE: flushed.
    pg.batch_execute("UPDATE syncar_kv SET value = '{\"n\": 2}' WHERE key LIKE 'k%'")
        .await
        .unwrap();
    let v2: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'k1'").await;
    sees(&a, "/v1/kv/k1", v2).await;
    let flushed = eventually(WINDOW, "the bulk UPDATE flushed kv", || async {
        let now = kv_generation(&env).await;
        (now != before).then_some(now)
    })
    .await;

    // A bulk DELETE: the trigger emits a flush, not a message of every key.
    // (Decoded once the instance has it: a commit is decoded only once its WAL is flushed,
    // which these test servers, `synchronous_commit = off`, leave to the WAL writer.)
    let ((), data) = decoded(&env, &pg, async {
        pg.batch_execute("DELETE FROM syncar_kv WHERE key LIKE 'k%'")
            .await
            .unwrap();
        sees_absent(&a, "/v1/kv/k1").await;
        sees(&a, "/v1/kv/small", small2).await;
        eventually(WINDOW, "the bulk DELETE flushed kv", || async {
            (kv_generation(&env).await != flushed).then_some(())
        })
        .await;
    })
    .await;
    let deletes = data.iter().filter(|d| holds(d, "\"deletes\"")).count();
    let flushes = data.iter().filter(|d| holds(d, "\"flush\"")).count();
    let largest = data.iter().map(Vec::len).max().unwrap_or(0);
    assert_eq!(
        (deletes, flushes),
        (0, 1),
        "one flush message, no message naming the keys"
    );
    assert!(largest < 1000, "no message of every key: {largest} bytes");
}

/// With `notify`, a bulk statement (more than `FLUSH_ABOVE_KEYS` rows) queues no more than
/// that many notifications and then one flush of its resource (a notification per key would
/// fail the customer's commit past Postgres' 8 GB queue), and every instance serves what
/// Postgres holds after it; one row still announces its key.
#[tokio::test]
async fn a_bulk_statement_under_notify_is_bounded_by_a_flush() {
    let env = Env::new().await;
    let a = env
        .start(|c| c.feeds.postgres_source = PostgresSource::Notify)
        .await;
    let pg = env.pg().await;
    let limit = syncar::schema::FLUSH_ABOVE_KEYS;
    // What the statement `sql` logs (and notifies): (op, key) of each, in version order.
    let logged = |sql: &str| {
        let (pg, sql) = (&pg, sql.to_string());
        async move {
            let last: i64 = query_value(
                pg,
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM syncar_version_seq",
            )
            .await;
            pg.batch_execute(&sql).await.unwrap();
            pg.query(
                "SELECT op, key FROM syncar_changes WHERE resource = 'kv' AND version > $1 \
                 ORDER BY version",
                &[&last],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
            .collect::<Vec<_>>()
        }
    };
    let bounded = |rows: Vec<(String, Option<String>)>| {
        assert_eq!(rows.len(), limit + 1, "{limit} keys, then the flush");
        assert_eq!(rows.last().unwrap(), &("flush".to_string(), None));
    };
    bounded(
        logged(&format!(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '1' \
             FROM generate_series(1, {}) i",
            limit + 500
        ))
        .await,
    );
    let v1: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'k1'").await;
    sees(&a, "/v1/kv/k1", v1).await;
    bounded(logged("UPDATE syncar_kv SET value = '2' WHERE key LIKE 'k%'").await);
    let v2: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'k1'").await;
    sees(&a, "/v1/kv/k1", v2).await;
    assert_eq!(
        logged("UPDATE syncar_kv SET value = '3' WHERE key = 'k2'").await,
        vec![("put".to_string(), Some("k2".to_string()))],
    );
    bounded(logged("DELETE FROM syncar_kv WHERE key LIKE 'k%'").await);
    sees_absent(&a, "/v1/kv/k1").await;
    a.shutdown().await;
}

/// Under a synchronous relay a bulk statement keeps its keys: no flush, since Postgres shows
/// the commit only once every instance has applied it, and a flush would let a read in
/// between fill the old rows under the new generation. Every instance serves the new rows.
#[tokio::test]
async fn a_synchronous_relay_invalidates_a_bulk_statement_key_by_key() {
    let (env, pg, a) = synchronous_relay().await;
    pg.execute(
        "INSERT INTO syncar_kv (key, value) \
         SELECT 'k' || i, '1' FROM generate_series(1, $1::int) i",
        &[&((syncar::schema::FLUSH_ABOVE_KEYS + 500) as i32)],
    )
    .await
    .unwrap();
    let before = kv_generation(&env).await;
    pg.batch_execute("UPDATE syncar_kv SET value = '2' WHERE key LIKE 'k%'")
        .await
        .unwrap();
    for key in ["k1", "k5000", "k10400"] {
        let v: i64 = query_value(
            &pg,
            &format!("SELECT version FROM syncar_kv WHERE key = '{key}'"),
        )
        .await;
        sees(&a, &format!("/v1/kv/{key}"), v).await;
    }
    assert_eq!(kv_generation(&env).await, before, "no flush");
    a.shutdown().await;
}

/// A migration that puts a table back in the publication (taken out while it had no
/// replica identity) flushes its resource in the same transaction: its changes until then
/// were never relayed. Read back from the WAL through a slot of the test's own.
#[tokio::test]
async fn a_migration_publishing_a_table_again_flushes_it() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE items (id int NOT NULL, name text); \
         CREATE UNIQUE INDEX items_id ON items (id); \
         ALTER TABLE items ADD CONSTRAINT items_pkey PRIMARY KEY (id)",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::Wal;
    config
        .resources
        .push(crate::support::resource("items", "id", "version"));
    syncar::app::run_migration(&config).await.unwrap();
    pg.batch_execute("ALTER TABLE items DROP CONSTRAINT items_pkey")
        .await
        .unwrap();
    let out = syncar::app::run_migration(&config).await.unwrap();
    assert!(
        out.unavailable
            .iter()
            .any(|u| u.contains("replica identity")),
        "{out:?}"
    );
    pg.batch_execute("ALTER TABLE items ADD PRIMARY KEY (id)")
        .await
        .unwrap();
    let (out, data) = decoded(&env, &pg, async {
        syncar::app::run_migration(&config).await.unwrap()
    })
    .await;
    let flushes = data
        .iter()
        .filter(|d| holds(d, "\"flush\" : true") && holds(d, "\"items\""))
        .count();
    assert!(
        out.changes
            .iter()
            .any(|c| c.contains("publication syncar names")),
        "{:?}",
        out.changes
    );
    assert_eq!(
        flushes, 1,
        "one flush of items with its return to the publication"
    );
}
