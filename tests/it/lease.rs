//! Fill leases (`cache.fill_lease`): one Postgres read per key across the fleet when every
//! instance misses it at once, and a bounded wait when the lease holder never fills.

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::support::{query_value, Env};

/// Four instances miss the same key at once (it was inserted with plain SQL: no tier holds
/// it), while each Postgres round trip of their pools takes 300 ms more: the instance that
/// claims the key's lease reads Postgres, the other three wait for its copy in Redis.
/// Without the lease all four answer from Postgres.
#[tokio::test]
async fn a_key_missed_everywhere_at_once_is_read_from_postgres_once() {
    let env = Env::new().await;
    let (proxy, url) = env.pg_proxy().await;
    let direct = env.pg_url.clone();
    let mut instances = Vec::new();
    for _ in 0..4 {
        let (url, direct) = (url.clone(), direct.clone());
        instances.push(
            env.start(move |c| {
                c.postgres.url = url;
                // The feeds stay fast: only the pools' reads are slow.
                c.postgres.listen_url = Some(direct);
                c.cache.fill_lease = Duration::from_secs(10);
            })
            .await,
        );
    }
    let version: i64 = query_value(
        &env.pg().await,
        "INSERT INTO syncar_kv (key, value) VALUES ('hot', '\"v\"') RETURNING version",
    )
    .await;

    proxy.delay(Duration::from_millis(300));
    let reads = join_all(instances.iter().map(|i| i.get("/v1/kv/hot"))).await;
    proxy.delay(Duration::ZERO);
    let mut tiers: Vec<&str> = reads.iter().map(|r| r.header("x-cache").unwrap()).collect();
    tiers.sort_unstable();
    assert_eq!(tiers, ["db", "l2", "l2", "l2"], "{reads:?}");
    for read in &reads {
        assert_eq!(read.status, 200);
        assert_eq!(read.etag_version(), version);
    }
}

/// A lease held by an instance that never fills Redis (it died, or its read is stuck)
/// delays a reader by the lease and no more: it then reads Postgres itself.
#[tokio::test]
async fn a_lease_nobody_fills_delays_a_read_by_the_lease_only() {
    let env = Env::new().await;
    let lease = Duration::from_millis(400);
    let a = env.start(|c| c.cache.fill_lease = lease).await;
    let version: i64 = query_value(
        &env.pg().await,
        "INSERT INTO syncar_kv (key, value) VALUES ('stuck', '1') RETURNING version",
    )
    .await;
    // Held by an instance that is gone, for longer than the lease.
    let mut redis = env.redis().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}fill.lease:kv:stuck", env.prefix))
        .arg("a-pod-that-died")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .unwrap();

    let started = Instant::now();
    let read = a.get("/v1/kv/stuck").await;
    let waited = started.elapsed();
    assert_eq!(read.status, 200);
    assert_eq!(read.etag_version(), version);
    assert_eq!(read.header("x-cache"), Some("db"));
    assert!(waited >= lease, "it waited for the holder: {waited:?}");
    assert!(
        waited < lease + Duration::from_secs(3),
        "and not much longer: {waited:?}"
    );
    // Its own read filled Redis: the next miss anywhere is answered there.
    assert!(env.redis_entry("kv", "stuck").await.is_some());
}

/// A holder that gives its lease up without filling Redis (its read failed, or Redis refused
/// its copy) does not make the others wait out the lease: they read Postgres once the lease
/// is gone.
#[tokio::test]
async fn a_lease_given_up_unfilled_ends_the_wait() {
    let env = Env::new().await;
    let lease = Duration::from_secs(10);
    let a = env.start(|c| c.cache.fill_lease = lease).await;
    env.pg()
        .await
        .execute(
            "INSERT INTO syncar_kv (key, value) VALUES ('gone', '1')",
            &[],
        )
        .await
        .unwrap();
    let name = format!("{}fill.lease:kv:gone", env.prefix);
    let mut redis = env.redis().await;
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg("a-pod-whose-read-failed")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let give_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _: () = redis::cmd("DEL")
            .arg(&name)
            .query_async(&mut redis)
            .await
            .unwrap();
    });

    let started = Instant::now();
    let read = a.get("/v1/kv/gone").await;
    let waited = started.elapsed();
    give_up.await.unwrap();
    assert_eq!(read.status, 200);
    assert_eq!(read.header("x-cache"), Some("db"));
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "it waited for the holder, then not for the rest of the lease: {waited:?}"
    );
}
