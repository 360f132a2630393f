//! Versioned tiers against the real servers: the Redis script and the fill/invalidate race.

use std::time::Duration;

use bytes::Bytes;
use syncar::config::RedisConfig;
use syncar::l1::Offer;
use syncar::l2::L2;
use syncar::model::{CacheKey, Cached, Version};

use crate::support::{eventually, query_value, Env, RedisServer};

const TTL: Duration = Duration::from_secs(60);

fn no_feeds(c: &mut syncar::Config) {
    c.feeds.postgres = false;
    c.feeds.redis = false;
}

fn value(v: i64) -> Cached {
    Cached::value(Version(v), Bytes::from(format!("{{\"v\":{v}}}")))
}

/// An L2 of its own, trusted without the guard's check (which needs Postgres).
fn l2(env: &Env) -> L2 {
    let l2 = L2::new(&RedisConfig {
        url: env.redis_url.clone(),
        key_prefix: env.prefix.clone(),
        ..RedisConfig::default()
    })
    .unwrap();
    l2.trust(None, l2.distrusts());
    l2
}

#[tokio::test]
async fn the_redis_script_applies_only_newer_copies() {
    let env = Env::new().await;
    let l2 = l2(&env);
    let k = CacheKey::new("kv", "s");
    assert!(l2.offer(&k, &value(5), TTL).await.unwrap());
    assert!(
        !l2.offer(&k, &value(4), TTL).await.unwrap(),
        "older refused"
    );
    assert!(!l2.offer(&k, &value(5), TTL).await.unwrap(), "same refused");
    assert_eq!(l2.get(&k).await.unwrap(), Some(value(5)));

    // An invalidation's tombstone, then the late fill of the old version: refused.
    assert!(l2
        .offer(&k, &Cached::invalidated(Version(6)), TTL)
        .await
        .unwrap());
    assert!(!l2.offer(&k, &value(5), TTL).await.unwrap());
    assert!(
        l2.offer(&k, &value(6), TTL).await.unwrap(),
        "the awaited copy lands"
    );
    assert!(!l2
        .offer(&k, &Cached::invalidated(Version(6)), TTL)
        .await
        .unwrap());

    // A delete's tombstone refuses a slow reader's fill of the deleted version.
    assert!(l2
        .offer(&k, &Cached::absent(Version(7)), TTL)
        .await
        .unwrap());
    assert!(!l2.offer(&k, &value(6), TTL).await.unwrap());
    assert_eq!(l2.get(&k).await.unwrap(), Some(Cached::absent(Version(7))));

    // Versions compare as numbers, not strings: 10 > 9, and exactly beyond 2^53.
    let n = CacheKey::new("kv", "n");
    assert!(l2.offer(&n, &value(10), TTL).await.unwrap());
    assert!(!l2.offer(&n, &value(9), TTL).await.unwrap());
    let big = 9_007_199_254_740_993; // 2^53 + 1: a float would round it to 2^53
    assert!(l2.offer(&n, &value(big - 1), TTL).await.unwrap());
    assert!(l2.offer(&n, &value(big), TTL).await.unwrap());
    assert!(!l2.offer(&n, &value(big - 1), TTL).await.unwrap());

    // Entries expire.
    let e = CacheKey::new("kv", "e");
    assert!(l2
        .offer(&e, &value(1), Duration::from_millis(50))
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(l2.get(&e).await.unwrap(), None);
}

/// The fill/invalidate race through the real tiers of one instance: a read loads version N
/// from Postgres and is held; N+1 commits elsewhere and its invalidation reaches this
/// instance; the held fill then arrives and is refused, and the next read serves N+1.
#[tokio::test]
async fn a_slow_load_cannot_undo_an_invalidation() {
    let env = Env::new().await;
    // Feeds off: the test delivers the invalidation itself, at the moment it chooses.
    let a = env.start(no_feeds).await;
    let b = env.start(no_feeds).await;
    let v1 = a.put("/v1/kv/race", r#""old""#).await.etag_version();

    let tiers = &b.state().tiers;
    let catalog = b.state().catalog().unwrap();
    let kv = catalog.get("kv").unwrap();
    let doc = syncar::resource::DocRef::new(kv, "race").unwrap();
    let ck = CacheKey::new("kv", "race");

    // The slow reader on B has loaded the old row...
    let loaded = tiers.read_postgres(&doc).await.unwrap();
    assert_eq!(loaded.version.0, v1);
    assert!(loaded.doc().is_some(), "the row exists");

    // ...while A commits a new version and B receives the invalidation.
    let v2 = a.put("/v1/kv/race", r#""new""#).await.etag_version();
    assert_eq!(
        tiers.offer_l1(&ck, Cached::invalidated(Version(v2)), TTL),
        Some(Offer::Applied)
    );

    // The held fill arrives last and is refused.
    assert!(matches!(
        tiers.offer_l1(&ck, loaded, TTL),
        Some(Offer::Refused(_))
    ));
    let read = b.get("/v1/kv/race").await;
    assert_eq!(read.etag_version(), v2);
    assert_eq!(read.json(), serde_json::json!("new"));
    assert_eq!(
        read.header("x-cache"),
        Some("l2"),
        "the tombstone sent the read below L1"
    );
    assert_eq!(b.get("/v1/kv/race").await.header("x-cache"), Some("l1"));
}

/// Redis behind L1's knowledge: when L1 holds a tombstone newer than Redis' copy, the read
/// skips Redis' copy and goes to Postgres.
#[tokio::test]
async fn a_read_skips_a_redis_copy_older_than_l1_knows() {
    let env = Env::new().await;
    let a = env.start(no_feeds).await;
    let v1 = a.put("/v1/kv/k", "1").await.etag_version();
    // Postgres moves on without Redis (a plain SQL write), and the invalidation reaches L1.
    let v2: i64 = query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'k' RETURNING version",
    )
    .await;
    assert_eq!(
        env.redis_entry("kv", "k").await.unwrap(),
        format!("{v1}:v:1")
    );
    let ck = CacheKey::new("kv", "k");
    a.state()
        .tiers
        .offer_l1(&ck, Cached::invalidated(Version(v2)), TTL);
    let read = a.get("/v1/kv/k").await;
    assert_eq!(read.header("x-cache"), Some("db"));
    assert_eq!(read.etag_version(), v2);
    assert_eq!(
        env.redis_entry("kv", "k").await.unwrap(),
        format!("{v2}:v:2"),
        "Redis repaired by the fill"
    );
}

/// The auditor re-checks a read served from L1 against Postgres, finds the copy still served
/// a lease after Postgres moved on (planted here: no feeds, then a plain-SQL update), counts
/// it and repairs it: the next read serves Postgres' version.
#[tokio::test]
async fn the_auditor_finds_and_repairs_a_planted_stale_copy() {
    let env = Env::new().await;
    let a = env
        .start(|c| {
            no_feeds(c);
            c.audit.sample_ratio = 1.0;
            c.audit.max_per_second = 1000;
        })
        .await;
    let stale_l1 = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("syncar_audit_stale_total{tier=\"l1\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = stale_l1(&String::from_utf8_lossy(&a.get("/metrics").await.body));
    let v1 = a.put("/v1/kv/k", "1").await.etag_version();
    let v2: i64 = query_value(
        &env.pg().await,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'k' RETURNING version",
    )
    .await;
    let served = a.get("/v1/kv/k").await;
    assert_eq!(
        (served.etag_version(), served.header("x-cache")),
        (v1, Some("l1")),
        "planted: L1 serves the old copy"
    );
    crate::support::eventually(Duration::from_secs(10), "the repair", || async {
        (a.get("/v1/kv/k").await.etag_version() == v2).then_some(())
    })
    .await;
    let after = stale_l1(&String::from_utf8_lossy(&a.get("/metrics").await.body));
    assert!(after > before, "counted: {before} -> {after}");
}

/// The prefix flush (for a repair queue that overflowed) removes this deployment's keys from
/// Redis, and only them.
#[tokio::test]
async fn the_prefix_flush_removes_this_prefix_only() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    for k in ["p1", "p2", "p3"] {
        a.put(&format!("/v1/kv/{k}"), "1").await;
    }
    let other = format!("other{}", env.prefix);
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("kept")
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    let (removed, retried) = a.flush_redis().await;
    assert!(retried || removed >= 3, "removed {removed}");
    // The feed may still bring a PUT's own message after the flush: it leaves a tombstone
    // (`{version}:i:`), never the document.
    for k in ["p1", "p2", "p3"] {
        let entry = env.redis_entry("kv", k).await;
        assert!(
            entry.as_deref().is_none_or(|e| e.ends_with(":i:")),
            "{k} is gone: {entry:?}"
        );
    }
    assert_eq!(env.redis_get(&other).await.as_deref(), Some("kept"));
}

/// A Redis whose `maxmemory-policy` may evict what syncar needs kept (here `allkeys-lru`
/// under a `maxmemory`, which may evict the generations: keys without a TTL) is reported in
/// `/readyz`, saying what to set, until the policy is changed; the default `noeviction` is
/// not.
#[tokio::test]
async fn a_redis_that_may_evict_syncars_generations_is_reported() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    let checks = a.readyz().await["checks"]["redis"].clone();
    assert_eq!(checks["ok"], true, "{checks}");
    assert!(checks.get("warning").is_none(), "{checks}");

    let lru = RedisServer::start_persistent(&[
        "--maxmemory",
        "100mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]);
    let b = env.on_redis(lru.url()).start(|_| {}).await;
    let warning = eventually(Duration::from_secs(10), "the eviction warning", || async {
        b.readyz().await["checks"]["redis"]["warning"]
            .as_str()
            .map(String::from)
    })
    .await;
    assert!(
        warning.contains("allkeys-lru") && warning.contains("volatile-lru"),
        "{warning}"
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query_async(&mut env.on_redis(lru.url()).redis().await)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the warning gone", || async {
        b.readyz().await["checks"]["redis"]
            .get("warning")
            .is_none()
            .then_some(())
    })
    .await;
}
