//! Redis Cluster (`redis.mode = "cluster"`): keys carry a hash tag, each write is announced
//! over sharded pub/sub on the shard that owns its key, every instance hears every shard,
//! and a master's failover is a fault like any other.

use std::collections::BTreeSet;
use std::time::Duration;

use syncar::config::RedisMode;
use syncar::l2::{hash_slot, CLUSTER_BUCKETS};

use crate::support::{eventually, request, Env, Instance, RedisCluster};

const WINDOW: Duration = Duration::from_secs(10);

/// A configuration that reaches `cluster` through its seed nodes.
fn on(cluster: &RedisCluster) -> impl Fn(&mut syncar::Config) + '_ {
    |c| {
        c.redis.mode = RedisMode::Cluster;
        c.redis.url = cluster.url();
        c.redis.nodes = cluster.seeds();
    }
}

/// The bucket (hash tag) of `kv`'s `key`, as syncar names it.
fn bucket(key: &str) -> u16 {
    hash_slot(format!("kv:{key}").as_bytes()) % CLUSTER_BUCKETS
}

/// The hash slot of `kv`'s `key` in Redis.
fn slot(key: &str) -> u16 {
    hash_slot(format!("{{{}}}", bucket(key)).as_bytes())
}

/// The invalidation channel of `kv`'s `key`.
fn channel(env: &Env, key: &str) -> String {
    format!("{}{{{}}}invalidations", env.prefix, bucket(key))
}

/// How many connections subscribe to shard channel `channel`, as its master says.
fn shard_subscribers(cluster: &RedisCluster, channel: &str) -> Option<u64> {
    let port = cluster.master_of(hash_slot(channel.as_bytes()))?;
    cluster
        .ask(port, &["PUBSUB", "SHARDNUMSUB", channel])?
        .get(1)?
        .parse()
        .ok()
}

/// The raw entry of `kv`'s `key` in generation 0, read through a cluster client.
fn entry(cluster: &RedisCluster, env: &Env, key: &str) -> Option<String> {
    let client = redis::cluster::ClusterClient::new(vec![cluster.url()]).ok()?;
    let mut conn = client.get_connection().ok()?;
    let name = format!("{}{{{}}}kv:{key}", env.prefix, bucket(key));
    redis::cmd("GET").arg(name).query(&mut conn).ok()?
}

/// Two instances on `cluster` with the Redis feed only (the Postgres feed off), so that only
/// sharded pub/sub can evict one's L1 after the other's write; `lease` for the feed.
async fn redis_only_pair(
    cluster: &RedisCluster,
    env: &Env,
    lease: Duration,
) -> (Instance, Instance) {
    let redis_only = |c: &mut syncar::Config| {
        on(cluster)(c);
        c.feeds.postgres = false;
        c.feeds.lease = lease;
        // Nor the auditor, which repairs a copy stale for longer than a lease.
        c.audit.sample_ratio = 0.0;
    };
    (env.start(redis_only).await, env.start(redis_only).await)
}

/// `b` serves `kv`'s `key` from L1 (put by `a` if it has no copy), then `a` writes it, and
/// `b` serves the new version within 2 s: something evicted its L1.
async fn write_evicts(a: &Instance, b: &Instance, key: &str) {
    let path = format!("/v1/kv/{key}");
    if a.get(&path).await.status == 404 {
        let v = a.put(&path, "1").await.etag_version();
        b.sees(&path, v, WINDOW).await;
    }
    eventually(WINDOW, "b serves it from L1", || async {
        (b.get(&path).await.header("x-cache") == Some("l1")).then_some(())
    })
    .await;
    let v = a.put(&path, "2").await.etag_version();
    b.sees(&path, v, Duration::from_secs(2)).await;
}

/// Until both instances subscribe to `key`'s bucket on the master that serves it now.
async fn both_subscribe(cluster: &RedisCluster, env: &Env, key: &str) {
    eventually(
        WINDOW,
        "both instances subscribe where the slot is",
        || async { (shard_subscribers(cluster, &channel(env, key)) == Some(2)).then_some(()) },
    )
    .await;
}

async fn batch(i: &Instance, keys: &[String]) -> serde_json::Value {
    let body = serde_json::json!({ "keys": keys }).to_string();
    let r = request(i.addr(), "POST", "/v1/kv", &[], Some(body.as_bytes())).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["results"].clone()
}

/// Two instances on a cluster of three shards: writes through syncar and plain SQL reach
/// both, over keys spread across the shards; a batch read spans slots; every bucket channel
/// has both instances subscribed on the master that owns it.
#[tokio::test]
async fn two_instances_stay_coherent_on_a_cluster() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let a = env.start(on(&cluster)).await;
    let b = env.start(on(&cluster)).await;
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let shards: BTreeSet<u16> = keys
        .iter()
        .filter_map(|k| cluster.master_of(slot(k)))
        .collect();
    assert!(shards.len() >= 2, "the keys span shards: {shards:?}");

    for k in &keys {
        let v = a.put(&format!("/v1/kv/{k}"), "1").await.etag_version();
        b.sees(&format!("/v1/kv/{k}"), v, WINDOW).await;
        let entry = entry(&cluster, &env, k).unwrap_or_else(|| panic!("{k} is in Redis"));
        assert!(entry.starts_with(&format!("{v}:v:")), "{entry}");
        assert_eq!(
            shard_subscribers(&cluster, &channel(&env, k)),
            Some(2),
            "both instances hear {k}'s bucket on its shard"
        );
    }
    for k in &keys {
        let v = a.put(&format!("/v1/kv/{k}"), "2").await.etag_version();
        b.sees(&format!("/v1/kv/{k}"), v, WINDOW).await;
    }

    // Plain SQL, past syncar: both see it.
    env.pg()
        .await
        .execute("UPDATE syncar_kv SET value = '3' WHERE key = 'k0'", &[])
        .await
        .unwrap();
    let sql = eventually(WINDOW, "a sees the SQL write", || async {
        let r = a.get("/v1/kv/k0").await;
        (r.body.as_ref() == b"3").then(|| r.etag_version())
    })
    .await;
    b.sees("/v1/kv/k0", sql, WINDOW).await;

    // A batch read over every shard (MGET split by slot).
    let results = batch(&b, &keys).await;
    for (k, result) in keys.iter().zip(results.as_array().unwrap()) {
        assert_eq!(result["key"], k.as_str());
        assert_eq!(result["status"], 200, "{result}");
    }

    // A delete is seen by the other.
    let d = a.delete("/v1/kv/k1").await;
    assert!(d.status < 300, "{d:?}");
    b.sees_absent("/v1/kv/k1", WINDOW).await;

    // The prefix flush (for a repair queue that overflowed) reaches every master.
    let (removed, retried) = a.flush_redis().await;
    assert!(retried || removed >= keys.len() as u64, "removed {removed}");
    // A write's own message (or the delete's absence, written by its task after the
    // commit) may land after the flush: it leaves a tombstone (`{version}:i:`) or an absence
    // (`{version}:a:`), never a document.
    for k in &keys {
        let left = entry(&cluster, &env, k);
        assert!(
            left.as_deref()
                .is_none_or(|e| matches!(e.split(':').nth(1), Some("i" | "a"))),
            "{k}'s document is gone from Redis: {left:?}"
        );
    }
}

/// The `wal` source on a cluster: the relay's messages and its liveness channel are shard
/// channels too; SQL writes and a TRUNCATE (a flush of the resource: generations raised in
/// the cluster, a flush message to every instance) reach both instances.
#[tokio::test]
async fn the_wal_relay_works_on_a_cluster() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let wal = |c: &mut syncar::Config| {
        on(&cluster)(c);
        c.feeds.postgres_source = syncar::config::PostgresSource::Wal;
    };
    let a = env.start(wal).await;
    let b = env.start(wal).await;
    let v1 = a.put("/v1/kv/w", "1").await.etag_version();
    for i in [&a, &b] {
        i.sees("/v1/kv/w", v1, WINDOW).await;
        eventually(WINDOW, "served from L1", || async {
            (i.get("/v1/kv/w").await.header("x-cache") == Some("l1")).then_some(())
        })
        .await;
    }
    let v2: i64 = crate::support::query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'w' RETURNING version",
    )
    .await;
    for i in [&a, &b] {
        i.sees("/v1/kv/w", v2, WINDOW).await;
    }
    env.pg()
        .await
        .batch_execute("TRUNCATE syncar_kv")
        .await
        .unwrap();
    for i in [&a, &b] {
        i.sees_absent("/v1/kv/w", WINDOW).await;
    }
}

/// With the Postgres feed off, only the cluster's sharded pub/sub can tell `b` of `a`'s
/// write: `b` holds the key in L1, and drops it when the message comes.
#[tokio::test]
async fn sharded_pub_sub_evicts_other_instances_l1() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let (a, b) = redis_only_pair(&cluster, &env, Duration::from_secs(1)).await;
    for k in ["x0", "x1", "x2", "x3", "x4", "x5"] {
        write_evicts(&a, &b, k).await;
    }
}

/// The master serving a key is killed (SIGKILL) and its replica takes over: a write
/// acknowledged during the failover is seen by both instances, the instances' sharded
/// subscriptions come back on the promoted node, and Redis is read again once trusted.
#[tokio::test]
async fn a_killed_master_fails_over_without_losing_acknowledged_writes() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let a = env.start(on(&cluster)).await;
    let b = env
        .start(|c| {
            on(&cluster)(c);
            c.cache.l1 = false; // every read of b asks Redis first
        })
        .await;
    let v1 = a.put("/v1/kv/f", "1").await.etag_version();
    b.sees("/v1/kv/f", v1, WINDOW).await;
    let old = cluster.master_of(slot("f")).expect("a master serves f");

    cluster.node(old).kill();
    let during = a.put("/v1/kv/f", "2").await;
    assert!(during.status < 300, "acknowledged: {during:?}");
    let v2 = during.etag_version();
    let new = eventually(WINDOW, "the replica takes over f's slot", || async {
        cluster.master_of(slot("f")).filter(|p| *p != old)
    })
    .await;
    cluster.wait_ok();
    a.sees("/v1/kv/f", v2, WINDOW).await;
    b.sees("/v1/kv/f", v2, WINDOW).await;

    both_subscribe(&cluster, &env, "f").await;
    assert_eq!(cluster.master_of(slot("f")), Some(new));
    for i in [&a, &b] {
        eventually(WINDOW, "/readyz: Redis answers again", || async {
            (i.readyz().await["checks"]["redis"]["ok"] == true).then_some(())
        })
        .await;
    }
    let v3 = a.put("/v1/kv/f", "3").await.etag_version();
    eventually(WINDOW, "b reads it from the promoted master", || async {
        let read = b.get("/v1/kv/f").await;
        (read.etag_version() == v3 && read.header("x-cache") == Some("l2")).then_some(())
    })
    .await;
    // And an instance with L1 hears the next write through the new shard subscription.
    let c = env.start(on(&cluster)).await;
    c.sees("/v1/kv/f", v3, WINDOW).await;
    let v4 = a.put("/v1/kv/f", "4").await.etag_version();
    c.sees("/v1/kv/f", v4, WINDOW).await;
}

/// A manual failover (`CLUSTER FAILOVER` on a replica): the old master stays up, as a
/// replica, and ends its shard channels' subscriptions when it hands the slots over. With
/// the Postgres feed off, only those subscriptions can evict `b`'s L1: they must come back
/// on the promoted node. The lease is long (30 s), so the heartbeat that stops coming back
/// cannot be what brings them back within the window: the `sunsubscribe` must be.
#[tokio::test]
async fn subscriptions_follow_a_manual_failover() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let (a, b) = redis_only_pair(&cluster, &env, Duration::from_secs(30)).await;
    let old = cluster.master_of(slot("f")).expect("a master serves f");
    let replica = cluster.replica_of(old).expect("the master has a replica");
    assert_eq!(shard_subscribers(&cluster, &channel(&env, "f")), Some(2));

    cluster
        .ask(replica, &["CLUSTER", "FAILOVER"])
        .expect("CLUSTER FAILOVER is accepted");
    eventually(WINDOW, "the replica takes over f's slot", || async {
        (cluster.master_of(slot("f")) == Some(replica)).then_some(())
    })
    .await;
    cluster.wait_ok();
    both_subscribe(&cluster, &env, "f").await;
    write_evicts(&a, &b, "f").await;
}

/// A slot moved to another master with its keys (resharding): the node that loses it ends
/// its channels' subscriptions, and syncar subscribes again where the slot went (the lease is
/// long, as above, so the heartbeat cannot be what brings them back in time).
#[tokio::test]
async fn subscriptions_follow_a_slot_migration() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let (a, b) = redis_only_pair(&cluster, &env, Duration::from_secs(30)).await;
    let v1 = a.put("/v1/kv/f", "1").await.etag_version();
    b.sees("/v1/kv/f", v1, WINDOW).await;
    let old = cluster.master_of(slot("f")).expect("a master serves f");
    let target = cluster
        .masters()
        .into_iter()
        .find(|p| *p != old)
        .expect("another master");

    cluster.move_slot(slot("f"), target);
    both_subscribe(&cluster, &env, "f").await;
    assert_eq!(cluster.master_of(slot("f")), Some(target));
    write_evicts(&a, &b, "f").await;
}

/// A cluster on TLS ports only, whose nodes announce a host name: syncar verifies each
/// node's certificate against `redis.tls_ca_file` and its name, for commands and for the
/// sharded subscriptions alike.
#[tokio::test]
async fn a_cluster_over_tls_is_reached_with_host_name_checks() {
    let certs = crate::support::tls_servers().certs.clone();
    let cluster = RedisCluster::start_tls(&certs);
    let env = Env::new().await;
    let over_tls = |c: &mut syncar::Config| {
        c.redis.mode = RedisMode::Cluster;
        c.redis.url = format!("rediss://localhost:{}", cluster.nodes[0].port);
        c.redis.nodes = vec![format!("localhost:{}", cluster.nodes[1].port)];
        c.redis.tls_ca_file = Some(certs.join("ca.pem"));
    };
    let a = env.start(over_tls).await;
    let b = env.start(over_tls).await;
    for k in ["t0", "t1", "t2", "t3"] {
        let path = format!("/v1/kv/{k}");
        let v1 = a.put(&path, "1").await.etag_version();
        b.sees(&path, v1, WINDOW).await;
        let v2 = a.put(&path, "2").await.etag_version();
        b.sees(&path, v2, WINDOW).await;
        assert_eq!(
            shard_subscribers(&cluster, &channel(&env, k)),
            Some(2),
            "both instances hear {k}'s bucket over TLS"
        );
    }
    assert_eq!(a.readyz().await["checks"]["redis"]["ok"], true);
}

/// A cluster node configured as a single Redis: `/readyz` says to set `redis.mode`, and
/// reads never trust it (keys of other shards would answer `MOVED`).
#[tokio::test]
async fn a_cluster_node_with_mode_single_is_reported() {
    let cluster = RedisCluster::start();
    let env = Env::new().await.on_redis(cluster.url());
    let mut config = env.config();
    config.redis.url = cluster.url();
    crate::support::init_logging();
    // Not waited for: its Redis feed cannot come up on a node it does not trust.
    let a = Instance {
        app: syncar::App::start(config).await.expect("starts"),
    };
    let error = eventually(WINDOW, "/readyz names the mode", || async {
        let ready = a.readyz().await;
        ready["checks"]["redis"]["error"]
            .as_str()
            .map(ToString::to_string)
    })
    .await;
    assert!(
        error.contains("is a Redis Cluster node: set redis.mode = \"cluster\""),
        "{error}"
    );
    assert!(!a.state().probes.redis_trusted(), "never trusted");
}
