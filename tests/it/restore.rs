//! Tiers that come back from the past: a Redis restarted from an older snapshot, a lagging
//! replica promoted in its place. What either holds may be older than writes already
//! acknowledged, and the version rule would protect it; syncar must read none of it.

use std::time::Duration;

use syncar::config::PostgresSource;

use crate::support::{eventually, query_value, Env, Proxy, RedisServer};

const WINDOW: Duration = Duration::from_secs(10);

async fn redis_command(url: &str, args: &[&str]) -> redis::Value {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The issue's steps: version 1 saved in an RDB, version 3 written and read everywhere, the
/// outage long past `feeds.replay_margin`, then redis-server SIGKILLed and started again from
/// that RDB. Every instance reads version 3 from then on, never version 1, on both sources
/// (the changes log replays only the outage; the relay replays nothing).
#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_is_never_read() {
    for source in [PostgresSource::ChangesLog, PostgresSource::Wal] {
        let env = Env::new().await;
        let redis = RedisServer::start_persistent(&[]);
        let url = redis.url();
        let configure = |c: &mut syncar::Config| {
            c.redis.url = url.clone();
            c.redis.retry_interval = Duration::from_millis(200);
            c.feeds.postgres_source = source;
            c.feeds.replay_margin = Duration::from_millis(100);
        };
        let a = env.start(configure).await;
        let b = env.start(configure).await;
        let v1 = a.put("/v1/kv/s1", r#"{"v":1}"#).await.etag_version();
        let on_redis = env.on_redis(url.clone());
        let name = on_redis.redis_key("kv", "s1").await;
        redis_command(&url, &["SAVE"]).await;
        let v3 = a.put("/v1/kv/s1", r#"{"v":2}"#).await.etag_version();
        for i in [&a, &b] {
            i.sees("/v1/kv/s1", v3, WINDOW).await;
        }
        // Past the replay margin: only knowing the incarnation can save the day.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.restart();
        let restored = on_redis.redis_get(&name).await;
        assert!(
            restored
                .as_deref()
                .is_some_and(|e| e.starts_with(&format!("{v1}:"))),
            "{source:?}: the snapshot holds version 1: {restored:?}"
        );
        for i in [&a, &b] {
            i.feed_becomes("redis", true, WINDOW).await;
        }
        for i in [&a, &b] {
            for _ in 0..3 {
                let r = i.get("/v1/kv/s1").await;
                assert_eq!(r.etag_version(), v3, "{source:?}: {r:?}");
                assert_eq!(r.json(), serde_json::json!({"v": 2}));
            }
        }
        let reset = a.state().probes.redis_trusted() && b.state().probes.redis_trusted();
        assert!(reset, "{source:?}: redis trusted again once checked");
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A replica that stopped replicating (it missed version 2) is promoted behind the endpoint
/// the instances use (as a managed service's failover or a DNS switch does): the instances
/// go on reading version 2, never the replica's version 1. (The changes log replays only the
/// outage, and version 2 is older than that; the relay of the `wal` source would re-stream
/// what its slot had not moved past, which repairs by chance.)
#[tokio::test]
async fn a_lagging_replica_promoted_behind_the_endpoint_is_never_read() {
    let env = Env::new().await;
    let master = RedisServer::start_persistent(&[]);
    let port = master.port.to_string();
    let replica = RedisServer::start_persistent(&["--replicaof", "127.0.0.1", &port]);
    let endpoint = Proxy::start(([127, 0, 0, 1], master.port).into()).await;
    let url = format!("redis://{}", endpoint.addr);
    let configure = |c: &mut syncar::Config| {
        c.redis.url = url.clone();
        c.redis.retry_interval = Duration::from_millis(200);
        c.feeds.postgres_source = PostgresSource::ChangesLog;
        c.feeds.replay_margin = Duration::from_millis(100);
    };
    let a = env.start(configure).await;
    let b = env.start(configure).await;
    let v1 = a.put("/v1/kv/f", "1").await.etag_version();
    let replica_env = env.on_redis(replica.url());
    eventually(WINDOW, "the replica to have version 1", || async {
        let e = replica_env.redis_entry("kv", "f").await?;
        e.starts_with(&format!("{v1}:")).then_some(())
    })
    .await;
    redis_command(&replica.url(), &["REPLICAOF", "NO", "ONE"]).await;
    let v2 = a.put("/v1/kv/f", "2").await.etag_version();
    for i in [&a, &b] {
        i.sees("/v1/kv/f", v2, WINDOW).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    endpoint.retarget(([127, 0, 0, 1], replica.port).into());
    drop(master);
    for i in [&a, &b] {
        i.feed_becomes("redis", true, WINDOW).await;
    }
    for i in [&a, &b] {
        for _ in 0..3 {
            let r = i.get("/v1/kv/f").await;
            assert_eq!(r.etag_version(), v2, "{r:?}");
        }
    }
}

/// `SELECT setval(...)`, as a dump restored without the sequence's state (or restored from
/// an older backup) leaves it: a write takes a version below the cached one, or the very
/// version cached (handed out twice, with other content). The writer still reads its own
/// write, and so does every other instance; the sequence is moved past every version seen;
/// the repair is counted.
#[tokio::test]
async fn a_write_below_or_at_a_cached_version_is_repaired_and_readable() {
    for behind in [Behind::Far, Behind::Collision] {
        let env = Env::new().await;
        let a = env.start(|_| {}).await;
        let b = env.start(|_| {}).await;
        let mut high = 0;
        for i in 0..5 {
            high = a.put("/v1/kv/w", &i.to_string()).await.etag_version();
        }
        for i in [&a, &b] {
            i.sees("/v1/kv/w", high, WINDOW).await;
        }
        let pg = env.pg().await;
        let to = match behind {
            Behind::Far => 1,
            Behind::Collision => high - 1,
        };
        pg.batch_execute(&format!("SELECT setval('syncar_version_seq', {to})"))
            .await
            .unwrap();
        let put = a.put("/v1/kv/w", r#""after""#).await;
        assert_eq!(put.status, 200, "{behind:?}: {put:?}");
        let v = put.etag_version();
        assert!(
            v > high,
            "{behind:?}: a version above the cached {high}: {v}"
        );
        let mine = a.get("/v1/kv/w").await;
        assert_eq!(
            (mine.etag_version(), mine.json()),
            (v, serde_json::json!("after")),
            "{behind:?}"
        );
        b.sees("/v1/kv/w", v, WINDOW).await;
        let last: i64 = query_value(&pg, "SELECT last_value FROM syncar_version_seq").await;
        assert!(
            last >= v,
            "{behind:?}: the sequence moved past every version seen"
        );
        let metrics = String::from_utf8_lossy(&a.get("/metrics").await.body).into_owned();
        assert!(
            metrics.contains("syncar_version_regressions_total"),
            "{metrics}"
        );
        // Fresh writes are ordinary again.
        let next = a.put("/v1/kv/w", r#""later""#).await.etag_version();
        assert!(next > v);
        b.sees("/v1/kv/w", next, WINDOW).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Behind {
    /// The next version is far below the cached one.
    Far,
    /// The next version is the cached one.
    Collision,
}

/// A restore from a backup: the row and the version sequence go back (written here with
/// the triggers off, as a restore writes), and the server drops every connection. Once the
/// feeds reconnect, the instances serve what Postgres now holds, not the newer copies
/// cached before; the sequence is moved past them, so later writes win again.
#[tokio::test]
async fn postgres_restored_from_a_backup_is_noticed_when_the_feeds_reconnect() {
    let env = Env::new().await;
    let configure = |c: &mut syncar::Config| c.feeds.replay_margin = Duration::from_millis(100);
    let a = env.start(configure).await;
    let b = env.start(configure).await;
    let old = a.put("/v1/kv/r", r#""backed up""#).await.etag_version();
    let pg = env.pg().await;
    let backup_sequence: i64 = query_value(&pg, "SELECT last_value FROM syncar_version_seq").await;
    let new = a.put("/v1/kv/r", r#""lost""#).await.etag_version();
    for i in [&a, &b] {
        i.sees("/v1/kv/r", new, WINDOW).await;
    }
    // Past the replay margin: the changes log cannot repair this by chance.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let triggers: Vec<(String, String)> = pg
        .query(
            "SELECT tgname::text, tgenabled::text FROM pg_trigger \
             WHERE tgrelid = 'syncar_kv'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut restore = String::from("ALTER TABLE syncar_kv DISABLE TRIGGER USER;");
    restore.push_str(&format!(
        "UPDATE syncar_kv SET value = '\"backed up\"', version = {old} WHERE key = 'r';"
    ));
    for (name, enabled) in &triggers {
        let mode = if enabled == "A" {
            "ENABLE ALWAYS"
        } else {
            "ENABLE"
        };
        restore.push_str(&format!("ALTER TABLE syncar_kv {mode} TRIGGER {name};"));
    }
    restore.push_str(&format!(
        "SELECT setval('syncar_version_seq', {backup_sequence});\
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid();"
    ));
    let restored_at = syncar::model::now_ms();
    pg.batch_execute(&restore).await.unwrap();
    for i in [&a, &b] {
        // The feed came back after the restore (the down spell may be too short to see).
        crate::support::eventually(
            WINDOW,
            "the feed back, serving the restored document",
            || async {
                let feed = i.readyz().await["feeds"]["postgres"].clone();
                let back = feed["up"] == true && feed["since_unix_ms"].as_u64()? > restored_at;
                let r = i.get("/v1/kv/r").await;
                (back && r.status == 200 && r.etag_version() == old).then_some(())
            },
        )
        .await;
        assert_eq!(
            i.get("/v1/kv/r").await.json(),
            serde_json::json!("backed up")
        );
    }
    let later = b
        .put("/v1/kv/r", r#""after the restore""#)
        .await
        .etag_version();
    assert!(later > new, "the sequence moved past {new}: {later}");
    for i in [&a, &b] {
        i.sees("/v1/kv/r", later, WINDOW).await;
    }
}

/// A read while this instance does not trust Redis yet (Redis restarted empty, and the
/// guard's check held up: another instance holds the state row it must update) fills no
/// copy into Redis: the generations known here may be older than the ones about to be
/// raised, and the copy would land where nobody reads. Once the guard has run, reads fill
/// Redis again, in the generation it raised.
#[tokio::test]
async fn no_fill_lands_in_redis_before_the_guard_trusts_it() {
    let server = RedisServer::start();
    let env = Env::new().await.on_redis(server.url());
    let a = env.start(|_| {}).await;
    let v = a.put("/v1/kv/x", "1").await.etag_version();
    assert!(
        env.redis_entry("kv", "x").await.is_some(),
        "written to redis"
    );
    let old_key = env.redis_key("kv", "x").await;

    // Another session holds the row the guard updates when it meets a new incarnation.
    let mut holder = env.pg().await;
    let hold = holder.transaction().await.unwrap();
    let row: Option<String> = hold
        .query_opt(
            "SELECT value FROM syncar_state WHERE name = $1 FOR UPDATE",
            &[&format!("redis_run_id:{}", env.prefix)],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert!(
        row.is_some(),
        "the guard recorded the incarnation it trusts"
    );
    server.restart(); // empty: a new incarnation
    let probes = a.state().probes.clone();
    eventually(WINDOW, "redis distrusted", || {
        let probes = probes.clone();
        async move { (!probes.redis_trusted()).then_some(()) }
    })
    .await;
    for _ in 0..5 {
        let r = a.get("/v1/kv/x").await;
        assert_eq!(r.etag_version(), v);
        assert_eq!(
            r.header("x-cache"),
            Some("db"),
            "an untrusted redis is not read"
        );
    }
    assert!(!probes.redis_trusted(), "still held up by the locked row");
    // A tombstone may be there (the changes log's replay after the outage writes the
    // changes' tombstones, which are safe anywhere); a copy of the document must not.
    let entry = match redis_command(&server.url(), &["GET", &old_key]).await {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
        _ => String::new(),
    };
    assert!(
        entry.split(':').nth(1) != Some("v"),
        "a fill landed in {old_key} before the guard ran: {entry}"
    );

    hold.commit().await.unwrap();
    eventually(WINDOW, "redis trusted again", || {
        let probes = probes.clone();
        async move { probes.redis_trusted().then_some(()) }
    })
    .await;
    eventually(WINDOW, "a fill in the raised generation", || async {
        let _ = a.get("/v1/kv/x").await;
        let key = env.redis_key("kv", "x").await;
        (key != old_key && env.redis_entry("kv", "x").await.is_some()).then_some(())
    })
    .await;
}
