//! The two version stamps (`postgres.stamp`): the PL/pgSQL one any Postgres runs, and the C
//! one of the `syncar_stamp` extension (`ext/syncar_stamp`). The migration picks and swaps
//! them, both keep the stamp's rules through the customer's schema changes, and the C one
//! refuses misuse with an error instead of taking the server down.
//!
//! Needs the extension installed into the Postgres the tests start (`make stamp-extension`,
//! which `make test` runs first). `scripts/test-postgres-versions.sh` runs these on
//! Postgres 16 too, with the extension built against PyPI's `pgserver` (the npm registry's
//! servers come without headers).

use std::time::Duration;

use syncar::config::Stamp;

use crate::support::{eventually, query_value, resource, Env, Instance};

/// Generous for a loaded CI machine.
const WINDOW: Duration = Duration::from_secs(10);

/// Fails, saying what to run, unless the test Postgres has the extension.
async fn require_extension(env: &Env) {
    let available: bool = query_value(
        &env.pg().await,
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'syncar_stamp')",
    )
    .await;
    assert!(
        available,
        "the test Postgres lacks extension syncar_stamp: run `make stamp-extension` (builds \
         ext/syncar_stamp; needs Debian's postgresql-server-dev-N, gcc and make)"
    );
}

/// The function `table`'s stamp trigger calls, and the arguments it passes.
async fn installed_stamp(env: &Env, table: &str) -> (String, String) {
    let row = env
        .pg()
        .await
        .query_one(
            "SELECT p.proname::text, encode(t.tgargs, 'escape') FROM pg_trigger t \
             JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = $1::text::regclass AND t.tgname = 'syncar_stamp_version'",
            &[&table],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The customer's statement, which must succeed; returns the rows it returned.
async fn sql(env: &Env, statement: &str) -> Vec<tokio_postgres::Row> {
    env.pg()
        .await
        .query(statement, &[])
        .await
        .unwrap_or_else(|e| panic!("the customer's statement failed: {statement}: {e:?}"))
}

/// The customer updates item 1: returns the version it was stamped with, after checking
/// that the stamp took a version from the sequence (`what` says which case).
async fn stamped_update(env: &Env, what: &str) -> i64 {
    let before = last_version(env).await;
    let stamped: i64 = sql(
        env,
        "UPDATE items SET name = 'x' WHERE id = 1 RETURNING version",
    )
    .await[0]
        .get(0);
    assert!(stamped > before, "{what}: stamped");
    stamped
}

/// The sequence's last value.
async fn last_version(env: &Env) -> i64 {
    query_value(&env.pg().await, "SELECT last_value FROM syncar_version_seq").await
}

/// `auto` creates the extension and puts the C stamp on every table; `plpgsql` swaps it for
/// the PL/pgSQL stamp and back with "replace" (the table is served meanwhile, and a check
/// of a schema holding the other stamp finds no problem); a second run changes nothing;
/// uninstall drops the extension with the triggers.
#[tokio::test]
async fn auto_uses_the_extension_and_swaps_stamps_without_a_gap() {
    let env = Env::new().await;
    require_extension(&env).await;
    let config = env.config();
    assert_eq!(config.postgres.stamp, Stamp::Auto, "the default");
    let changes = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        changes
            .iter()
            .any(|c| c == "created extension syncar_stamp in schema public"),
        "{changes:?}"
    );
    assert_eq!(
        installed_stamp(&env, "syncar_kv").await,
        (
            "syncar_stamp".into(),
            "version\\0003\\0000\\000public\\000syncar_version_seq\\000".into()
        ),
        "the C stamp, told the version column by name and attribute number, the table on \
         which that number may be used (none for syncar_kv, whose column is syncar's own) \
         and the sequence"
    );
    let inserted: i64 = sql(
        &env,
        "INSERT INTO syncar_kv (key, value) VALUES ('a', '1') RETURNING version",
    )
    .await[0]
        .get(0);
    let updated: i64 = sql(
        &env,
        "UPDATE syncar_kv SET value = '2' WHERE key = 'a' RETURNING version",
    )
    .await[0]
        .get(0);
    assert!(inserted > 0 && updated > inserted, "{inserted} {updated}");
    // ON CONFLICT fires the stamp before the insert and before the update it turns into.
    let upserted: i64 = sql(
        &env,
        "INSERT INTO syncar_kv (key, value) VALUES ('a', '3') \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value RETURNING version",
    )
    .await[0]
        .get(0);
    assert!(upserted > updated);
    // One statement, many rows: one resolution, a version per row.
    sql(
        &env,
        "INSERT INTO syncar_kv (key, value) VALUES ('b', '1'), ('c', '1')",
    )
    .await;
    let mut versions: Vec<i64> = sql(&env, "UPDATE syncar_kv SET value = '4' RETURNING version")
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(versions[0] > upserted, "{versions:?}");

    let check = syncar::app::run_check(&config).await.unwrap();
    assert!(
        check.notes.iter().any(|n| n
            == "version stamp (postgres.stamp = auto): the C stamp on 1 table(s), the PL/pgSQL \
                stamp on 0; extension syncar_stamp is installed in schema public"),
        "{:?}",
        check.notes
    );

    let mut plpgsql = env.config();
    plpgsql.postgres.stamp = Stamp::Plpgsql;
    let (plan, _) = syncar::app::run_plan(&plpgsql).await.unwrap();
    let swap = "replace trigger syncar_stamp_version on \"public\".\"syncar_kv\" with the \
                PL/pgSQL stamp";
    assert!(plan.changes.iter().any(|c| c == swap), "{:?}", plan.changes);
    plpgsql.postgres.migrate_on_start = false;
    let check = syncar::app::run_check(&plpgsql).await.unwrap();
    assert!(
        check.problems.is_empty(),
        "a table with the other stamp is served: {:?}",
        check.problems
    );
    syncar::app::run_migration(&plpgsql).await.unwrap();
    assert_eq!(
        installed_stamp(&env, "syncar_kv").await,
        ("syncar_stamp_kv".into(), String::new())
    );
    let changes = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        changes.iter().any(|c| c
            == "replaced trigger syncar_stamp_version on \"public\".\"syncar_kv\" with the C \
                stamp of extension syncar_stamp"),
        "{changes:?}"
    );
    assert!(
        syncar::app::run_migration(&config)
            .await
            .unwrap()
            .changes
            .is_empty(),
        "a second run changes nothing"
    );
    let removed = syncar::app::run_uninstall(&config, false).await.unwrap();
    assert!(
        removed
            .iter()
            .any(|c| c == "dropped extension syncar_stamp"),
        "{removed:?}"
    );
    let left: i64 = query_value(
        &env.pg().await,
        "SELECT count(*) FROM pg_extension WHERE extname = 'syncar_stamp'",
    )
    .await;
    assert_eq!(left, 0);
}

/// Starts an instance serving `items (id, name)` with `stamp`, and checks which function
/// its stamp trigger calls.
async fn items_instance(env: &Env, stamp: Stamp) -> Instance {
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE items (id integer PRIMARY KEY, name text);
             INSERT INTO items VALUES (1, 'one'), (2, 'two');",
        )
        .await
        .unwrap();
    let i = env
        .start(|c| {
            c.postgres.stamp = stamp;
            c.resources.push(resource("items", "id", "version"));
        })
        .await;
    let (function, _) = installed_stamp(env, "items").await;
    let want = match stamp {
        Stamp::Extension | Stamp::Auto => "syncar_stamp",
        Stamp::Plpgsql => "syncar_stamp_items",
    };
    assert_eq!(function, want, "{stamp:?}");
    i
}

/// Either stamp, with syncar's version column retyped to integer (stamped while the versions
/// fit, else left unstamped), renamed (still stamped: found by attribute number), retyped to
/// text, then dropped: every statement of the customer succeeds, and the resource goes
/// unavailable saying why while `kv` serves.
#[tokio::test]
async fn either_stamp_survives_its_column_retyped_renamed_or_dropped() {
    for stamp in [Stamp::Plpgsql, Stamp::Extension] {
        let env = Env::new().await;
        require_extension(&env).await;
        let a = items_instance(&env, stamp).await;
        stamped_update(&env, &format!("{stamp:?}")).await;

        // The same trigger on another table (as after a dump and restore, which gives the
        // table a new OID and renumbers its columns): no column named `version`, and its
        // third column, a bigint of the customer's, is not stamped.
        let (function, args) = installed_stamp(&env, "items").await;
        let args: Vec<String> = args
            .split("\\000")
            .filter(|a| !a.is_empty())
            .map(|a| format!("'{a}'"))
            .collect();
        env.pg()
            .await
            .batch_execute(&format!(
                "CREATE TABLE other (id integer, name text, amount bigint); \
                 CREATE TRIGGER x BEFORE INSERT ON other FOR EACH ROW \
                 EXECUTE FUNCTION {function}({})",
                args.join(", ")
            ))
            .await
            .unwrap();
        let amount: i64 = sql(
            &env,
            "INSERT INTO other VALUES (1, 'a', 5) RETURNING amount",
        )
        .await[0]
            .get(0);
        assert_eq!(
            amount, 5,
            "{stamp:?}: a column of another table is never stamped"
        );

        sql(&env, "ALTER TABLE items ALTER COLUMN version TYPE integer").await;
        let before = last_version(&env).await;
        let stamped: i32 = sql(
            &env,
            "UPDATE items SET name = 'z' WHERE id = 1 RETURNING version",
        )
        .await[0]
            .get(0);
        assert!(
            i64::from(stamped) > before,
            "{stamp:?}: a version that fits an integer is stamped"
        );
        sql(&env, "SELECT setval('syncar_version_seq', 3000000000)").await;
        let kept: i32 = sql(
            &env,
            "UPDATE items SET name = 'zz' WHERE id = 1 RETURNING version",
        )
        .await[0]
            .get(0);
        assert_eq!(
            kept, stamped,
            "{stamp:?}: a version past 2^31 is not stamped"
        );
        sql(&env, "ALTER TABLE items ALTER COLUMN version TYPE bigint").await;

        sql(&env, "ALTER TABLE items RENAME COLUMN version TO v").await;
        let before = last_version(&env).await;
        let stamped: i64 =
            sql(&env, "UPDATE items SET name = 'y' WHERE id = 1 RETURNING v").await[0].get(0);
        assert!(
            stamped > before,
            "{stamp:?}: the renamed column is still stamped"
        );
        let inserted: i64 =
            sql(&env, "INSERT INTO items VALUES (3, 'three') RETURNING v").await[0].get(0);
        assert!(inserted > stamped, "{stamp:?}: an insert is stamped too");

        sql(
            &env,
            "ALTER TABLE items ALTER COLUMN v TYPE text USING v::text",
        )
        .await;
        sql(&env, "UPDATE items SET name = 'w' WHERE id = 1").await;
        sql(&env, "INSERT INTO items VALUES (4, 'four')").await;

        sql(&env, "ALTER TABLE items DROP COLUMN v").await;
        sql(&env, "UPDATE items SET name = 'v' WHERE id = 1").await;
        sql(&env, "INSERT INTO items VALUES (5, 'five')").await;
        sql(&env, "DELETE FROM items WHERE id = 2").await;

        eventually(WINDOW, "items unavailable, saying why", || async {
            let ready = a.readyz().await;
            let r = &ready["resources"]["items"];
            (r["ok"] == false && r["error"].as_str().unwrap_or_default().contains("version"))
                .then_some(())
        })
        .await;
        let v = a.put("/v1/kv/still", "1").await.etag_version();
        a.sees("/v1/kv/still", v, WINDOW).await;
        a.shutdown().await;
    }
}

/// Points the C stamp's function at `library` (`pg_proc.probin`): a name no file has makes
/// Postgres fail to load it exactly as on a server without the extension's files (a
/// promoted standby without the package): SQLSTATE 58P01 at every call.
async fn point_library_at(env: &Env, library: &str) {
    env.pg()
        .await
        .execute(
            "UPDATE pg_proc SET probin = $1 WHERE proname = 'syncar_stamp'",
            &[&library],
        )
        .await
        .unwrap();
}

/// A server on which the C stamp's library does not load fails every write to the tables
/// it stamps, the customer's own included. syncar puts the PL/pgSQL stamp back: at once when
/// a write through it meets the failure (that write then succeeds), and at a migration
/// (`auto`) while the library stays missing; `extension` refuses, saying why; once the
/// library loads again, `auto` takes the C stamp back.
#[tokio::test]
async fn a_server_without_the_c_stamps_library_gets_the_plpgsql_stamp_back() {
    let env = Env::new().await;
    require_extension(&env).await;
    let a = items_instance(&env, Stamp::Auto).await;
    let library: String = query_value(
        &env.pg().await,
        "SELECT probin FROM pg_proc WHERE proname = 'syncar_stamp'",
    )
    .await;
    point_library_at(&env, "$libdir/syncar_stamp_not_here").await;
    let failed = env
        .pg()
        .await
        .batch_execute("UPDATE items SET name = 'x' WHERE id = 1")
        .await
        .expect_err("a stamp whose library does not load fails the customer's statement");
    assert_eq!(failed.code().map(|c| c.code()), Some("58P01"), "{failed:?}");

    // A write through syncar meets it: the instance swaps the stamp and runs the write again.
    let put = a.put("/v1/items/1", r#"{"name": "one again"}"#).await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        installed_stamp(&env, "items").await.0,
        "syncar_stamp_items",
        "the PL/pgSQL stamp is back"
    );
    assert_eq!(
        installed_stamp(&env, "syncar_kv").await.0,
        "syncar_stamp_kv",
        "on every table syncar stamps"
    );
    let stamped = stamped_update(&env, "the customer's writes, the PL/pgSQL stamp back").await;
    a.sees("/v1/items/1", stamped, WINDOW).await;

    let config = a.state().config.as_ref().clone();
    let mut extension = config.clone();
    extension.postgres.stamp = Stamp::Extension;
    let refused = syncar::app::run_migration(&extension)
        .await
        .expect_err("postgres.stamp = \"extension\" without a library that loads");
    assert!(
        format!("{refused:?}").contains("does not load on this server"),
        "{refused:?}"
    );
    let check = syncar::app::run_check(&config).await.unwrap();
    assert!(
        check
            .notes
            .iter()
            .any(|n| n.contains("the C stamp on 0 table(s)") && n.contains("does not load")),
        "{:?}",
        check.notes
    );
    assert!(
        syncar::app::run_migration(&config)
            .await
            .unwrap()
            .changes
            .is_empty(),
        "auto keeps the PL/pgSQL stamp while the library does not load"
    );

    point_library_at(&env, &library).await;
    let changes = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        changes
            .iter()
            .any(|c| c.contains("on \"public\".\"items\" with the C stamp")),
        "{changes:?}"
    );
    a.shutdown().await;
}

/// The C function refuses, with an error and without harm to the server, every way it can
/// be called wrongly: outside a trigger, as an AFTER, a statement or a DELETE trigger, with
/// the wrong arguments; and, told of a sequence or a column that is not there or holds no
/// number, or told of a renamed column on a table that is not its own (restored: a new
/// OID), leaves rows unstamped; and it follows its sequence dropped, created again or
/// renamed.
#[tokio::test]
async fn the_c_stamp_refuses_misuse_with_an_error() {
    let env = Env::new().await;
    require_extension(&env).await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE EXTENSION syncar_stamp;
         CREATE SEQUENCE s;
         CREATE TABLE t (k text PRIMARY KEY, version bigint NOT NULL DEFAULT 0);",
    )
    .await
    .unwrap();
    let refused = |sql: &'static str, message: &'static str| {
        let pg = &pg;
        async move {
            let err = pg
                .batch_execute(sql)
                .await
                .expect_err(sql)
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            assert!(err.contains(message), "{sql}: {err}");
            // The server is still up, and this session with it.
            let one: i32 = query_value(pg, "SELECT 1").await;
            assert_eq!(one, 1);
        }
    };
    refused(
        "SELECT syncar_stamp()",
        "must be fired BEFORE INSERT OR UPDATE",
    )
    .await;
    for (trigger, message) in [
        (
            "CREATE TRIGGER x AFTER UPDATE ON t FOR EACH ROW \
             EXECUTE FUNCTION syncar_stamp('version', '2', '0', 'public', 's')",
            "must be fired BEFORE INSERT OR UPDATE",
        ),
        (
            "CREATE TRIGGER x BEFORE UPDATE ON t FOR EACH STATEMENT \
             EXECUTE FUNCTION syncar_stamp('version', '2', '0', 'public', 's')",
            "must be fired BEFORE INSERT OR UPDATE",
        ),
        (
            "CREATE TRIGGER x BEFORE DELETE ON t FOR EACH ROW \
             EXECUTE FUNCTION syncar_stamp('version', '2', '0', 'public', 's')",
            "must be fired BEFORE INSERT OR UPDATE",
        ),
        (
            "CREATE TRIGGER x BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION syncar_stamp()",
            "takes 5 arguments",
        ),
    ] {
        pg.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS x ON t; TRUNCATE t; INSERT INTO t VALUES ('a'); {trigger}"
        ))
        .await
        .unwrap();
        refused("UPDATE t SET k = 'a'; DELETE FROM t", message).await;
    }
    let t: u32 = query_value(&pg, "SELECT 't'::regclass::oid").await;
    for (args, what) in [
        (
            "'version', '2', '{t}', 'public', 'no_such_sequence'",
            "a missing sequence",
        ),
        (
            "'version', '2', '{t}', 'no_such_schema', 's'",
            "a missing schema",
        ),
        (
            "'version', '2', '{t}', 'public', 't'",
            "a table where the sequence should be",
        ),
        ("'nothing', '99', '{t}', 'public', 's'", "a missing column"),
        (
            "'nothing', 'not a number', '{t}', 'public', 's'",
            "a bad attribute number",
        ),
        (
            "'nothing', '1', '{t}', 'public', 's'",
            "a renamed column (the key) that is no bigint",
        ),
        (
            "'nothing', '2', '0', 'public', 's'",
            "a renamed bigint of another table (restored: its OID changed)",
        ),
        (
            "'k', '2', '{t}', 'public', 's'",
            "a column named so (the key) of a type holding no number",
        ),
    ] {
        let version = stamped_insert(&pg, &args.replace("{t}", &t.to_string())).await;
        assert_eq!(version, 0, "{what}: the row is left unstamped");
    }
    // The same renamed bigint on the table the trigger was made for: stamped.
    let version = stamped_insert(&pg, &format!("'nothing', '2', '{t}', 'public', 's'")).await;
    assert!(version > 0, "found by its attribute number");
    // The sequence's OID is kept for the session's life, and forgotten when it changes:
    // dropped and created again by another session, then renamed away by this one.
    let first = stamped_insert(&pg, &format!("'version', '2', '{t}', 'public', 's'")).await;
    assert!(first > 0 && first < 1000, "{first}");
    env.pg()
        .await
        .batch_execute("DROP SEQUENCE s; CREATE SEQUENCE s START 1000")
        .await
        .unwrap();
    let second: i64 = query_value(&pg, "UPDATE t SET k = 'a' RETURNING version").await;
    assert_eq!(second, 1000, "the sequence created again is used");
    pg.batch_execute("ALTER SEQUENCE s RENAME TO s_old")
        .await
        .unwrap();
    let third: i64 = query_value(&pg, "UPDATE t SET k = 'a' RETURNING version").await;
    assert_eq!(third, 1000, "a sequence renamed away stamps nothing");
}

/// Puts `syncar_stamp({args})` on table `t` (emptied) as its only stamp trigger, inserts a
/// row, and returns its version (0: unstamped).
async fn stamped_insert(pg: &tokio_postgres::Client, args: &str) -> i64 {
    pg.batch_execute(&format!(
        "DROP TRIGGER IF EXISTS x ON t; TRUNCATE t; \
         CREATE TRIGGER x BEFORE INSERT OR UPDATE ON t FOR EACH ROW \
         EXECUTE FUNCTION syncar_stamp({args})"
    ))
    .await
    .unwrap();
    query_value(pg, "INSERT INTO t VALUES ('a') RETURNING version").await
}

/// Installed by a superuser with the PL/pgSQL stamp, then migrated by a role that owns the
/// tables but may not create extensions (no CREATE on the database): `extension` fails,
/// saying what to run; `auto` keeps the PL/pgSQL stamp and changes nothing.
#[tokio::test]
async fn without_create_on_the_database_auto_keeps_plpgsql_and_extension_says_why() {
    let env = Env::new().await;
    require_extension(&env).await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let role = format!("{db}_owner");
    pg.batch_execute("CREATE TABLE items (id integer PRIMARY KEY, name text)")
        .await
        .unwrap();
    let mut config = env.config();
    config.resources.push(resource("items", "id", "version"));
    config.postgres.stamp = Stamp::Plpgsql;
    syncar::app::run_migration(&config).await.unwrap();
    pg.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}; \
         ALTER TABLE items OWNER TO {role}; ALTER TABLE syncar_kv OWNER TO {role}; \
         ALTER TABLE syncar_changes OWNER TO {role}; ALTER TABLE syncar_state OWNER TO {role}; \
         ALTER SEQUENCE syncar_version_seq OWNER TO {role}"
    ))
    .await
    .unwrap();
    config.postgres.url = env.pg_url.replace("postgres@", &format!("{role}@"));

    config.postgres.stamp = Stamp::Extension;
    let err =
        syncar::telemetry::error_chain(&syncar::app::run_migration(&config).await.unwrap_err());
    assert!(
        err.contains("may not create extension syncar_stamp")
            && err.contains("CREATE EXTENSION syncar_stamp SCHEMA \"public\""),
        "{err}"
    );

    config.postgres.stamp = Stamp::Auto;
    let changes = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(installed_stamp(&env, "items").await.0, "syncar_stamp_items");
    let version: i64 = sql(
        &env,
        "INSERT INTO items VALUES (1, 'one') RETURNING version",
    )
    .await[0]
        .get(0);
    assert!(version > 0, "stamped by the PL/pgSQL stamp");
}
