//! Redis behind Sentinel (`redis.mode = "sentinel"`): syncar finds the master through the
//! Sentinels and follows a failover, with the same guarantees as any Redis fault.

use std::time::Duration;

use syncar::config::RedisMode;

use crate::support::{eventually, Env, SentinelGroup};

const WINDOW: Duration = Duration::from_secs(10);

/// A configuration that finds Redis through `group`'s Sentinels.
fn through(group: &SentinelGroup) -> impl Fn(&mut syncar::Config) + '_ {
    |c| {
        c.redis.mode = RedisMode::Sentinel;
        c.redis.sentinels = group.sentinels();
        c.redis.master_name = group.name.clone();
        // Its host and port are not used: the Sentinels name the master.
        c.redis.url = "redis://127.0.0.1:1".into();
    }
}

/// The master is killed (SIGKILL) and the Sentinels promote its replica: a write
/// acknowledged during the failover is not lost, every instance sees it, and once the new
/// master is followed, writes through syncar land in it and reads are answered from it.
#[tokio::test]
async fn a_sentinel_failover_is_followed_and_loses_no_acknowledged_write() {
    let group = SentinelGroup::start("syncar-master");
    let env = Env::new().await.on_redis(group.master.url());
    let sentinel = through(&group);
    let a = env.start(&sentinel).await;
    let b = env
        .start(|c| {
            sentinel(c);
            c.cache.l1 = false; // every read of b asks Redis first
        })
        .await;
    let node = |port: u16| format!("127.0.0.1:{port}");
    assert_eq!(
        a.readyz().await["checks"]["redis"]["node"],
        node(group.master.port)
    );
    let v1 = a.put("/v1/kv/f", "1").await.etag_version();
    b.sees("/v1/kv/f", v1, WINDOW).await;
    assert!(
        env.redis_entry("kv", "f").await.is_some(),
        "the master holds it"
    );

    let old = group.master.port;
    group.master.kill();
    let during = a.put("/v1/kv/f", "2").await;
    assert!(during.status < 300, "acknowledged: {during:?}");
    let v2 = during.etag_version();
    let new = eventually(WINDOW, "the Sentinels promote the replica", || async {
        group.master_port().filter(|p| *p != old)
    })
    .await;
    assert_eq!(new, group.replica.port);
    a.sees("/v1/kv/f", v2, WINDOW).await;
    b.sees("/v1/kv/f", v2, WINDOW).await;

    // Followed: a write lands in the new master, and b (no L1) answers from it.
    let promoted = env.on_redis(group.replica.url());
    let v3 = a.put("/v1/kv/f", "3").await.etag_version();
    eventually(WINDOW, "the write reaches the new master", || async {
        let entry = promoted.redis_entry("kv", "f").await?;
        let version: i64 = entry.split(':').next()?.parse().ok()?;
        (version >= v3).then_some(())
    })
    .await;
    for i in [&a, &b] {
        eventually(
            WINDOW,
            "/readyz names the new master, which answers",
            || async {
                let ready = i.readyz().await;
                let redis = &ready["checks"]["redis"];
                (redis["node"] == node(new) && redis["ok"] == true).then_some(())
            },
        )
        .await;
    }
    eventually(WINDOW, "b reads it from the new master", || async {
        let read = b.get("/v1/kv/f").await;
        (read.etag_version() == v3 && read.header("x-cache") == Some("l2")).then_some(())
    })
    .await;
}

/// A failover that leaves the old master up (`SENTINEL FAILOVER`: it becomes a replica): the
/// instances' subscriptions end up on the new master with their commands. (Here Sentinel
/// also kills the old node's pub/sub clients when it reconfigures it; the case it cannot, an
/// old master cut off from the Sentinels but not from syncar, is what `L2::subscribe`'s end
/// on a move covers, and is not reproduced here.)
#[tokio::test]
async fn subscriptions_follow_the_master_when_the_old_one_stays_up() {
    let group = SentinelGroup::start("syncar-forced");
    let env = Env::new().await.on_redis(group.master.url());
    let sentinel = through(&group);
    let a = env.start(&sentinel).await;
    let b = env.start(&sentinel).await;
    let channel = format!("{}invalidations", env.prefix);
    let subscribers = |url: String| {
        let channel = channel.clone();
        async move {
            let mut conn = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .ok()?;
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .ok()?;
            Some(n)
        }
    };
    assert_eq!(subscribers(group.master.url()).await, Some(2));

    let old = group.master.port;
    group.failover();
    eventually(WINDOW, "the Sentinels promote the replica", || async {
        group.master_port().filter(|p| *p != old)
    })
    .await;
    eventually(
        WINDOW,
        "both Redis feeds subscribe on the new master",
        || async { (subscribers(group.replica.url()).await == Some(2)).then_some(()) },
    )
    .await;
    // And the writes of one reach the other through it.
    let v = a.put("/v1/kv/moved", "1").await.etag_version();
    b.sees("/v1/kv/moved", v, WINDOW).await;
}

/// Sentinel and Redis on TLS ports only, known by the name their certificate gives
/// (`localhost`), each asking clients for a certificate: syncar asks the Sentinels over TLS,
/// reaches the master they name over TLS, both with its client certificate, and follows a
/// failover (SIGKILL) to the promoted replica without losing an acknowledged write.
#[tokio::test]
async fn a_sentinel_failover_over_tls_is_followed() {
    let certs = crate::support::tls_servers().certs.clone();
    let group = SentinelGroup::start_tls("syncar-tls", &certs);
    let env = Env::new().await;
    let sentinel = through(&group);
    let over_tls = |c: &mut syncar::Config| {
        sentinel(c);
        c.redis.url = "rediss://localhost:1".into();
        c.redis.tls_ca_file = Some(certs.join("ca.pem"));
        // The Sentinels and the Redis nodes ask every client for a certificate.
        c.redis.tls_cert_file = Some(certs.join("client.pem"));
        c.redis.tls_key_file = Some(certs.join("client.key"));
    };
    let a = env.start(over_tls).await;
    let b = env.start(over_tls).await;
    let node = |port: u16| format!("localhost:{port}");
    assert_eq!(
        a.readyz().await["checks"]["redis"]["node"],
        node(group.master.port)
    );
    let v1 = a.put("/v1/kv/s", "1").await.etag_version();
    b.sees("/v1/kv/s", v1, WINDOW).await;

    let old = group.master.port;
    group.master.kill();
    let during = a.put("/v1/kv/s", "2").await;
    assert!(during.status < 300, "acknowledged: {during:?}");
    let v2 = during.etag_version();
    eventually(WINDOW, "the Sentinels promote the replica", || async {
        group.master_port().filter(|p| *p != old)
    })
    .await;
    a.sees("/v1/kv/s", v2, WINDOW).await;
    b.sees("/v1/kv/s", v2, WINDOW).await;
    for i in [&a, &b] {
        eventually(WINDOW, "/readyz names the promoted replica", || async {
            let ready = i.readyz().await;
            let redis = &ready["checks"]["redis"];
            (redis["node"] == node(group.replica.port) && redis["ok"] == true).then_some(())
        })
        .await;
    }
    let v3 = a.put("/v1/kv/s", "3").await.etag_version();
    b.sees("/v1/kv/s", v3, WINDOW).await;
}
