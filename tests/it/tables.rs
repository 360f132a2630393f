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
    assert!(
        existing.etag_version() > 0,
        "the migration versioned existing rows"
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
