//! Configured resources on existing tables: versioning added by the migration, documents as
//! rows, and Postgres checking the types.

use serde_json::json;

use crate::support::{request, Env};

async fn users_env() -> Env {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE users (
                id integer PRIMARY KEY,
                name text NOT NULL,
                age integer CHECK (age >= 0),
                email text UNIQUE,
                created timestamptz NOT NULL DEFAULT '2020-01-01T00:00:00Z',
                name_upper text GENERATED ALWAYS AS (upper(name)) STORED,
                t text -- named like the alias syncar's SQL uses
             );
             INSERT INTO users (id, name) VALUES (1, 'existing');",
        )
        .await
        .unwrap();
    env
}

fn users(c: &mut syncar::Config) {
    c.resources
        .push(crate::support::resource("users", "id", "version"));
}

#[tokio::test]
async fn rows_are_documents_with_versions() {
    let env = users_env().await;
    let a = env.start(users).await;

    let existing = a.get("/v1/users/1").await;
    assert_eq!(existing.status, 200, "{existing:?}");
    assert_eq!(
        existing.etag_version(),
        0,
        "a row not written since the install is version 0 (the column was added without \
         rewriting the table)"
    );
    let doc = existing.json();
    assert_eq!(doc["name"], "existing");
    assert!(
        doc.get("version").is_none(),
        "the version column is not part of the document"
    );

    let put = a.put("/v1/users/2", r#"{"name":"ann","age":3}"#).await;
    assert_eq!(put.status, 201, "{put:?}");
    let got = a.get("/v1/users/2").await;
    assert_eq!(got.etag_version(), put.etag_version());
    assert_eq!(
        got.json(),
        json!({"id": 2, "name": "ann", "age": 3, "email": null,
               "created": "2020-01-01T00:00:00+00:00", "name_upper": "ANN", "t": null})
    );
    // `2`, `02` and `+2` name one row, hence one cache entry.
    let padded = a.get("/v1/users/02").await;
    assert_eq!(padded.header("x-cache"), Some("l1"));
    assert_eq!(padded.etag_version(), put.etag_version());

    // A document read can be written back (generated column and all).
    let mut doc = got.json();
    doc["age"] = json!(4);
    let back = a.put("/v1/users/2", &doc.to_string()).await;
    assert_eq!(back.status, 200, "{back:?}");
    assert_eq!(a.get("/v1/users/2").await.json()["age"], 4);

    // PUT replaces the row: absent columns take their default, on update as on insert.
    let replaced = a.put("/v1/users/2", r#"{"name":"bo","email":"a@x"}"#).await;
    assert_eq!(replaced.status, 200);
    let now = a.get("/v1/users/2").await.json();
    assert_eq!(
        (now["age"].clone(), now["email"].clone()),
        (json!(null), json!("a@x"))
    );
    let tag = format!("\"{}\"", replaced.etag_version());
    let conditional = request(
        a.addr(),
        "PUT",
        "/v1/users/2",
        &[("if-match", &tag)],
        Some(br#"{"name":"cy","age":5}"#),
    )
    .await;
    assert_eq!(conditional.status, 200, "{conditional:?}");
    let now = a.get("/v1/users/2").await.json();
    assert_eq!(
        (
            now["name"].clone(),
            now["age"].clone(),
            now["email"].clone()
        ),
        (json!("cy"), json!(5), json!(null))
    );
    let touch = request(
        a.addr(),
        "PUT",
        "/v1/users/2",
        &[("if-match", "*")],
        Some(b"{}"),
    )
    .await;
    assert_eq!(
        touch.status, 422,
        "name is NOT NULL without a default: {touch:?}"
    );

    let del = a.delete("/v1/users/2").await;
    assert_eq!(del.status, 204);
    assert_eq!(a.get("/v1/users/2").await.status, 404);
}

#[tokio::test]
async fn postgres_checks_the_types_and_constraints() {
    let env = users_env().await;
    let a = env.start(users).await;
    for (body, why) in [
        (
            r#"{"name":"x","age":"old"}"#,
            "invalid input syntax for type integer",
        ),
        (r#"{"age":3}"#, "null value in column \"name\""),
        (r#"{"name":"x","age":-1}"#, "check constraint"),
        (r#"{"name":"x","bogus":1}"#, "not a column"),
        (r#"{"id":9,"name":"x"}"#, "in the URL"),
        (r#"[1,2]"#, "JSON object"),
    ] {
        let r = a.put("/v1/users/3", body).await;
        assert_eq!(r.status, 422, "{body}: {r:?}");
        assert_eq!(r.code(), "invalid_document");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(why), "{body}: {message}");
    }
    assert_eq!(
        a.put("/v1/users/4", r#"{"name":"a","email":"same"}"#)
            .await
            .status,
        201
    );
    let dup = a.put("/v1/users/5", r#"{"name":"b","email":"same"}"#).await;
    assert_eq!(dup.status, 409);
    assert_eq!(dup.code(), "conflict");

    let bad_key = a.get("/v1/users/abc").await;
    assert_eq!(bad_key.status, 400);
    assert_eq!(bad_key.code(), "invalid_key");
    let injected = request(
        a.addr(),
        "GET",
        "/v1/users/1%3B%20DROP%20TABLE%20users",
        &[],
        None,
    )
    .await;
    assert_eq!(injected.status, 400);
    assert_eq!(
        a.get("/v1/users/1").await.status,
        200,
        "the table is still there"
    );
}

/// One configured table that does not exist and one that does not fit take nothing else
/// down: `kv` and the fitting table serve, the two answer 503 `resource_unavailable` with the
/// reason, and `/readyz` stays 200 naming them.
#[tokio::test]
async fn a_missing_or_unfit_table_leaves_the_other_resources_serving() {
    let env = users_env().await;
    env.pg()
        .await
        .batch_execute("CREATE TABLE nokey (id integer, name text)")
        .await
        .unwrap();
    let a = env
        .start(|c| {
            users(c);
            c.resources
                .push(crate::support::resource("nokey", "id", "version"));
            let mut missing = crate::support::resource("orders", "id", "version");
            missing.table = "no_such_table".into();
            c.resources.push(missing);
        })
        .await;
    assert_eq!(a.put("/v1/kv/k", "1").await.status, 201);
    assert_eq!(a.get("/v1/users/1").await.status, 200);
    for (path, reason) in [
        ("/v1/orders/1", "no_such_table does not exist"),
        ("/v1/nokey/1", "unique index"),
    ] {
        let r = a.get(path).await;
        assert_eq!(r.status, 503, "{path}: {r:?}");
        assert_eq!(r.code(), "resource_unavailable");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(reason), "{path}: {message}");
    }
    let ready = a.readyz().await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["resources"]["users"]["ok"], true, "{ready}");
    assert_eq!(ready["resources"]["orders"]["ok"], false, "{ready}");
    assert!(
        ready["resources"]["orders"]["error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{ready}"
    );
    let unknown = a.get("/v1/nothing/1").await;
    assert_eq!(unknown.code(), "unknown_resource");
}

/// A jsonb column takes a value as deep as Postgres accepts: only the document's top level
/// is parsed by syncar.
#[tokio::test]
async fn a_jsonb_column_takes_deep_values() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, data jsonb)")
        .await
        .unwrap();
    let a = env
        .start(|c| {
            c.resources
                .push(crate::support::resource("notes", "id", "version"))
        })
        .await;
    let deep = format!("{}\"x\"{}", "[".repeat(2000), "]".repeat(2000));
    let put = a
        .put("/v1/notes/1", &format!(r#"{{"data": {deep}, "id": 1}}"#))
        .await;
    assert_eq!(put.status, 201, "{put:?}");
    let got = a.get("/v1/notes/1").await;
    assert!(String::from_utf8_lossy(&got.body)
        .replace(' ', "")
        .contains(&deep));
}

/// Installing on a table with rows adds the version column without rewriting the table
/// (its file stays), and every coherence rule holds for the rows it leaves at version 0:
/// they are read and cached, a conditional write on `"0"` works and stamps them, a plain-SQL
/// update and a delete of one reach every instance, and a TRUNCATE flushes them.
#[tokio::test]
async fn installing_on_a_table_with_rows_rewrites_nothing_and_keeps_coherence() {
    for source in [
        syncar::config::PostgresSource::Wal,
        syncar::config::PostgresSource::ChangesLog,
    ] {
        let env = Env::new().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, body text); \
             INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
        let file: u32 =
            crate::support::query_value(&pg, "SELECT pg_relation_filenode('big')::oid").await;
        let big = |c: &mut syncar::Config| {
            c.feeds.postgres_source = source;
            c.resources
                .push(crate::support::resource("big", "id", "version"));
        };
        let a = env.start(big).await;
        let b = env.start(big).await;
        let after: u32 =
            crate::support::query_value(&pg, "SELECT pg_relation_filenode('big')::oid").await;
        assert_eq!(file, after, "{source:?}: the table was not rewritten");
        let unstamped: i64 =
            crate::support::query_value(&pg, "SELECT count(*) FROM big WHERE version IS NULL")
                .await;
        assert_eq!(unstamped, 20000, "{source:?}: no row was touched");

        for i in [&a, &b] {
            let r = i.get("/v1/big/7").await;
            assert_eq!((r.status, r.etag_version()), (200, 0), "{source:?}: {r:?}");
            assert_eq!(i.get("/v1/big/7").await.header("x-cache"), Some("l1"));
        }
        let written = request(
            a.addr(),
            "PUT",
            "/v1/big/7",
            &[("if-match", "\"0\"")],
            Some(br#"{"body": "seven"}"#),
        )
        .await;
        assert_eq!(
            written.status, 200,
            "{source:?}: If-Match \"0\": {written:?}"
        );
        let v = written.etag_version();
        assert!(v > 0, "{source:?}: the first write stamps the row");
        b.sees("/v1/big/7", v, std::time::Duration::from_secs(10))
            .await;

        for i in [&a, &b] {
            assert_eq!(i.get("/v1/big/8").await.etag_version(), 0);
        }
        let v8: i64 = crate::support::query_value(
            &pg,
            "UPDATE big SET body = 'eight' WHERE id = 8 RETURNING version",
        )
        .await;
        pg.batch_execute("DELETE FROM big WHERE id = 9")
            .await
            .unwrap();
        for i in [&a, &b] {
            i.sees("/v1/big/8", v8, std::time::Duration::from_secs(10))
                .await;
            i.sees_absent("/v1/big/9", std::time::Duration::from_secs(10))
                .await;
        }
        // A row at version 0 moved to another key: the old key is gone, the new one there.
        for i in [&a, &b] {
            assert_eq!(i.get("/v1/big/11").await.etag_version(), 0);
        }
        let moved: i64 = crate::support::query_value(
            &pg,
            "UPDATE big SET id = 200011 WHERE id = 11 RETURNING version",
        )
        .await;
        for i in [&a, &b] {
            i.sees_absent("/v1/big/11", std::time::Duration::from_secs(10))
                .await;
            i.sees("/v1/big/200011", moved, std::time::Duration::from_secs(10))
                .await;
        }
        // `min_version` above a row's 0 reads Postgres, which holds 0: the row, not a 404.
        let r = a.get("/v1/big/12?min_version=1").await;
        assert_eq!((r.status, r.etag_version()), (200, 0), "{source:?}: {r:?}");
        for i in [&a, &b] {
            assert_eq!(i.get("/v1/big/10").await.etag_version(), 0);
        }
        pg.batch_execute("TRUNCATE big").await.unwrap();
        for i in [&a, &b] {
            i.sees_absent("/v1/big/10", std::time::Duration::from_secs(10))
                .await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A row at version 0 (installed on, not written since) under the auditor: a copy of it in L1
/// planted stale (no feeds, then a plain-SQL update stamps the row) is found and repaired like
/// any other; and a Postgres that went back in time (its sequence set below every version
/// seen, then a feed reconnecting) resets the caches and the row still reads right.
#[tokio::test]
async fn a_row_at_version_0_under_the_auditor_and_a_postgres_that_went_back() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE old (id int PRIMARY KEY, body text); \
         INSERT INTO old SELECT g, 'row ' || g FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    let a = env
        .start(|c| {
            c.feeds.postgres = false;
            c.feeds.redis = false;
            c.audit.sample_ratio = 1.0;
            c.audit.max_per_second = 1000;
            c.resources
                .push(crate::support::resource("old", "id", "version"));
        })
        .await;
    let r = a.get("/v1/old/1").await;
    assert_eq!((r.status, r.etag_version()), (200, 0));
    // Versions well above what a sequence set back to 1 would hand out again.
    pg.batch_execute("SELECT setval('syncar_version_seq', 1000)")
        .await
        .unwrap();
    let v1: i64 = crate::support::query_value(
        &pg,
        "UPDATE old SET body = 'one' WHERE id = 1 RETURNING version",
    )
    .await;
    let served = a.get("/v1/old/1").await;
    assert_eq!(
        (served.etag_version(), served.header("x-cache")),
        (0, Some("l1")),
        "planted: L1 serves the version-0 copy"
    );
    crate::support::eventually(std::time::Duration::from_secs(10), "the repair", || async {
        (a.get("/v1/old/1").await.etag_version() == v1).then_some(())
    })
    .await;
    // An unwritten row stays at 0 through every audit of it.
    for _ in 0..20 {
        assert_eq!(a.get("/v1/old/2").await.etag_version(), 0);
    }
    a.shutdown().await;

    // Postgres goes back: its sequence below the versions seen, every connection dropped.
    // The instance compares when its feed reconnects, resets, and serves every row as
    // Postgres has it; later writes win again.
    let b = env
        .start(|c| {
            c.resources
                .push(crate::support::resource("old", "id", "version"));
        })
        .await;
    assert_eq!(b.get("/v1/old/1").await.etag_version(), v1);
    assert_eq!(b.get("/v1/old/2").await.etag_version(), 0);
    let went_back_at = syncar::model::now_ms();
    pg.batch_execute(
        "SELECT setval('syncar_version_seq', 1); \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await
    .unwrap();
    crate::support::eventually(
        std::time::Duration::from_secs(10),
        "the feed back",
        || async {
            let feed = b.readyz().await["feeds"]["postgres"].clone();
            (feed["up"] == true && feed["since_unix_ms"].as_u64()? > went_back_at).then_some(())
        },
    )
    .await;
    let v3: i64 = crate::support::query_value(
        &pg,
        "UPDATE old SET body = 'three' WHERE id = 3 RETURNING version",
    )
    .await;
    assert!(
        v3 > v1,
        "the sequence was moved past every version seen ({v3} <= {v1})"
    );
    for (key, version) in [(1, v1), (2, 0), (3, v3)] {
        b.sees(
            &format!("/v1/old/{key}"),
            version,
            std::time::Duration::from_secs(10),
        )
        .await;
    }
    b.shutdown().await;
}
