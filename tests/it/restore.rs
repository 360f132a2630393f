//! Tiers that come back from the past: a Redis restarted from an older snapshot, a lagging
//! replica promoted in its place. What either holds may be older than writes already
//! acknowledged, and the version rule would protect it; syncar must read none of it.

use std::time::Duration;

use syncar::config::PostgresSource;

use crate::support::{eventually, Env, Proxy, RedisServer};

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
        let reset = a.state().tiers.redis_trusted() && b.state().tiers.redis_trusted();
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
