//! syncar behind PgBouncer, as a deployment whose `postgres.url` names one: every path that
//! talks to Postgres through the pool (migrations, reads, writes, transactions, the feed's
//! own connection) works in session pooling, and in transaction pooling where it can.

use std::time::Duration;

use serde_json::json;

use crate::support::{request, servers, Env, PgBouncer};

const WINDOW: Duration = Duration::from_secs(10);

/// `env`'s database URL through `bouncer`.
fn through(env: &Env, bouncer: &PgBouncer) -> String {
    env.pg_url.replace(
        &format!(":{}/", servers().pg_port),
        &format!(":{}/", bouncer.port),
    )
}

/// Two instances whose `postgres.url` is `url`: writes through either and plain SQL past
/// them reach both. With the `wal` source the relay's replication connection goes to
/// Postgres itself (`postgres.replication_url`), as a pooler carries none.
async fn exercise(env: &Env, url: &str, source: syncar::config::PostgresSource) {
    env.pg()
        .await
        .batch_execute("CREATE TABLE items (id text PRIMARY KEY, v text)")
        .await
        .unwrap();
    let config = |c: &mut syncar::Config| {
        c.postgres.url = url.to_string();
        c.feeds.postgres_source = source;
        if source == syncar::config::PostgresSource::Wal {
            c.postgres.replication_url = Some(env.pg_url.clone());
        }
        c.resources
            .push(crate::support::resource("items", "id", "version"));
    };
    let a = env.start(config).await;
    let b = env.start(config).await;

    let put = a.put("/v1/kv/k", r#"{"x":1}"#).await;
    assert_eq!(put.status, 201, "{put:?}");
    b.sees("/v1/kv/k", put.etag_version(), WINDOW).await;
    let item = a.put("/v1/items/i1", r#"{"v":"one"}"#).await;
    assert_eq!(item.status, 201, "{item:?}");
    b.sees("/v1/items/i1", item.etag_version(), WINDOW).await;

    let tx = json!({"operations": [
        {"op": "put", "resource": "kv", "key": "t1", "document": 1},
        {"op": "put", "resource": "items", "key": "i2", "document": {"v": "two"}},
        {"op": "delete", "resource": "kv", "key": "k"},
        {"op": "delete", "resource": "kv", "key": "never"},
    ]});
    let done = request(
        a.addr(),
        "POST",
        "/v1",
        &[],
        Some(tx.to_string().as_bytes()),
    )
    .await;
    assert_eq!(done.status, 200, "{done:?}");
    b.sees_absent("/v1/kv/k", WINDOW).await;

    // A plain-SQL writer past syncar reaches both.
    env.pg()
        .await
        .batch_execute("UPDATE items SET v = 'sql' WHERE id = 'i1'")
        .await
        .unwrap();
    for i in [&a, &b] {
        crate::support::eventually(WINDOW, "the SQL write", || async {
            (i.get("/v1/items/i1").await.json()["v"] == "sql").then_some(())
        })
        .await;
    }
    let gone = a.delete("/v1/items/i2").await;
    assert!(gone.status < 300, "{gone:?}");
    b.sees_absent("/v1/items/i2", WINDOW).await;
}

#[tokio::test]
async fn syncar_works_through_pgbouncer_in_session_pooling() {
    let bouncer = PgBouncer::start("session", 20);
    let env = Env::new().await;
    let url = through(&env, &bouncer);
    exercise(&env, &url, syncar::config::PostgresSource::ChangesLog).await;
}

#[tokio::test]
async fn the_wal_source_works_with_its_relay_beside_pgbouncer() {
    let bouncer = PgBouncer::start("session", 20);
    let env = Env::new().await;
    let url = through(&env, &bouncer);
    exercise(&env, &url, syncar::config::PostgresSource::Wal).await;
}

/// PgBouncer 1.18 in transaction pooling lends one server session to any client between
/// transactions and passes statement names through: syncar's prepared statements could run
/// on another client's session (another instance's `s5`, prepared from other SQL). syncar
/// finds out before it runs anything, and stays not ready with the reason; nothing of its
/// schema is installed.
#[tokio::test]
async fn a_transaction_pool_that_passes_statement_names_through_is_refused_with_the_reason() {
    let bouncer = PgBouncer::start("transaction", 2);
    let env = Env::new().await;
    let mut config = env.config();
    config.postgres.url = through(&env, &bouncer);
    crate::support::init_logging();
    let app = syncar::App::start(config.clone()).await.expect("starts");
    let state = app.state().clone();
    let reason = crate::support::eventually(WINDOW, "a reason", || async {
        let reason = state.catalog().err()?.to_string();
        (reason != "not ready: connecting to postgres").then_some(reason)
    })
    .await;
    assert!(
        reason.contains("max_prepared_statements") && reason.contains("transaction"),
        "{reason}"
    );
    assert!(app.ready(Duration::from_millis(200)).await.is_err());
    app.shutdown().await;
    let installed: i64 = crate::support::query_value(
        &env.pg().await,
        "SELECT count(*) FROM pg_class WHERE relname = 'syncar_kv'",
    )
    .await;
    assert_eq!(installed, 0, "nothing was installed through the pooler");

    // The command line says the same.
    let refused = syncar::app::run_migration(&config)
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("max_prepared_statements"),
        "{refused}"
    );
}

/// Where the check cannot tell (the pooler lent the second connection another server
/// session), a statement that meets a session it was not prepared on fails with the same
/// explanation, as a 503's reason, not an internal error. Shown on Postgres itself, where
/// only a statement name that no session has gives the same error.
#[tokio::test]
async fn a_statement_missing_from_its_session_is_explained() {
    let env = Env::new().await;
    let e = env
        .pg()
        .await
        .batch_execute("DEALLOCATE s999999")
        .await
        .expect_err("no such statement");
    match syncar::db::classify(e) {
        syncar::db::DbError::Unavailable(reason) => {
            assert!(reason.contains("26000"), "{reason}");
            assert!(reason.contains(syncar::db::POOLER_HINT), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// The `notify` source's LISTEN through a transaction pool: PgBouncer runs it in a server
/// session the connection holds for that statement only, and another session's
/// notification reaches that session while no client holds it, where PgBouncer drops it.
/// (A heartbeat sent on the listening connection itself came back every time, so the feed
/// counted as up while every customer's invalidation was lost.) The heartbeat now travels
/// as a customer's notification does, from another session: it never comes back, the feed
/// stays down with the reason and what to change, and L1 is never used.
#[tokio::test]
async fn a_listen_through_a_transaction_pool_is_explained() {
    let bouncer = PgBouncer::start("transaction", 4);
    let env = Env::new().await;
    let listen_url = through(&env, &bouncer);
    let mut config = env.config();
    config.feeds.postgres_source = syncar::config::PostgresSource::Notify;
    config.postgres.listen_url = Some(listen_url);
    crate::support::init_logging();
    // Never ready with its Postgres feed down: not `env.start`, which waits for it.
    let a = crate::support::Instance {
        app: syncar::App::start(config).await.expect("starts"),
    };
    let reason = crate::support::eventually(WINDOW, "the feed's reason", || async {
        let ready = a.readyz().await;
        let feed = &ready["feeds"]["postgres"];
        assert_eq!(feed["up"], false, "{ready}");
        feed["reason"].as_str().map(str::to_string)
    })
    .await;
    assert!(
        reason.contains("since LISTEN") && reason.contains("transaction pooling"),
        "{reason}"
    );
    // Down for two leases on the feed's own clock (a heartbeat sent on the listening
    // session came back within one), and never up meanwhile.
    let lease_ms = a.state().config.feeds.lease.as_millis() as u64;
    crate::support::eventually(WINDOW, "the feed down for two leases", || async {
        let ready = a.readyz().await;
        let feed = &ready["feeds"]["postgres"];
        assert_eq!(feed["up"], false, "{ready}");
        (feed["for_ms"].as_u64().unwrap_or_default() > 2 * lease_ms).then_some(())
    })
    .await;
    a.put("/v1/kv/k", "1").await;
    for _ in 0..2 {
        assert_ne!(
            a.get("/v1/kv/k").await.header("x-cache"),
            Some("l1"),
            "L1 bypassed"
        );
    }
    a.shutdown().await;
}
