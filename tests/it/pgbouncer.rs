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

async fn exercise(env: &Env, url: &str, source: syncar::config::PostgresSource) {
    env.pg()
        .await
        .batch_execute("CREATE TABLE items (id text PRIMARY KEY, v text)")
        .await
        .unwrap();
    let config = |c: &mut syncar::Config| {
        c.postgres.url = url.to_string();
        c.feeds.postgres_source = source;
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
