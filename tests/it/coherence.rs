//! Coherence across instances: three syncar instances against the real Postgres and Redis,
//! through writes, plain SQL, and feeds that die loudly or silently.

use std::time::Duration;

use serde_json::json;
use syncar::coherence::{Feed, Message, Op};
use syncar::config::PostgresSource;
use syncar::model::{CacheKey, Version};

use crate::support::{eventually, query_value, request, Env, Instance, RedisServer};

/// How long a change may take to reach every instance in these tests: the product's window
/// is about a second; the margin absorbs a loaded CI machine.
const WINDOW: Duration = Duration::from_secs(5);

async fn three(env: &Env, f: impl Fn(&mut syncar::Config)) -> [Instance; 3] {
    [
        env.start(&f).await,
        env.start(&f).await,
        env.start(&f).await,
    ]
}

async fn sees(instance: &Instance, path: &str, version: i64) {
    instance.sees(path, version, WINDOW).await;
}

async fn sees_absent(instance: &Instance, path: &str) {
    instance.sees_absent(path, WINDOW).await;
}

/// The version of the Redis entry, whatever its kind.
async fn redis_version(env: &Env, key: &str) -> Option<i64> {
    env.redis_entry("kv", key)
        .await
        .map(|e| e.split(':').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_put_on_one_instance_reaches_the_others() {
    put_reaches_the_others(PostgresSource::Notify).await;
}

#[tokio::test]
async fn a_put_on_one_instance_reaches_the_others_with_the_changes_log() {
    put_reaches_the_others(PostgresSource::ChangesLog).await;
}

#[tokio::test]
async fn a_put_on_one_instance_reaches_the_others_through_the_wal() {
    put_reaches_the_others(PostgresSource::Wal).await;
}

async fn put_reaches_the_others(source: PostgresSource) {
    let env = Env::new().await;
    let [a, b, c] = three(&env, |c| c.feeds.postgres_source = source).await;
    let v1 = a.put("/v1/kv/k", r#""one""#).await.etag_version();
    for i in [&b, &c] {
        assert_eq!(i.get("/v1/kv/k").await.etag_version(), v1);
        assert_eq!(i.get("/v1/kv/k").await.header("x-cache"), Some("l1"));
    }
    let v2 = a.put("/v1/kv/k", r#""two""#).await.etag_version();
    for i in [&b, &c] {
        sees(i, "/v1/kv/k", v2).await;
        assert_eq!(i.get("/v1/kv/k").await.json(), json!("two"));
    }
    assert_eq!(a.delete("/v1/kv/k").await.status, 204);
    for i in [&b, &c] {
        sees_absent(i, "/v1/kv/k").await;
    }
}

#[tokio::test]
async fn plain_sql_writes_reach_every_instance_and_repair_redis() {
    plain_sql_reaches_everyone(PostgresSource::Notify).await;
}

#[tokio::test]
async fn plain_sql_writes_reach_every_instance_and_repair_redis_with_the_changes_log() {
    plain_sql_reaches_everyone(PostgresSource::ChangesLog).await;
}

#[tokio::test]
async fn plain_sql_reaches_everyone_through_the_wal() {
    plain_sql_reaches_everyone(PostgresSource::Wal).await;
}

async fn plain_sql_reaches_everyone(source: PostgresSource) {
    let env = Env::new().await;
    let [a, b, c] = three(&env, |c| c.feeds.postgres_source = source).await;
    let v1 = a.put("/v1/kv/s", "1").await.etag_version();
    for i in [&a, &b, &c] {
        assert_eq!(i.get("/v1/kv/s").await.etag_version(), v1);
    }
    let pg = env.pg().await;
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 's' RETURNING version",
    )
    .await;
    for i in [&a, &b, &c] {
        sees(i, "/v1/kv/s", v2).await;
    }
    assert!(
        redis_version(&env, "s").await.unwrap() >= v2,
        "Redis holds no older version"
    );

    pg.execute("DELETE FROM syncar_kv WHERE key = 's'", &[])
        .await
        .unwrap();
    for i in [&a, &b, &c] {
        sees_absent(i, "/v1/kv/s").await;
    }
    let entry = env.redis_entry("kv", "s").await.unwrap();
    assert!(entry.contains(":a:"), "Redis holds the deletion: {entry}");
}

/// One statement changing thousands of cached rows: every copy, in L1 and in Redis, is
/// replaced (the poll applies its changes concurrently, in any order).
#[tokio::test]
async fn a_bulk_plain_sql_update_reaches_every_cached_copy() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "INSERT INTO syncar_kv (key, value) SELECT 'b' || i, '1' FROM generate_series(1, 3000) i",
    )
    .await
    .unwrap();
    for i in (1..=3000).step_by(10) {
        assert_eq!(a.get(&format!("/v1/kv/b{i}")).await.json(), json!(1));
    }
    pg.execute("UPDATE syncar_kv SET value = '2'", &[])
        .await
        .unwrap();
    eventually(WINDOW, "every cached copy replaced", || async {
        for i in (1..=3000).step_by(10) {
            if a.get(&format!("/v1/kv/b{i}")).await.json() != json!(2) {
                return None;
            }
        }
        Some(())
    })
    .await;
    for i in (1..=3000).step_by(10) {
        let entry = env.redis_entry("kv", &format!("b{i}")).await;
        assert!(
            entry
                .as_deref()
                .is_none_or(|e| !e.contains(":v:") || e.ends_with(":2")),
            "b{i}: Redis holds no old value: {entry:?}"
        );
    }
}

/// Every instance's LISTEN backend terminated at once, and kept from reconnecting while a
/// plain-SQL write happens: nobody is told, yet nobody serves it stale, during or after.
#[tokio::test]
async fn terminated_listen_backends_mean_bypass_then_replay() {
    terminated_listeners(PostgresSource::Notify).await;
}

#[tokio::test]
async fn terminated_listen_backends_mean_bypass_then_replay_with_the_changes_log() {
    terminated_listeners(PostgresSource::ChangesLog).await;
}

async fn terminated_listeners(source: PostgresSource) {
    let env = Env::new().await;
    // The LISTEN connections go through a proxy that can refuse reconnections.
    let (proxy, listen) = env.pg_proxy().await;
    let [a, b, c] = three(&env, |c| {
        c.postgres.listen_url = Some(listen.clone());
        c.feeds.postgres_source = source;
    })
    .await;
    let v1 = a.put("/v1/kv/t", "1").await.etag_version();
    // `u` is cached in Redis and changed during the outage, but nobody reads it until after:
    // only the replay can fix its Redis entry.
    a.put("/v1/kv/u", "1").await;
    for i in [&a, &b, &c] {
        i.get("/v1/kv/t").await;
        assert_eq!(i.get("/v1/kv/t").await.header("x-cache"), Some("l1"));
    }
    proxy.refuse_new();
    let pg = env.pg().await;
    assert_eq!(env.terminate("syncar-listen").await, 3);
    for i in [&a, &b, &c] {
        i.feed_becomes("postgres", false, WINDOW).await;
    }

    // Written while nobody listens.
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 't' RETURNING version",
    )
    .await;
    assert!(v2 > v1);
    let u2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'u' RETURNING version",
    )
    .await;
    for i in [&a, &b, &c] {
        let r = i.get("/v1/kv/t").await;
        assert_eq!(
            r.etag_version(),
            v2,
            "bypassing L1 and Redis while the feed is down"
        );
        assert_eq!(r.header("x-cache"), Some("db"));
    }

    proxy.restore();
    for i in [&a, &b, &c] {
        i.feed_becomes("postgres", true, Duration::from_secs(20))
            .await;
    }
    assert!(
        redis_version(&env, "u").await.unwrap() >= u2,
        "the replay repaired Redis"
    );
    assert_eq!(a.get("/v1/kv/u").await.etag_version(), u2);
    for i in [&a, &b, &c] {
        assert_eq!(i.get("/v1/kv/t").await.etag_version(), v2);
        let again = i.get("/v1/kv/t").await;
        assert_eq!(again.etag_version(), v2);
        assert_eq!(again.header("x-cache"), Some("l1"), "L1 in use again");
    }
}

/// Redis restarted (empty): feeds and L2 down, then back; a write made meanwhile is not
/// served stale from L1 or Redis.
#[tokio::test]
async fn a_redis_restart_means_bypass_then_flush_and_replay() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let [a, b, c] = three(&env, move |c| {
        c.redis.url = url.clone();
        c.redis.retry_interval = Duration::from_millis(200);
    })
    .await;
    a.put("/v1/kv/r", "1").await;
    for i in [&b, &c] {
        i.get("/v1/kv/r").await;
        assert_eq!(i.get("/v1/kv/r").await.header("x-cache"), Some("l1"));
    }
    redis.kill();
    for i in [&a, &b, &c] {
        i.feed_becomes("redis", false, WINDOW).await;
    }
    let v2 = a.put("/v1/kv/r", "2").await;
    assert_eq!(v2.status, 200, "acknowledged with Redis down");
    let v2 = v2.etag_version();
    for i in [&b, &c] {
        assert_eq!(i.get("/v1/kv/r").await.etag_version(), v2);
    }
    redis.restart();
    for i in [&a, &b, &c] {
        i.feed_becomes("redis", true, Duration::from_secs(20)).await;
    }
    for i in [&a, &b, &c] {
        sees(i, "/v1/kv/r", v2).await;
    }
    let env_here = env.on_redis(redis.url());
    if let Some(raw) = env_here.redis_entry("kv", "r").await {
        let version: i64 = raw.split(':').next().unwrap().parse().unwrap();
        assert!(
            version >= v2,
            "nothing older reachable in the restarted Redis"
        );
    }
}

/// `CLIENT KILL TYPE pubsub`: every subscription dropped; each instance notices, comes back,
/// and a write afterwards reaches everyone.
#[tokio::test]
async fn killed_subscriptions_come_back() {
    let env = Env::new().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let [a, b, c] = three(&env, move |c| c.redis.url = url.clone()).await;
    let before: Vec<u64> = futures_util::future::join_all([&a, &b, &c].map(|i| async move {
        i.readyz().await["feeds"]["redis"]["since_unix_ms"]
            .as_u64()
            .unwrap()
    }))
    .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 3, "one subscription per instance");
    for (i, since) in [&a, &b, &c].iter().zip(before) {
        eventually(WINDOW, "the feed to go down and come back", || async {
            let f = i.readyz().await["feeds"]["redis"].clone();
            (f["up"] == true && f["since_unix_ms"].as_u64().unwrap() > since).then_some(())
        })
        .await;
    }
    let v = a.put("/v1/kv/p", "1").await.etag_version();
    for i in [&b, &c] {
        sees(i, "/v1/kv/p", v).await;
    }
}

/// A LISTEN connection that goes silent without an error (a half-open socket) is caught by
/// the heartbeat within the lease, and L1 is bypassed from then on.
#[tokio::test]
async fn a_silently_dead_feed_is_detected_by_the_heartbeat() {
    let env = Env::new().await;
    let (proxy, listen) = env.pg_proxy().await;
    let a = env
        .start(|c| {
            c.postgres.listen_url = Some(listen.clone());
            c.feeds.unready_when_down = true;
        })
        .await;
    a.put("/v1/kv/h", "1").await;
    assert_eq!(a.get("/v1/kv/h").await.header("x-cache"), Some("l1"));
    proxy.blackhole();
    let took = a.feed_becomes("postgres", false, WINDOW).await;
    eprintln!("silent feed death detected after {took:?} (lease 1s)");
    let r = a.get("/v1/kv/h").await;
    assert_ne!(r.header("x-cache"), Some("l1"), "L1 bypassed");
    let ready = a.get("/readyz").await;
    assert_eq!(ready.status, 503, "unready_when_down");
    assert_eq!(ready.json()["l1_in_use"], false);
}

#[tokio::test]
async fn terminated_pool_connections_are_replaced_invisibly() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    for i in 0..8 {
        a.put(&format!("/v1/kv/p{i}"), "1").await;
    }
    let pg = env.pg().await;
    assert!(env.terminate("syncar").await > 0);
    eventually(WINDOW, "the terminated backends to exit", || async {
        let left: i64 = query_value(
            &pg,
            "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'syncar'",
        )
        .await;
        (left == 0).then_some(())
    })
    .await;
    for i in 0..8 {
        let w = a.put(&format!("/v1/kv/p{i}"), "2").await;
        assert_eq!(w.status, 200, "{w:?}");
        let r = request(
            a.addr(),
            "GET",
            &format!("/v1/kv/p{i}?consistency=strong"),
            &[],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
}

#[tokio::test]
async fn duplicates_and_older_versions_are_no_ops() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let v = a.put("/v1/kv/d", "1").await.etag_version();
    let state = a.state();
    let catalog = state.catalog().unwrap();
    let message = |version: i64, op: Op| Message {
        resource: "kv".into(),
        key: Some("d".into()),
        version,
        op,
        ts_us: None,
        instance: None,
    };
    let tiers = state.tiers.feed_tiers();
    assert!(
        !tiers
            .apply(&catalog, &message(v, Op::Put), Feed::Redis)
            .await,
        "its own write: known"
    );
    assert!(
        tiers
            .apply(&catalog, &message(v + 100, Op::Put), Feed::Redis)
            .await,
        "newer: applied"
    );
    assert!(
        !tiers
            .apply(&catalog, &message(v + 100, Op::Put), Feed::Postgres)
            .await,
        "duplicate"
    );
    assert!(
        !tiers
            .apply(&catalog, &message(v + 50, Op::Delete), Feed::Redis)
            .await,
        "older: ignored"
    );
    let held = state.tiers.peek_l1(&CacheKey::new("kv", "d")).unwrap();
    assert_eq!(held.version, Version(v + 100));
    assert!(!held.is_servable());
    let unknown = Message {
        resource: "nope".into(),
        ..message(v + 200, Op::Put)
    };
    assert!(!tiers.apply(&catalog, &unknown, Feed::Redis).await);
}

#[tokio::test]
async fn min_version_and_strong_reads() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    // A TTL-only instance: nothing tells it about A's writes, so its L1 goes stale.
    let b = env
        .start(|c| {
            c.feeds.postgres = false;
            c.feeds.redis = false;
        })
        .await;
    let v1 = a.put("/v1/kv/m", "1").await.etag_version();
    b.get("/v1/kv/m").await;
    assert_eq!(b.get("/v1/kv/m").await.header("x-cache"), Some("l1"));
    let v2 = a.put("/v1/kv/m", "2").await.etag_version();
    let stale = b.get("/v1/kv/m").await;
    assert_eq!(stale.etag_version(), v1, "what TTL-only caching does");
    assert!(stale.header("age").is_some());

    let ryw = b.get(&format!("/v1/kv/m?min_version={v2}")).await;
    assert_eq!(ryw.etag_version(), v2, "read-your-writes across instances");
    assert_ne!(ryw.header("x-cache"), Some("l1"));

    let v3 = a.put("/v1/kv/m", "3").await.etag_version();
    let strong = b.get("/v1/kv/m?consistency=strong").await;
    assert_eq!(strong.etag_version(), v3);
    assert_eq!(strong.header("x-cache"), Some("db"));
    assert_eq!(strong.header("age"), Some("0"));
    let refreshed = b.get("/v1/kv/m").await;
    assert_eq!(refreshed.etag_version(), v3, "the strong read refreshed L1");
    assert_eq!(refreshed.header("x-cache"), Some("l1"));

    let bad = b.get("/v1/kv/m?consistency=eventual").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.code(), "invalid_query");
}

/// Pauses Redis' writes (scripts and PUBLISH included) for `ms`; reads still answer. The
/// whole server: only on a Redis of the test's own.
async fn pause_redis_writes(env: &Env, ms: u64) {
    let mut redis = env.redis().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_eventual_write_answers_at_commit_and_reaches_redis_and_the_others_behind_it() {
    eventual_writes(Some(PostgresSource::Wal)).await;
}

#[tokio::test]
async fn an_eventual_write_answers_at_commit_with_the_changes_log() {
    eventual_writes(Some(PostgresSource::ChangesLog)).await;
}

/// `feeds.write_consistency = "eventual"`: a write that does not say answers at commit, one
/// with `?consistency=default` once Redis holds it.
#[tokio::test]
async fn a_configured_eventual_default_answers_writes_that_do_not_say_at_commit() {
    let redis_server = RedisServer::start();
    let env = Env::new().await.on_redis(redis_server.url());
    let config = |c: &mut syncar::Config| {
        c.feeds.postgres_source = PostgresSource::Wal;
        c.feeds.write_consistency = syncar::config::WriteConsistency::Eventual;
        c.redis.timeout = Duration::from_secs(30);
        c.feeds.lease = Duration::from_secs(30);
        c.feeds.relay_lease = Duration::from_secs(30);
    };
    let [a, b, _c] = three(&env, config).await;
    let v1 = a.put("/v1/kv/w", "1").await.etag_version();
    sees(&b, "/v1/kv/w", v1).await;

    pause_redis_writes(&env, 3000).await;
    let v2 = a.put("/v1/kv/w", "2").await.etag_version();
    assert_eq!(
        redis_version(&env, "w").await,
        Some(v1),
        "a write that does not say answers before Redis holds it"
    );
    eventually(WINDOW, "redis holds the write", || async {
        (redis_version(&env, "w").await == Some(v2)).then_some(())
    })
    .await;

    pause_redis_writes(&env, 1500).await;
    let v3 = a
        .put("/v1/kv/w?consistency=default", "3")
        .await
        .etag_version();
    assert_eq!(
        redis_version(&env, "w").await,
        Some(v3),
        "?consistency=default answers once Redis holds it"
    );
    sees(&b, "/v1/kv/w", v3).await;
}

/// Without a Postgres feed nothing but the write itself brings it to Redis: Redis must end
/// up holding its value.
#[tokio::test]
async fn an_eventual_write_brings_its_value_to_redis_behind_the_answer() {
    eventual_writes(None).await;
}

/// `consistency=eventual`: the answer comes once Postgres committed and the writer's L1 holds
/// the write; Redis and the other instances get it behind the answer. Redis is made to hold
/// every write (`CLIENT PAUSE ... WRITE`, with a Redis timeout and leases longer than the
/// pause, so every feed stays up and L1 in use): a default write answers only once Redis
/// holds it, an eventual one while Redis still holds the version before. `source`: the
/// Postgres feed's, `None` for none.
async fn eventual_writes(source: Option<PostgresSource>) {
    // A Redis of its own: CLIENT PAUSE and SCRIPT FLUSH act on the whole server, and every
    // other test running meanwhile would stall or meet NOSCRIPT.
    let redis_server = RedisServer::start();
    let env = Env::new().await.on_redis(redis_server.url());
    let config = |c: &mut syncar::Config| {
        match source {
            Some(source) => c.feeds.postgres_source = source,
            None => c.feeds.postgres = false,
        }
        c.redis.timeout = Duration::from_secs(30);
        c.feeds.lease = Duration::from_secs(30);
        c.feeds.relay_lease = Duration::from_secs(30);
    };
    let [a, b, _c] = three(&env, config).await;
    let v1 = a.put("/v1/kv/e", "1").await.etag_version();
    sees(&b, "/v1/kv/e", v1).await;

    // The control: a default write waits for Redis.
    pause_redis_writes(&env, 1500).await;
    let v2 = a.put("/v1/kv/e", "2").await.etag_version();
    assert_eq!(
        redis_version(&env, "e").await,
        Some(v2),
        "a default write answers once Redis holds it"
    );
    sees(&b, "/v1/kv/e", v2).await;

    pause_redis_writes(&env, 3000).await;
    let r = a.put("/v1/kv/e?consistency=eventual", "3").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v3 = r.etag_version();
    assert!(v3 > v2);
    assert_eq!(
        redis_version(&env, "e").await,
        Some(v2),
        "an eventual write answers before Redis holds it"
    );
    let own = a.get("/v1/kv/e").await;
    assert_eq!(
        (own.etag_version(), own.json(), own.header("x-cache")),
        (v3, json!(3), Some("l1")),
        "its writer serves it at once, from L1"
    );
    let elsewhere = b.get(&format!("/v1/kv/e?min_version={v3}")).await;
    assert_eq!(
        elsewhere.etag_version(),
        v3,
        "read-your-writes elsewhere with min_version"
    );
    // Behind the answer: Redis, and every instance.
    eventually(WINDOW, "redis holds the eventual write", || async {
        (redis_version(&env, "e").await == Some(v3)).then_some(())
    })
    .await;
    if source.is_none() {
        assert_eq!(
            env.redis_entry("kv", "e").await.as_deref(),
            Some(format!("{v3}:v:3").as_str()),
            "the write's own value, nothing else wrote it"
        );
    }
    sees(&b, "/v1/kv/e", v3).await;

    // A delete and a transaction, the same way.
    pause_redis_writes(&env, 1000).await;
    let del = a.delete("/v1/kv/e?consistency=eventual").await;
    assert_eq!(del.status, 204, "{:?}", del.body);
    let v4 = del.etag_version();
    assert_eq!(
        redis_version(&env, "e").await,
        Some(v3),
        "answered before Redis"
    );
    assert_eq!(a.get("/v1/kv/e").await.status, 404);
    eventually(WINDOW, "redis holds the delete", || async {
        (redis_version(&env, "e").await == Some(v4)).then_some(())
    })
    .await;
    sees_absent(&b, "/v1/kv/e").await;
    let tx = json!({"operations": [
        {"op": "put", "resource": "kv", "key": "t1", "document": "x"},
        {"op": "put", "resource": "kv", "key": "t2", "document": "y"},
    ]});
    pause_redis_writes(&env, 1000).await;
    let r = request(
        a.addr(),
        "POST",
        "/v1?consistency=eventual",
        &[],
        Some(tx.to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        redis_version(&env, "t2").await,
        None,
        "answered before Redis"
    );
    for (key, doc) in [("t1", "x"), ("t2", "y")] {
        let version = r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["key"] == key)
            .unwrap()["version"]
            .as_i64()
            .unwrap();
        let own = a.get(&format!("/v1/kv/{key}")).await;
        assert_eq!(
            (own.json(), own.header("x-cache")),
            (json!(doc), Some("l1"))
        );
        sees(&b, &format!("/v1/kv/{key}"), version).await;
    }

    // What did not commit is answered as always, not early.
    let failed = request(
        a.addr(),
        "PUT",
        "/v1/kv/t1?consistency=eventual",
        &[("if-match", "\"1\"")],
        Some(b"\"z\""),
    )
    .await;
    assert_eq!(failed.status, 412, "{:?}", failed.body);
    let bad = a.put("/v1/kv/e?consistency=weak", "1").await;
    assert_eq!((bad.status, bad.code().as_str()), (400, "invalid_query"));

    // Where L1 does not hold the write (here: no L1), the writer's instance still never
    // answers the version it replaced, even when its Redis commands reach Redis out of
    // order: after SCRIPT FLUSH the write's script call comes back NOSCRIPT and is sent
    // again with the script's text (EVAL), behind the read that follows the answer.
    let d = env
        .start(|c| {
            config(c);
            c.cache.l1 = false;
        })
        .await;
    assert_eq!(d.get("/v1/kv/t1").await.json(), json!("x"));
    let mut redis = env.redis().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis)
        .await
        .unwrap();
    pause_redis_writes(&env, 1500).await;
    let v5 = d
        .put("/v1/kv/t1?consistency=eventual", "4")
        .await
        .etag_version();
    let own = d.get("/v1/kv/t1").await;
    assert_eq!(
        (own.etag_version(), own.json()),
        (v5, json!(4)),
        "the writer's instance, without L1: {:?}",
        own.header("x-cache")
    );
    eventually(WINDOW, "redis holds d's write", || async {
        (redis_version(&env, "t1").await == Some(v5)).then_some(())
    })
    .await;
    sees(&a, "/v1/kv/t1", v5).await;
}

/// Anyone who can connect may NOTIFY: a notification naming a version the sequence never
/// reached (just below 2^62, where a version still counts as one Postgres could hand out)
/// is ignored. Taken, it was a tombstone above every version of its key in every tier, and
/// the next write of the key moved the sequence up to it (the guard raises it past every
/// version seen), where the versions after it soon counted as forged everywhere and every
/// change after them went unannounced.
#[tokio::test]
async fn a_notification_naming_a_version_the_sequence_never_reached_is_ignored() {
    let env = Env::new().await;
    let [a, b, _] = three(&env, |c| c.feeds.postgres_source = PostgresSource::Notify).await;
    let v1 = a.put("/v1/kv/n", "1").await.etag_version();
    sees(&b, "/v1/kv/n", v1).await;
    let pg = env.pg().await;
    let forged = json!({"resource": "kv", "key": "n", "version": 4_611_686_018_427_386_904_i64,
        "op": "delete"});
    pg.execute(
        "SELECT pg_notify('syncar_invalidations', $1)",
        &[&forged.to_string()],
    )
    .await
    .unwrap();
    // A notification sent after it arrives after it: once this one is applied, the forged
    // one was judged.
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'n' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        sees(i, "/v1/kv/n", v2).await;
    }
    let v3 = a.put("/v1/kv/n", "3").await.etag_version();
    for i in [&a, &b] {
        sees(i, "/v1/kv/n", v3).await;
    }
    let last: i64 = query_value(&pg, "SELECT last_value FROM syncar_version_seq").await;
    assert!(last < 1 << 40, "the sequence was not moved: {last}");
}

/// `MERGE` (Postgres 15 and later), as an ETL job writes: one statement that updates,
/// deletes and inserts rows of a cached table. Each change reaches every instance on every
/// source (the statement's triggers see its transition tables as they see an INSERT's,
/// UPDATE's and DELETE's). On Postgres 14 `MERGE` does not exist, which is all the test
/// checks there.
#[tokio::test]
async fn a_merge_that_updates_deletes_and_inserts_reaches_every_instance() {
    for source in [
        PostgresSource::Wal,
        PostgresSource::ChangesLog,
        PostgresSource::Notify,
    ] {
        let env = Env::new().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, v text); \
             INSERT INTO items VALUES (1, 'one'), (2, 'two')",
        )
        .await
        .unwrap();
        let merge = "MERGE INTO items t \
             USING (VALUES (1, 'merged'), (2, NULL), (3, 'new')) AS s(id, v) ON t.id = s.id \
             WHEN MATCHED AND s.v IS NULL THEN DELETE \
             WHEN MATCHED THEN UPDATE SET v = s.v \
             WHEN NOT MATCHED THEN INSERT (id, v) VALUES (s.id, s.v)";
        let version_num: i32 =
            query_value(&pg, "SELECT current_setting('server_version_num')::int").await;
        if version_num < 150000 {
            let e = pg
                .batch_execute(merge)
                .await
                .expect_err("no MERGE before 15");
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR),
                "{e:?}"
            );
            return;
        }
        let instances = three(&env, |c| {
            c.feeds.postgres_source = source;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
        })
        .await;
        for i in &instances {
            for key in 1..=2 {
                let path = format!("/v1/items/{key}");
                eventually(WINDOW, "the row cached in L1", || async {
                    (i.get(&path).await.header("x-cache") == Some("l1")).then_some(())
                })
                .await;
            }
            assert_eq!(i.get("/v1/items/3").await.status, 404);
        }
        pg.batch_execute(merge).await.unwrap();
        for i in &instances {
            eventually(WINDOW, "the MERGE's update and insert", || async {
                let one = i.get("/v1/items/1").await;
                let three = i.get("/v1/items/3").await;
                (one.json()["v"] == "merged" && three.status == 200 && three.json()["v"] == "new")
                    .then_some(())
            })
            .await;
            sees_absent(i, "/v1/items/2").await;
        }
        for i in instances {
            i.shutdown().await;
        }
    }
}
