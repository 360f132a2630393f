//! A primary that fails over to its physical standby under a fleet on the `wal` source
//! (README "Failover"). On Postgres 17 and later the relay's failover slot was synchronized
//! to the standby: the relay continues from it on the promoted server and no cache is reset.
//! Before 17 no slot follows a failover: syncar cannot prove continuity, says so, and
//! resets every resource's caches, as it always did. Either way every instance serves every
//! write made after the promotion.

use std::time::{Duration, Instant};

use syncar::config::PostgresSource;

use crate::support::{eventually, query_value, Env, Instance, PostgresPair, Proxy};

/// How long a change may take to reach every instance (generous for a loaded CI machine).
const WINDOW: Duration = Duration::from_secs(30);

async fn generations(env: &Env) -> std::collections::HashMap<String, String> {
    let mut conn = env.redis().await;
    redis::cmd("HGETALL")
        .arg(format!("{}generations", env.prefix))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// An instance on the `wal` source. Its relay reaches the servers through `relay_url`
/// (proxies: the address a server sees is not the one in the URL, as behind a Kubernetes
/// Service, so the relay must ask each host which is the primary).
async fn start(env: &Env, relay_url: &str) -> Instance {
    let relay_url = relay_url.to_string();
    env.start(|c| {
        c.feeds.postgres_source = PostgresSource::Wal;
        // The relay's replication connection must not wait out a dead primary's socket.
        c.postgres.connect_timeout = Duration::from_secs(2);
        c.postgres.replication_url = Some(relay_url);
    })
    .await
}

#[tokio::test]
async fn a_promoted_standby_keeps_the_caches_when_the_slot_followed_or_says_why_not() {
    let pair = PostgresPair::start().await;
    let follows = pair.major >= 17;
    let env = Env::on_pair(&pair).await;
    let proxies = [
        Proxy::start(([127, 0, 0, 1], pair.primary_port).into()).await,
        Proxy::start(([127, 0, 0, 1], pair.standby_port).into()).await,
    ];
    let db = env.pg_url.rsplit('/').next().unwrap().to_string();
    let relay_url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}",
        proxies[0].addr.port(),
        proxies[1].addr.port()
    );
    let a = start(&env, &relay_url).await;
    let b = start(&env, &relay_url).await;
    let slot: String = {
        let pg = env.pg().await;
        query_value(
            &pg,
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'logical'",
        )
        .await
    };

    // Written before the failover: "kept" is never written again, so a fleet that kept its
    // caches still serves it from L1 afterwards.
    let kept = a.put("/v1/kv/kept", r#"{"n":1}"#).await.etag_version();
    let sql = a.put("/v1/kv/sql", r#"{"n":1}"#).await.etag_version();
    let put = a.put("/v1/kv/put", r#"{"n":1}"#).await.etag_version();
    for i in [&a, &b] {
        i.sees("/v1/kv/kept", kept, WINDOW).await;
        i.sees("/v1/kv/sql", sql, WINDOW).await;
        i.sees("/v1/kv/put", put, WINDOW).await;
        assert_eq!(i.get("/v1/kv/kept").await.header("x-cache"), Some("l1"));
    }

    if follows {
        // The standby's copy of the slot must be sync-ready (persistent) before the primary
        // goes: until then a promotion drops it. A standby snapshot on the primary moves the
        // slot's restart_lsn on, which the sync worker waits for.
        let standby = format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            pair.standby_port
        );
        let (client, conn) = tokio_postgres::connect(&standby, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let primary = env.pg().await;
        eventually(
            Duration::from_secs(90),
            "the standby's slot is sync-ready",
            || {
                let (client, primary, slot) = (&client, &primary, slot.clone());
                async move {
                    let _ = primary
                        .batch_execute("SELECT pg_log_standby_snapshot()")
                        .await;
                    let ready: Option<bool> = client
                        .query_opt(
                            "SELECT synced AND NOT temporary FROM pg_replication_slots \
                         WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await
                        .unwrap()
                        .map(|r| r.get(0));
                    (ready == Some(true)).then_some(())
                }
            },
        )
        .await;
    }
    let before = generations(&env).await;

    // Where the C stamp is in use, the standby lacks its library (README "The C stamp"):
    // its library path, changed on the primary, replays to the standby, and Postgres fails
    // to load it there as it would a missing file. Every write to syncar_kv then fails,
    // the customer's own included, until syncar, told by the new timeline, puts the
    // PL/pgSQL stamp back.
    let c_stamp = {
        let primary = env.pg().await;
        let function: String = query_value(
            &primary,
            "SELECT p.proname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'syncar_kv'::regclass AND t.tgname = 'syncar_stamp_version'",
        )
        .await;
        if function == "syncar_stamp" {
            let gone = "$libdir/syncar_stamp_not_on_the_standby";
            primary
                .execute(
                    "UPDATE pg_proc SET probin = $1 WHERE proname = 'syncar_stamp'",
                    &[&gone],
                )
                .await
                .unwrap();
            let standby = format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                pair.standby_port,
                db.split('?').next().unwrap()
            );
            let (client, conn) = tokio_postgres::connect(&standby, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            eventually(WINDOW, "the standby replays the change", || async {
                let probin: String = query_value(
                    &client,
                    "SELECT probin FROM pg_proc WHERE proname = 'syncar_stamp'",
                )
                .await;
                (probin == gone).then_some(())
            })
            .await;
        }
        function == "syncar_stamp"
    };

    pair.kill_primary();
    let promoted = Instant::now();
    pair.promote_standby();

    // Written on the promoted server: by plain SQL (the relay must stream it from the slot)
    // and through syncar.
    let pg = eventually(WINDOW, "the promoted standby accepts writes", || async {
        let pg = env.try_pg().await?;
        pg.execute(
            "UPDATE syncar_kv SET value = '{\"n\":2}' WHERE key = 'sql'",
            &[],
        )
        .await
        .ok()?;
        Some(pg)
    })
    .await;
    let sql2: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'sql'").await;
    assert!(sql2 > sql);
    if c_stamp {
        let function: String = query_value(
            &pg,
            "SELECT p.proname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'syncar_kv'::regclass AND t.tgname = 'syncar_stamp_version'",
        )
        .await;
        assert_eq!(function, "syncar_stamp_kv", "the PL/pgSQL stamp is back");
        eprintln!(
            "failover without the C stamp's library: the customer's writes succeed again \
             {:?} after the promotion began",
            promoted.elapsed()
        );
    }
    let put2 = eventually(WINDOW, "a PUT through syncar succeeds", || async {
        let r = b.put("/v1/kv/put", r#"{"n":2}"#).await;
        (r.status == 200 || r.status == 201).then(|| r.etag_version())
    })
    .await;
    // The relay streams from the promoted server: whatever it had to do first (a new slot
    // and a reset, before 17) is done by then.
    eventually(
        WINDOW,
        "the relay streams from the promoted server",
        || async {
            let streaming: i64 = query_value(
                &pg,
                "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = 'syncar-relay' AND state = 'streaming'",
            )
            .await;
            (streaming > 0).then_some(())
        },
    )
    .await;
    let relaying_again = promoted.elapsed();
    for i in [&a, &b] {
        i.sees("/v1/kv/sql", sql2, WINDOW).await;
        i.sees("/v1/kv/put", put2, WINDOW).await;
    }
    // Streaming again: a plain-SQL change must now evict what both instances hold in L1.
    for i in [&a, &b] {
        eventually(WINDOW, "sql is served from L1 again", || async {
            let r = i.get("/v1/kv/sql").await;
            (r.etag_version() == sql2 && r.header("x-cache") == Some("l1")).then_some(())
        })
        .await;
    }
    pg.execute(
        "UPDATE syncar_kv SET value = '{\"n\":3}' WHERE key = 'sql'",
        &[],
    )
    .await
    .unwrap();
    let sql3: i64 = query_value(&pg, "SELECT version FROM syncar_kv WHERE key = 'sql'").await;
    for i in [&a, &b] {
        i.sees("/v1/kv/sql", sql3, WINDOW).await;
    }
    eprintln!(
        "failover (Postgres {}): the relay streamed from the promoted server {relaying_again:?} \
         after the promotion began",
        pair.major
    );

    let after = generations(&env).await;
    if follows {
        assert_eq!(
            before, after,
            "the relay continued from the synchronized slot: no resource's generation may be \
             raised (no reset of the caches)"
        );
        for i in [&a, &b] {
            // Held in L1 all along (a read could find L1 bypassed for a moment, on a loaded
            // machine a heartbeat late: that says nothing of what L1 kept).
            let held = i
                .state()
                .tiers
                .peek_l1(&syncar::model::CacheKey::new("kv", "kept"));
            assert_eq!(
                held.map(|c| (c.version.0, c.is_servable())),
                Some((kept, true)),
                "a key not written since the failover is still in L1"
            );
            eventually(WINDOW, "kept served from L1", || async {
                let r = i.get("/v1/kv/kept").await;
                (r.etag_version() == kept && r.header("x-cache") == Some("l1")).then_some(())
            })
            .await;
        }
        let synced: bool = query_value(
            &pg,
            &format!("SELECT synced FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await;
        assert!(
            synced,
            "the relay streams the synchronized slot, not a new one"
        );
    } else {
        let generation = |g: &std::collections::HashMap<String, String>| -> i64 {
            g.get("kv").map_or(0, |v| v.parse().unwrap())
        };
        assert!(
            generation(&after) > generation(&before),
            "before Postgres 17 the slot cannot follow: every resource is reset \
             ({before:?} -> {after:?}); standby log:\n{}",
            pair.standby_log()
        );
        for i in [&a, &b] {
            i.sees("/v1/kv/kept", kept, WINDOW).await;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}
