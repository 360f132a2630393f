//! Live schema changes, as a migration tool makes them while two instances serve: every kind
//! of `ALTER TABLE`, on every source. The customer's own statements never fail because of
//! syncar, the other resources keep their L1 and their feed, and the changed resource serves
//! its new shape (or says why it cannot) without a restart.

use std::time::Duration;

use serde_json::{json, Value};
use syncar::config::PostgresSource;

use crate::support::{eventually, query_value, request, Env, Instance};

/// Generous for a loaded CI machine: the product's bound is `feeds.lease` (1 s).
const WINDOW: Duration = Duration::from_secs(10);

const SOURCES: [PostgresSource; 3] = [
    PostgresSource::Wal,
    PostgresSource::ChangesLog,
    PostgresSource::Notify,
];

/// An env with `items (id int primary key, name text)` holding rows 1, 2 and 3.
async fn items_env() -> Env {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, name text);
             INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');",
        )
        .await
        .unwrap();
    env
}

/// Two instances serving `items` and `kv` from `source`.
async fn fleet(env: &Env, source: PostgresSource) -> (Instance, Instance) {
    let configure = |c: &mut syncar::Config| {
        c.feeds.postgres_source = source;
        c.resources
            .push(crate::support::resource("items", "id", "version"));
    };
    (env.start(configure).await, env.start(configure).await)
}

/// Runs the customer's statement: it must succeed, whatever syncar thinks of the table.
async fn sql(env: &Env, statement: &str) {
    env.pg()
        .await
        .batch_execute(statement)
        .await
        .unwrap_or_else(|e| panic!("the customer's statement failed: {statement}: {e:?}"));
}

/// Waits until `path` on `i` answers 200 with a document for which `check` holds.
async fn serves(i: &Instance, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(WINDOW, what, || async {
        let r = i.get(path).await;
        (r.status == 200 && check(&r.json())).then(|| r.json())
    })
    .await
}

/// [`serves`] on each instance of `fleet`.
async fn all_serve(fleet: &[&Instance], path: &str, what: &str, check: impl Fn(&Value) -> bool) {
    for i in fleet {
        serves(i, path, what, &check).await;
    }
}

/// Waits until `/readyz` on `i` reports `resource` unavailable for a reason that contains
/// `because`, and returns the reason.
async fn unavailable(i: &Instance, resource: &str, because: &str) -> String {
    eventually(
        WINDOW,
        &format!("{resource} unavailable because of {because:?}"),
        || async {
            let ready = i.readyz().await;
            let r = &ready["resources"][resource];
            let reason = r["error"].as_str().unwrap_or_default();
            (r["ok"] == false && reason.contains(because)).then(|| reason.to_string())
        },
    )
    .await
}

/// The other resources keep L1 and the Postgres feed: a write on `a` reaches `b`'s L1.
async fn kv_keeps_l1(a: &Instance, b: &Instance, key: &str) {
    let v = a.put(&format!("/v1/kv/{key}"), "1").await.etag_version();
    b.sees(&format!("/v1/kv/{key}"), v, WINDOW).await;
    eventually(WINDOW, "kv served from b's L1", || async {
        (b.get(&format!("/v1/kv/{key}")).await.header("x-cache") == Some("l1")).then_some(())
    })
    .await;
    assert_eq!(b.readyz().await["feeds"]["postgres"]["up"], true);
}

/// The `tgenabled` of each of syncar's triggers on `table` (`A` always, `O`, `R`, `D`).
async fn trigger_modes(env: &Env, table: &str) -> Vec<String> {
    env.pg()
        .await
        .query(
            "SELECT tgenabled::text FROM pg_trigger \
             WHERE tgrelid = $1::text::regclass AND tgname LIKE 'syncar%'",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The slot's confirmed position, as a number of bytes.
async fn confirmed_lsn(env: &Env) -> i64 {
    query_value(
        &env.pg().await,
        "SELECT coalesce(pg_wal_lsn_diff(confirmed_flush_lsn, '0/0'), 0)::bigint \
         FROM pg_replication_slots WHERE slot_name LIKE 'syncar_%' AND database = current_database()",
    )
    .await
}

/// The key column renamed: the customer's DELETE, UPDATE and INSERT succeed (the trigger
/// finds the key by its attribute number, or announces a flush); the resource goes
/// unavailable with the reason on both instances; `kv` keeps its L1 and its feed and, with
/// `wal`, the slot keeps advancing. Renamed back, the resource serves again, every change
/// made meanwhile included, without a restart or a slot drop.
#[tokio::test]
async fn renaming_the_key_column_fails_no_statement_and_stalls_nothing_else() {
    for source in SOURCES {
        let env = items_env().await;
        let (a, b) = fleet(&env, source).await;
        all_serve(&[&a, &b], "/v1/items/2", "item 2", |d| d["name"] == "two").await;
        sql(&env, "ALTER TABLE items RENAME COLUMN id TO ident").await;
        sql(&env, "DELETE FROM items WHERE ident = 1").await;
        sql(&env, "UPDATE items SET name = 'TWO' WHERE ident = 2").await;
        sql(&env, "INSERT INTO items (ident, name) VALUES (9, 'nine')").await;
        for i in [&a, &b] {
            // The reason names the key.
            unavailable(i, "items", "\"id\"").await;
            let r = i.get("/v1/items/2").await;
            assert_eq!(r.status, 503, "{source:?}: {r:?}");
            assert_eq!(r.code(), "resource_unavailable", "{source:?}");
        }
        let before = if source == PostgresSource::Wal {
            confirmed_lsn(&env).await
        } else {
            0
        };
        kv_keeps_l1(&a, &b, "during").await;
        if source == PostgresSource::Wal {
            eventually(WINDOW, "the slot advancing", || async {
                (confirmed_lsn(&env).await > before).then_some(())
            })
            .await;
        }

        // A table that no longer fits, written to: flushed at each write, and the other
        // resources keep their L1 meanwhile.
        for n in 0..10 {
            sql(
                &env,
                &format!("UPDATE items SET name = 'w{n}' WHERE ident = 3"),
            )
            .await;
            let r = b.get("/v1/kv/during").await;
            assert_eq!(
                r.header("x-cache"),
                Some("l1"),
                "{source:?}: kv keeps L1: {r:?}"
            );
        }

        sql(&env, "ALTER TABLE items RENAME COLUMN ident TO id").await;
        // At once, before any instance (or the relay) has read the catalog again: the
        // change must still reach everyone, and the ones after it too.
        sql(&env, "UPDATE items SET name = 'w10' WHERE id = 3").await;
        all_serve(
            &[&a, &b],
            "/v1/items/3",
            "item 3 after the rename back",
            |d| d["name"] == "w10",
        )
        .await;
        // Keyed again, not flushed at each change: once the flushes of the change itself
        // are through, item 2 stays in L1 while 3 changes.
        let mut keyed = false;
        for n in 11..21 {
            eventually(WINDOW, "item 2 in b's L1", || async {
                (b.get("/v1/items/2").await.header("x-cache") == Some("l1")).then_some(())
            })
            .await;
            sql(
                &env,
                &format!("UPDATE items SET name = 'w{n}' WHERE id = 3"),
            )
            .await;
            let name = format!("w{n}");
            all_serve(&[&a, &b], "/v1/items/3", "a later change of item 3", |d| {
                d["name"] == name
            })
            .await;
            if b.get("/v1/items/2").await.header("x-cache") == Some("l1") {
                keyed = true;
                break;
            }
        }
        assert!(keyed, "{source:?}: every change of the table flushed it");
        for i in [&a, &b] {
            serves(i, "/v1/items/2", "item 2 after the rename back", |d| {
                d["name"] == "TWO"
            })
            .await;
            serves(i, "/v1/items/9", "item 9", |d| d["name"] == "nine").await;
            eventually(WINDOW, "item 1 gone", || async {
                (i.get("/v1/items/1").await.status == 404).then_some(())
            })
            .await;
        }
        // Changes after it are relayed per key again.
        sql(&env, "UPDATE items SET name = 'two again' WHERE id = 2").await;
        all_serve(&[&a, &b], "/v1/items/2", "item 2 updated", |d| {
            d["name"] == "two again"
        })
        .await;
        kv_keeps_l1(&a, &b, "after").await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// Ordinary columns added, renamed, dropped and retyped: every cached copy of the old shape
/// is retired on both instances, and writes use the new columns at once (a PUT naming a new
/// column writes it, one without it gives it its default, a document read is written back
/// unchanged), never a 500.
#[tokio::test]
async fn column_changes_are_served_and_written_without_a_restart() {
    for source in SOURCES {
        let env = items_env().await;
        let (a, b) = fleet(&env, source).await;
        for i in [&a, &b] {
            serves(i, "/v1/items/1", "item 1", |d| d["name"] == "one").await;
            assert_eq!(i.get("/v1/items/1").await.header("x-cache"), Some("l1"));
        }

        let before = a.get("/v1/items/1").await;
        let old_etag = before.header("etag").unwrap().to_string();
        sql(&env, "ALTER TABLE items ADD COLUMN price integer DEFAULT 5").await;
        all_serve(
            &[&a, &b],
            "/v1/items/1",
            "the new column in a cached row",
            |d| d["price"] == 5,
        )
        .await;
        // One version, two renderings: the ETag tells them apart, and a client holding the
        // old one gets the new body, not a 304.
        let after = eventually(WINDOW, "the new shape's ETag", || async {
            let r = b.get("/v1/items/1").await;
            (r.header("etag") != Some(old_etag.as_str())).then_some(r)
        })
        .await;
        assert_eq!(after.etag_version(), before.etag_version(), "{source:?}");
        let new_etag = after.header("etag").unwrap().to_string();
        for i in [&a, &b] {
            let stale = eventually(WINDOW, "the new body for the old ETag", || async {
                let r = request(
                    i.addr(),
                    "GET",
                    "/v1/items/1",
                    &[("if-none-match", &old_etag)],
                    None,
                )
                .await;
                (r.status == 200).then_some(r)
            })
            .await;
            assert_eq!(stale.json()["price"], 5, "{source:?}");
        }
        let fresh = eventually(WINDOW, "a's ETag", || async {
            let r = request(
                a.addr(),
                "GET",
                "/v1/items/1",
                &[("if-none-match", &new_etag)],
                None,
            )
            .await;
            (r.status == 304).then_some(r)
        })
        .await;
        assert_eq!(fresh.header("etag"), Some(new_etag.as_str()));
        // `"N-0"` names the shape the table had before: not the current rendering.
        let original = format!("\"{}-0\"", before.etag_version());
        let shaped = request(
            a.addr(),
            "PUT",
            "/v1/items/1",
            &[("if-match", &original)],
            Some(br#"{"name": "one"}"#),
        )
        .await;
        let current = request(
            a.addr(),
            "PUT",
            "/v1/items/1",
            &[("if-match", &new_etag)],
            Some(br#"{"name": "one"}"#),
        )
        .await;
        assert_eq!(
            current.status, 200,
            "{source:?}: the current ETag: {current:?}"
        );
        assert_eq!(
            shaped.status, 412,
            "{source:?}: an ETag of another shape: {shaped:?}"
        );
        let put = a.put("/v1/items/1", r#"{"name": "one", "price": 7}"#).await;
        assert_eq!(
            put.status, 200,
            "{source:?}: a PUT naming the new column: {put:?}"
        );
        serves(&b, "/v1/items/1", "price 7", |d| d["price"] == 7).await;
        let put = b.put("/v1/items/4", r#"{"name": "four"}"#).await;
        assert_eq!(put.status, 201, "{source:?}: {put:?}");
        serves(&a, "/v1/items/4", "item 4 with the default", |d| {
            d == &json!({"id": 4, "name": "four", "price": 5})
        })
        .await;
        let read = a.get("/v1/items/1").await;
        let back = a
            .put("/v1/items/1", std::str::from_utf8(&read.body).unwrap())
            .await;
        assert_eq!(
            back.status, 200,
            "{source:?}: a document read, written back: {back:?}"
        );

        sql(&env, "ALTER TABLE items RENAME COLUMN name TO title").await;
        // At once: the instance may not have heard of the change yet. Never a 500.
        let old = a.put("/v1/items/2", r#"{"name": "x"}"#).await;
        assert_eq!(old.status, 422, "{source:?}: the old column name: {old:?}");
        let put = a.put("/v1/items/2", r#"{"title": "TWO"}"#).await;
        assert_eq!(put.status, 200, "{source:?}: {put:?}");
        for i in [&a, &b] {
            serves(i, "/v1/items/2", "the renamed column", |d| {
                d["title"] == "TWO" && d.get("name").is_none()
            })
            .await;
            serves(i, "/v1/items/3", "a cached row's renamed column", |d| {
                d["title"] == "three"
            })
            .await;
        }

        // A rewrite that keeps the column's type changes every row and no version.
        all_serve(&[&a, &b], "/v1/items/3", "item 3", |d| {
            d["title"] == "three"
        })
        .await;
        sql(
            &env,
            "ALTER TABLE items ALTER COLUMN title TYPE text USING upper(title)",
        )
        .await;
        all_serve(&[&a, &b], "/v1/items/3", "the rewritten column", |d| {
            d["title"] == "THREE"
        })
        .await;

        sql(&env, "ALTER TABLE items DROP COLUMN title").await;
        let put = b.put("/v1/items/3", r#"{"price": 1}"#).await;
        assert_eq!(put.status, 200, "{source:?}: {put:?}");
        all_serve(&[&a, &b], "/v1/items/3", "the dropped column gone", |d| {
            d == &json!({"id": 3, "price": 1})
        })
        .await;

        sql(
            &env,
            "ALTER TABLE items ALTER COLUMN price TYPE numeric(6, 2)",
        )
        .await;
        for i in [&a, &b] {
            // Postgres renders numeric(6, 2) with its scale: the cached `1` is retired.
            eventually(WINDOW, "the retyped column", || async {
                let r = i.get("/v1/items/3").await;
                String::from_utf8_lossy(&r.body)
                    .contains(r#""price": 1.00"#)
                    .then_some(())
            })
            .await;
        }
        let put = a.put("/v1/items/3", r#"{"price": 2.5}"#).await;
        assert_eq!(put.status, 200, "{source:?}: {put:?}");
        serves(&b, "/v1/items/3", "the retyped column written", |d| {
            d["price"].as_f64() == Some(2.5)
        })
        .await;
        kv_keeps_l1(&a, &b, "columns").await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// The table renamed, its key's unique index dropped, its key retyped to what syncar cannot
/// key, the table dropped and created again: the customer's statements succeed, the
/// resource goes unavailable with the reason, and comes back when the table fits again (a
/// recreated table once the fleet has installed syncar on it again).
#[tokio::test]
async fn table_and_key_changes_make_the_resource_unavailable_until_it_fits() {
    for source in SOURCES {
        let env = items_env().await;
        let (a, b) = fleet(&env, source).await;
        serves(&a, "/v1/items/1", "item 1", |d| d["name"] == "one").await;

        sql(&env, "ALTER TABLE items RENAME TO items_old").await;
        sql(&env, "UPDATE items_old SET name = 'ONE' WHERE id = 1").await;
        unavailable(&a, "items", "does not exist").await;
        sql(&env, "ALTER TABLE items_old RENAME TO items").await;
        all_serve(
            &[&a, &b],
            "/v1/items/1",
            "the update made while renamed",
            |d| d["name"] == "ONE",
        )
        .await;

        // A unique index on the key stands in for the primary key first (a table published
        // for `wal` without a replica identity would refuse its own UPDATEs: Postgres' rule).
        sql(
            &env,
            "CREATE UNIQUE INDEX items_id ON items (id); \
             ALTER TABLE items REPLICA IDENTITY USING INDEX items_id; \
             ALTER TABLE items DROP CONSTRAINT items_pkey",
        )
        .await;
        sql(&env, "UPDATE items SET name = 'one' WHERE id = 1").await;
        serves(&b, "/v1/items/1", "served on the unique index", |d| {
            d["name"] == "one"
        })
        .await;
        sql(
            &env,
            "ALTER TABLE items REPLICA IDENTITY FULL; DROP INDEX items_id",
        )
        .await;
        sql(&env, "UPDATE items SET name = 'uno' WHERE id = 1").await;
        sql(&env, "DELETE FROM items WHERE id = 3").await;
        unavailable(&b, "items", "unique index").await;
        sql(&env, "ALTER TABLE items ADD PRIMARY KEY (id)").await;
        all_serve(
            &[&a, &b],
            "/v1/items/1",
            "served on the primary key again",
            |d| d["name"] == "uno",
        )
        .await;

        sql(&env, "ALTER TABLE items ALTER COLUMN id TYPE numeric").await;
        sql(&env, "INSERT INTO items VALUES (5, 'five')").await;
        unavailable(&a, "items", "numeric").await;
        sql(&env, "ALTER TABLE items ALTER COLUMN id TYPE bigint").await;
        serves(&a, "/v1/items/5", "item 5 on a bigint key", |d| {
            d["name"] == "five"
        })
        .await;

        sql(
            &env,
            "DROP TABLE items; CREATE TABLE items (id integer PRIMARY KEY, name text); \
             INSERT INTO items VALUES (1, 'new one')",
        )
        .await;
        sql(&env, "UPDATE items SET name = 'newer one' WHERE id = 1").await;
        // Installed by the fleet (postgres.migrate_on_start), as a restart would.
        all_serve(&[&a, &b], "/v1/items/1", "the recreated table", |d| {
            d["name"] == "newer one"
        })
        .await;
        sql(&env, "UPDATE items SET name = 'newest one' WHERE id = 1").await;
        all_serve(
            &[&a, &b],
            "/v1/items/1",
            "a change of the recreated table",
            |d| d["name"] == "newest one",
        )
        .await;
        kv_keeps_l1(&a, &b, "tables").await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// The primary key dropped with nothing in its place (the first step of a migration that
/// replaces it), under the `wal` source: Postgres refuses UPDATE and DELETE on a published
/// table without a replica identity, so syncar takes the table out of its publication and
/// the customer's statements work again within a shape check; the resource is unavailable
/// saying why, and `kv` keeps serving. The key back: the table is published again and
/// served, with every change made meanwhile. An instance started meanwhile starts.
#[tokio::test]
async fn a_primary_key_dropped_under_the_wal_source_never_fails_the_customers_writes() {
    let env = items_env().await;
    let (a, b) = fleet(&env, PostgresSource::Wal).await;
    serves(&a, "/v1/items/1", "item 1", |d| d["name"] == "one").await;

    // The key stays unique (an index of its own), but the table has no replica identity.
    sql(
        &env,
        "CREATE UNIQUE INDEX items_id ON items (id); \
         ALTER TABLE items DROP CONSTRAINT items_pkey",
    )
    .await;
    let dropped = std::time::Instant::now();
    let pg = env.pg().await;
    eventually(WINDOW, "the customer's UPDATE works again", || async {
        pg.batch_execute("UPDATE items SET name = 'ONE' WHERE id = 1")
            .await
            .ok()
    })
    .await;
    eprintln!(
        "the customer's UPDATEs failed for {:?} after the primary key was dropped",
        dropped.elapsed()
    );
    sql(&env, "DELETE FROM items WHERE id = 3").await;
    for i in [&a, &b] {
        unavailable(i, "items", "replica identity").await;
    }
    kv_keeps_l1(&a, &b, "identity").await;
    // Nothing unique on the key any more: still unpublished, still writable.
    sql(&env, "DROP INDEX items_id").await;
    sql(&env, "UPDATE items SET name = 'ONE' WHERE id = 1").await;
    unavailable(&a, "items", "unique index").await;
    // A restart meanwhile: the instance starts, `items` unavailable, the rest served.
    let c = env
        .start(|c| {
            c.feeds.postgres_source = PostgresSource::Wal;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
        })
        .await;
    unavailable(&c, "items", "unique index").await;
    c.shutdown().await;

    sql(&env, "ALTER TABLE items ADD PRIMARY KEY (id)").await;
    for i in [&a, &b] {
        serves(i, "/v1/items/1", "the update made while unpublished", |d| {
            d["name"] == "ONE"
        })
        .await;
        eventually(WINDOW, "the delete made while unpublished", || async {
            (i.get("/v1/items/3").await.status == 404).then_some(())
        })
        .await;
    }
    sql(&env, "UPDATE items SET name = 'uno' WHERE id = 1").await;
    all_serve(&[&a, &b], "/v1/items/1", "a change relayed again", |d| {
        d["name"] == "uno"
    })
    .await;
    kv_keeps_l1(&a, &b, "identity-back").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// syncar's own version column renamed, then dropped: the customer's writes succeed (the
/// stamp finds the column by its attribute number, then leaves rows unstamped), and the
/// resource goes unavailable saying so.
#[tokio::test]
async fn the_version_column_renamed_or_dropped_fails_no_statement() {
    for source in SOURCES {
        let env = items_env().await;
        let (a, b) = fleet(&env, source).await;
        serves(&a, "/v1/items/1", "item 1", |d| d["name"] == "one").await;
        sql(&env, "ALTER TABLE items RENAME COLUMN version TO v").await;
        let before: i64 =
            query_value(&env.pg().await, "SELECT last_value FROM syncar_version_seq").await;
        let stamped: i64 = query_value(
            &env.pg().await,
            "UPDATE items SET name = 'x' WHERE id = 1 RETURNING v",
        )
        .await;
        assert!(
            stamped > before,
            "{source:?}: the renamed column is still stamped"
        );
        sql(&env, "DELETE FROM items WHERE id = 2").await;
        unavailable(&a, "items", "version").await;
        sql(&env, "ALTER TABLE items DROP COLUMN v").await;
        sql(&env, "INSERT INTO items VALUES (7, 'seven')").await;
        sql(&env, "UPDATE items SET name = 'y' WHERE id = 1").await;
        kv_keeps_l1(&a, &b, "version").await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// Replica identities that are not what they seem, under the `wal` source: a DEFERRABLE
/// primary key (Postgres uses none as the identity) is left out of the publication at
/// install, and a many-column primary key dropped while the key column keeps a unique
/// index of its own takes the table out at once. The customer's UPDATE and DELETE work
/// throughout; the resource is unavailable saying why.
#[tokio::test]
async fn identities_postgres_does_not_use_never_fail_the_customers_writes() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE, name text); \
             INSERT INTO deferred VALUES (1, 'one'); \
             CREATE TABLE tenants (tenant int, id int, name text, PRIMARY KEY (tenant, id), \
                                   UNIQUE (id)); \
             INSERT INTO tenants VALUES (1, 1, 'one')",
        )
        .await
        .unwrap();
    let a = env
        .start(|c| {
            c.feeds.postgres_source = PostgresSource::Wal;
            for t in ["deferred", "tenants"] {
                c.resources
                    .push(crate::support::resource(t, "id", "version"));
            }
        })
        .await;
    sql(&env, "UPDATE deferred SET name = 'uno' WHERE id = 1").await;
    sql(&env, "DELETE FROM deferred WHERE id = 1").await;
    unavailable(&a, "deferred", "unique index").await;
    serves(&a, "/v1/tenants/1", "tenant row 1", |d| d["name"] == "one").await;

    sql(&env, "ALTER TABLE tenants DROP CONSTRAINT tenants_pkey").await;
    let pg = env.pg().await;
    eventually(WINDOW, "the customer's UPDATE works again", || async {
        pg.batch_execute("UPDATE tenants SET name = 'uno' WHERE id = 1")
            .await
            .ok()
    })
    .await;
    sql(&env, "DELETE FROM tenants WHERE id = 1").await;
    unavailable(&a, "tenants", "replica identity").await;
    a.shutdown().await;
}

/// The triggers of syncar's, as a bulk load or a restore tool treats them: disabled (`ALTER
/// TABLE ... DISABLE TRIGGER ALL`), then enabled again with `ENABLE TRIGGER ALL`, which
/// leaves them enabled for ordinary sessions only. While one is disabled the resource is
/// unavailable with the reason (writes change rows without a version syncar sees), and
/// every customer statement succeeds, the stamp disabled alone included (a row changed
/// unstamped is announced at a fresh version); once enabled, syncar enables them ALWAYS
/// again (a writer with `session_replication_role = replica` is versioned too) and serves
/// what the rows hold, never the copy cached before.
#[tokio::test]
async fn disabled_or_half_enabled_triggers_are_noticed_and_enabled_always_again() {
    for source in SOURCES {
        let env = items_env().await;
        sql(
            &env,
            "CREATE TABLE others (id integer PRIMARY KEY, name text)",
        )
        .await;
        let configure = |c: &mut syncar::Config| {
            c.feeds.postgres_source = source;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
            c.resources
                .push(crate::support::resource("others", "id", "version"));
        };
        let (a, b) = (env.start(configure).await, env.start(configure).await);
        all_serve(&[&a, &b], "/v1/items/1", "row 1", |d| d["name"] == "one").await;
        sql(&env, "ALTER TABLE items DISABLE TRIGGER ALL").await;
        for i in [&a, &b] {
            let reason = unavailable(i, "items", "disabled").await;
            assert!(
                reason.contains("ENABLE TRIGGER ALL"),
                "{source:?}: {reason}"
            );
        }
        kv_keeps_l1(&a, &b, "during").await;
        sql(&env, "UPDATE items SET name = 'bulk' WHERE id = 1").await;
        sql(&env, "INSERT INTO items VALUES (4, 'four')").await;
        // Another table's bulk load goes on meanwhile: what syncar enables again below is
        // items' triggers only.
        sql(&env, "ALTER TABLE others DISABLE TRIGGER ALL").await;
        unavailable(&a, "others", "disabled").await;
        sql(&env, "ALTER TABLE items ENABLE TRIGGER ALL").await;
        for i in [&a, &b] {
            serves(i, "/v1/items/1", "the bulk load's row", |d| {
                d["name"] == "bulk"
            })
            .await;
            serves(i, "/v1/items/4", "the bulk load's new row", |d| {
                d["name"] == "four"
            })
            .await;
        }
        let modes = trigger_modes(&env, "items").await;
        assert!(
            !modes.is_empty() && modes.iter().all(|m| m == "A"),
            "{source:?}: enabled always again: {modes:?}"
        );
        let others = trigger_modes(&env, "others").await;
        assert!(
            !others.is_empty() && others.iter().all(|m| m == "D"),
            "{source:?}: the other table's triggers stay disabled: {others:?}"
        );
        unavailable(&b, "others", "disabled").await;
        // A replica-role writer (a subscriber, a restore) is versioned and reaches both.
        sql(
            &env,
            "BEGIN; SET LOCAL session_replication_role = replica; \
             UPDATE items SET name = 'replica' WHERE id = 2; COMMIT",
        )
        .await;
        all_serve(&[&a, &b], "/v1/items/2", "the replica's write", |d| {
            d["name"] == "replica"
        })
        .await;

        // The stamp alone disabled: no statement fails, even on a row never stamped.
        sql(
            &env,
            "ALTER TABLE items DISABLE TRIGGER syncar_stamp_version; \
             UPDATE items SET name = 'unstamped' WHERE id = 3; \
             UPDATE items SET name = 'unstamped' WHERE id = 1",
        )
        .await;
        unavailable(&a, "items", "syncar_stamp_version").await;
        sql(
            &env,
            "ALTER TABLE items ENABLE ALWAYS TRIGGER syncar_stamp_version",
        )
        .await;
        // Undone at once, maybe before anyone announced the change: an instance whose
        // catalog was read across the DISABLE's commit (its fingerprint from before, the
        // trigger from after) once stayed unavailable here (a CI run); the catalog is now read
        // in one snapshot.
        for i in [&a, &b] {
            serves(i, "/v1/items/3", "row 3", |d| d["name"] == "unstamped").await;
            serves(i, "/v1/items/1", "row 1", |d| d["name"] == "unstamped").await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// Partitioning a cached table the usual way: a partitioned parent created beside it, the
/// table attached as its partition. Statements naming the parent fire the row triggers of
/// the partition but not its statement triggers, which announce changes; so the resource
/// goes unavailable with the reason (syncar serves no partition), the customer's writes
/// through the parent succeed, the other resources serve on, and once the table is
/// detached again it serves what its rows then hold.
#[tokio::test]
async fn a_table_attached_as_a_partition_goes_unavailable_until_detached() {
    for source in SOURCES {
        let env = items_env().await;
        let (a, b) = fleet(&env, source).await;
        all_serve(&[&a, &b], "/v1/items/1", "row 1", |d| d["name"] == "one").await;
        sql(
            &env,
            "CREATE TABLE items_all (id integer NOT NULL, name text, version bigint) \
             PARTITION BY RANGE (id); \
             ALTER TABLE items_all ATTACH PARTITION items FOR VALUES FROM (0) TO (1000)",
        )
        .await;
        for i in [&a, &b] {
            unavailable(i, "items", "partition").await;
        }
        sql(&env, "UPDATE items_all SET name = 'parent' WHERE id = 1").await;
        sql(&env, "DELETE FROM items_all WHERE id = 2").await;
        kv_keeps_l1(&a, &b, "partitioned").await;
        sql(&env, "ALTER TABLE items_all DETACH PARTITION items").await;
        for i in [&a, &b] {
            serves(i, "/v1/items/1", "the parent's write", |d| {
                d["name"] == "parent"
            })
            .await;
            i.sees_absent("/v1/items/2", WINDOW).await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// An unlogged table is emptied by crash recovery (and is empty on a promoted standby) with
/// no trigger firing, so syncar serves none: one configured from the start is left out with
/// the reason while the others serve (the `wal` source's migration does not try to publish
/// it, which Postgres would refuse), and a served table set `UNLOGGED` goes unavailable
/// until it is logged again, the customer's statements succeeding throughout. Under `wal`
/// Postgres itself refuses `SET UNLOGGED` on a published table.
#[tokio::test]
async fn an_unlogged_table_is_left_out_with_its_reason() {
    for source in SOURCES {
        let env = items_env().await;
        sql(
            &env,
            "CREATE UNLOGGED TABLE notes (id integer PRIMARY KEY, body text); \
             INSERT INTO notes VALUES (1, 'note')",
        )
        .await;
        let configure = |c: &mut syncar::Config| {
            c.feeds.postgres_source = source;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
            c.resources
                .push(crate::support::resource("notes", "id", "version"));
        };
        let (a, b) = (env.start(configure).await, env.start(configure).await);
        for i in [&a, &b] {
            serves(i, "/v1/items/1", "row 1", |d| d["name"] == "one").await;
            let reason = unavailable(i, "notes", "UNLOGGED").await;
            assert!(reason.contains("SET LOGGED"), "{source:?}: {reason}");
            assert_eq!(i.get("/v1/notes/1").await.status, 503, "{source:?}");
        }
        if source == PostgresSource::Wal {
            let e = env
                .pg()
                .await
                .batch_execute("ALTER TABLE items SET UNLOGGED")
                .await
                .expect_err("Postgres refuses to unlog a published table");
            assert!(
                format!("{e:?}").contains("publication"),
                "{source:?}: {e:?}"
            );
        } else {
            sql(&env, "ALTER TABLE items SET UNLOGGED").await;
            sql(&env, "UPDATE items SET name = 'unlogged' WHERE id = 1").await;
            for i in [&a, &b] {
                unavailable(i, "items", "UNLOGGED").await;
            }
            kv_keeps_l1(&a, &b, "unlogged").await;
            sql(&env, "ALTER TABLE items SET LOGGED").await;
            all_serve(
                &[&a, &b],
                "/v1/items/1",
                "the write made while unlogged",
                |d| d["name"] == "unlogged",
            )
            .await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// The unique index the reason asks for, added the way a busy table gets one: `CREATE
/// UNIQUE INDEX CONCURRENTLY`, which shows the index invalid for as long as older writers
/// hold the table, then makes it valid. The resource serves once it is valid; the change of
/// validity alone (nothing else in the table's shape changes then) must be seen.
#[tokio::test]
async fn a_unique_index_built_concurrently_is_served_once_valid() {
    for source in SOURCES {
        let env = items_env().await;
        sql(&env, "ALTER TABLE items DROP CONSTRAINT items_pkey").await;
        if source == PostgresSource::Wal {
            sql(&env, "ALTER TABLE items REPLICA IDENTITY FULL").await;
        }
        let (a, b) = fleet(&env, source).await;
        for i in [&a, &b] {
            unavailable(i, "items", "unique index").await;
        }
        // An older writer holds the table: the build waits for it with its index invalid.
        let writer = env.pg().await;
        writer
            .batch_execute("BEGIN; UPDATE items SET name = 'held' WHERE id = 1")
            .await
            .unwrap();
        let build = {
            let pg = env.pg().await;
            tokio::spawn(async move {
                pg.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY items_id ON items (id)")
                    .await
            })
        };
        eventually(WINDOW, "the index under construction", || async {
            let rows = env
                .pg()
                .await
                .query(
                    "SELECT 1 FROM pg_index WHERE indexrelid = 'items_id'::regclass \
                     AND NOT indisvalid",
                    &[],
                )
                .await
                .ok()?;
            (!rows.is_empty()).then_some(())
        })
        .await;
        // Long enough for every shape check to see the invalid index (lease / 2).
        tokio::time::sleep(Duration::from_secs(2)).await;
        for i in [&a, &b] {
            unavailable(i, "items", "unique index").await;
        }
        writer.batch_execute("COMMIT").await.unwrap();
        build.await.unwrap().expect("the index is built");
        all_serve(&[&a, &b], "/v1/items/1", "the held writer's row", |d| {
            d["name"] == "held"
        })
        .await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// The install of a table that came to fit waits for the migration's advisory lock (one
/// migration at a time across the fleet). While another session holds it, each try gives
/// up inside Postgres (`postgres.statement_timeout`), not only on syncar's side: a backend
/// left waiting would take the lock once free and migrate for a client long gone, and the
/// tries that follow would pile up beside it. Once the lock is free, the table is installed
/// and served after the retry's pause, not at the next recheck (30 s).
#[tokio::test]
async fn an_install_waiting_for_the_migration_lock_gives_up_inside_postgres() {
    let env = Env::new().await;
    // One instance: no other try can be waiting when the lock is released.
    let (a, b) = fleet(&env, PostgresSource::Wal).await;
    b.shutdown().await;
    let holder = env.pg().await;
    holder
        .execute("SELECT pg_advisory_lock(x'73796e636172'::int8)", &[])
        .await
        .unwrap();
    sql(
        &env,
        "CREATE TABLE items (id integer PRIMARY KEY, name text); \
         INSERT INTO items VALUES (1, 'one')",
    )
    .await;
    let pg = env.pg().await;
    let waiting = || async {
        pg.query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND classid::int8 = x'7379'::int8 AND objid::int8 = x'6e636172'::int8",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect::<Vec<i32>>()
    };
    let first = eventually(
        Duration::from_secs(40),
        "an install waiting for the lock",
        || async { waiting().await.first().copied() },
    )
    .await;
    // Gone while the lock is still held, and nothing waiting: released between two tries,
    // so the next one, not a waiting one, installs the table.
    eventually(
        Duration::from_secs(20),
        "the waiting install to give up while the lock is still held",
        || async { waiting().await.is_empty().then_some(()) },
    )
    .await;
    assert!(!waiting().await.contains(&first));
    unavailable(&a, "items", "").await;
    holder
        .execute("SELECT pg_advisory_unlock(x'73796e636172'::int8)", &[])
        .await
        .unwrap();
    all_serve(
        &[&a],
        "/v1/items/1",
        "the table, once the lock is free",
        |d| d["name"] == "one",
    )
    .await;
    a.shutdown().await;
}

/// A configured table the app's own schema migration creates after syncar started (the two
/// roll out together): unavailable saying it does not exist, then installed by the fleet
/// and served, without a restart; the other resources serve throughout.
#[tokio::test]
async fn a_table_created_after_the_fleet_started_is_installed_and_served() {
    for source in SOURCES {
        let env = Env::new().await;
        let (a, b) = fleet(&env, source).await;
        for i in [&a, &b] {
            unavailable(i, "items", "does not exist").await;
        }
        kv_keeps_l1(&a, &b, "before").await;
        sql(
            &env,
            "CREATE TABLE items (id integer PRIMARY KEY, name text); \
             INSERT INTO items VALUES (1, 'one')",
        )
        .await;
        all_serve(&[&a, &b], "/v1/items/1", "the new table's row", |d| {
            d["name"] == "one"
        })
        .await;
        sql(&env, "UPDATE items SET name = 'uno' WHERE id = 1").await;
        all_serve(&[&a, &b], "/v1/items/1", "a change of the new table", |d| {
            d["name"] == "uno"
        })
        .await;
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A customer's lock on one table (`LOCK TABLE`, or an `ALTER TABLE` waiting for its own)
/// holds every read of it that reaches Postgres until `statement_timeout`. Those reads leave
/// a quarter of the pool to the others: their misses and writes go on meanwhile
/// (before, the locked table's reads took every connection and `kv`'s PUTs and reads
/// answered 503 after `pool_timeout`).
#[tokio::test]
async fn reads_held_by_a_lock_on_one_table_leave_the_pool_to_the_others() {
    let env = items_env().await;
    let a = env
        .start(|c| {
            c.postgres.pool_size = 4;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
        })
        .await;
    let locker = env.pg().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let addr = a.addr();
    let held: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(async move {
                let path = format!("/v1/items/{}?consistency=strong", i % 3 + 1);
                request(addr, "GET", &path, &[], None).await.status
            })
        })
        .collect();
    let waiting = || async {
        query_value::<i64>(
            &env.pg().await,
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
             WHERE datname = pg_catalog.current_database() AND wait_event_type = 'Lock' \
               AND query LIKE '%items%' AND query NOT LIKE '%pg_stat_activity%'",
        )
        .await
    };
    eventually(
        Duration::from_secs(10),
        "items' reads waiting on the lock",
        || async { (waiting().await >= 2).then_some(()) },
    )
    .await;
    let put = a.put("/v1/kv/free", "1").await;
    assert!(put.status == 200 || put.status == 201, "{:?}", put.body);
    let read = a.get("/v1/kv/free?consistency=strong").await;
    assert_eq!(
        (read.status, read.json()),
        (200, json!(1)),
        "kv read from Postgres"
    );
    assert_eq!(waiting().await, 3, "three of the pool's 4, no more");
    locker.batch_execute("COMMIT").await.unwrap();
    for r in held {
        let status = r.await.unwrap();
        assert!(
            status == 200 || status == 503,
            "a read of the locked table: {status}"
        );
    }
    assert_eq!(a.get("/v1/items/1").await.status, 200);
}

/// The publication's `publish` option narrowed under the fleet (as a DBA might, to let
/// UPDATEs through on a table without a replica identity): the table's UPDATEs and DELETEs
/// no longer reached the relay, and every instance served what it had cached, for the TTL,
/// with `/readyz` all ok. syncar sets the option back with a flush, and what changed
/// meanwhile is served.
#[tokio::test]
async fn a_publication_narrowed_to_inserts_is_set_back_and_flushed() {
    let env = items_env().await;
    let (a, b) = fleet(&env, PostgresSource::Wal).await;
    all_serve(&[&a, &b], "/v1/items/1", "row 1", |d| d["name"] == "one").await;
    sql(
        &env,
        "ALTER PUBLICATION syncar SET (publish = 'insert, truncate')",
    )
    .await;
    sql(&env, "UPDATE items SET name = 'uno' WHERE id = 1").await;
    sql(&env, "DELETE FROM items WHERE id = 2").await;
    all_serve(&[&a, &b], "/v1/items/1", "the update made meanwhile", |d| {
        d["name"] == "uno"
    })
    .await;
    for i in [&a, &b] {
        i.sees_absent("/v1/items/2", WINDOW).await;
    }
    eventually(WINDOW, "the publish option set back", || async {
        let everything: bool = query_value(
            &env.pg().await,
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication \
             WHERE pubname = 'syncar'",
        )
        .await;
        everything.then_some(())
    })
    .await;
    // Relayed again: a change after it reaches both, with L1 in use.
    sql(&env, "UPDATE items SET name = 'eins' WHERE id = 1").await;
    all_serve(&[&a, &b], "/v1/items/1", "a later update", |d| {
        d["name"] == "eins"
    })
    .await;
    kv_keeps_l1(&a, &b, "after").await;
}

/// A served table given an inheritance child (`CREATE TABLE ... INHERITS`): a read of the
/// table returns the child's rows, whose writes fire none of syncar's triggers and are not
/// relayed (a child's row was served unchanged after its UPDATE and DELETE). The resource is
/// unavailable while the table has children, saying why; the customer's statements succeed;
/// it is served again once it has none.
#[tokio::test]
async fn a_table_given_inheritance_children_is_unavailable_until_it_has_none() {
    let env = items_env().await;
    let (a, b) = fleet(&env, PostgresSource::Wal).await;
    all_serve(&[&a, &b], "/v1/items/1", "row 1", |d| d["name"] == "one").await;
    sql(&env, "CREATE TABLE items_archive () INHERITS (items)").await;
    sql(
        &env,
        "INSERT INTO items_archive (id, name) VALUES (500, 'archived')",
    )
    .await;
    for i in [&a, &b] {
        unavailable(i, "items", "inheritance children").await;
    }
    kv_keeps_l1(&a, &b, "during").await;
    sql(&env, "UPDATE items SET name = 'changed' WHERE id = 500").await;
    sql(&env, "DELETE FROM items WHERE id = 500").await;
    sql(&env, "UPDATE items SET name = 'uno' WHERE id = 1").await;
    sql(&env, "ALTER TABLE items_archive NO INHERIT items").await;
    all_serve(&[&a, &b], "/v1/items/1", "row 1 changed meanwhile", |d| {
        d["name"] == "uno"
    })
    .await;
    for i in [&a, &b] {
        i.sees_absent("/v1/items/500", WINDOW).await;
    }
}
