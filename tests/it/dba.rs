//! DDL for the DBA: `syncar migrate --print-sql` changes nothing and prints what `migrate`
//! would run; applied by psql (as a migration tool would), it is the install `migrate`
//! makes; `serve` with `postgres.migrate_on_start = false` and `check-config --db` name what
//! differs, table by table.

use std::process::Command;
use std::time::Duration;

use syncar::config::PostgresSource;

use crate::support::{eventually, query_value, resource, Env};

fn psql(url: &str, sql: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syncar.sql");
    std::fs::write(&file, sql).unwrap();
    Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("psql not found ({e}): apt-get install postgresql-client"))
}

#[tokio::test]
async fn the_printed_sql_applied_by_a_dba_is_the_install() {
    for source in [PostgresSource::Wal, PostgresSource::ChangesLog] {
        let env = Env::new().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
             INSERT INTO orders VALUES (1, 10)",
        )
        .await
        .unwrap();
        let mut config = env.config();
        config.feeds.postgres_source = source;
        config.resources.push(resource("orders", "id", "version"));

        let (planned, script) = syncar::app::run_plan(&config).await.unwrap();
        for wanted in [
            r#"add column version to table "public"."orders""#,
            r#"install trigger syncar_stamp_version on "public"."orders""#,
            "create sequence public.syncar_version_seq",
        ] {
            assert!(
                planned.changes.iter().any(|c| c == wanted),
                "{wanted:?} not in {:?}",
                planned.changes
            );
        }
        let sql = script.to_sql();
        if source == PostgresSource::Wal {
            assert!(sql.contains("CREATE PUBLICATION"), "{sql}");
            assert!(sql.contains("pg_create_logical_replication_slot"), "{sql}");
        }
        let untouched: (bool, i64) = (
            query_value(&pg, "SELECT to_regclass('syncar_version_seq') IS NULL").await,
            query_value(
                &pg,
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'orders'::regclass \
                 AND attname = 'version'",
            )
            .await,
        );
        assert_eq!(untouched, (true, 0), "a plan changes nothing");

        // The DBA applies it with their own tool.
        let out = psql(&env.pg_url, &sql);
        assert!(
            out.status.success(),
            "the printed SQL fails as applied by psql: {}\n{sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (after, again) = syncar::app::run_plan(&config).await.unwrap();
        assert!(
            again.is_empty() && after.changes.is_empty(),
            "after the printed SQL nothing is left to do: {:?}\n{}",
            after.changes,
            again.to_sql()
        );
        let migrated = syncar::app::run_migration(&config).await.unwrap().changes;
        assert!(migrated.is_empty(), "migrate agrees: {migrated:?}");

        // Served without migrating: the row that predates the install reads as version 0,
        // a write stamps it.
        let a = env
            .start(|c| {
                c.feeds.postgres_source = source;
                c.resources.push(resource("orders", "id", "version"));
                c.postgres.migrate_on_start = false;
            })
            .await;
        let r = a.get("/v1/orders/1").await;
        assert_eq!((r.status, r.etag_version()), (200, 0), "{:?}", r.body);
        let r = a.put("/v1/orders/1", r#"{"total": 11}"#).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(r.etag_version() > 0);
        a.shutdown().await;
    }
}

/// A table added to the configuration after the schema was migrated: `check-config --db`
/// names it a problem with each missing piece (it used to call it fine because the sequence
/// existed), `serve` without migrating leaves it out and serves the rest, and the plan names
/// each difference.
#[tokio::test]
async fn a_table_not_migrated_is_named_with_what_it_lacks() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE done (id int PRIMARY KEY, n int); CREATE TABLE later (id int PRIMARY KEY, n int)",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.resources.push(resource("done", "id", "version"));
    syncar::app::run_migration(&config).await.unwrap();
    config.resources.push(resource("later", "id", "version"));

    let check = syncar::app::run_check(&config).await.unwrap();
    let problem = check
        .problems
        .iter()
        .find(|p| p.contains("\"later\""))
        .unwrap_or_else(|| panic!("later is not named: {check:?}"));
    for piece in [
        r#"add column version to table "public"."later""#,
        r#"install trigger syncar_stamp_version on "public"."later""#,
        "syncar migrate --print-sql",
    ] {
        assert!(problem.contains(piece), "{piece:?} not in {problem}");
    }
    assert!(
        !check.problems.iter().any(|p| p.contains("\"done\"")),
        "{check:?}"
    );

    let a = env
        .start(|c| {
            c.resources.push(resource("done", "id", "version"));
            c.resources.push(resource("later", "id", "version"));
            c.postgres.migrate_on_start = false;
        })
        .await;
    assert_eq!(a.put("/v1/done/1", r#"{"n": 1}"#).await.status, 201);
    let r = a.get("/v1/later/1").await;
    assert_eq!((r.status, r.code()), (503, "resource_unavailable".into()));
    a.shutdown().await;
    let (planned, _) = syncar::app::run_plan(&config).await.unwrap();
    assert!(
        planned
            .changes
            .iter()
            .any(|c| c == r#"add column version to table "public"."later""#),
        "{:?}",
        planned.changes
    );
    let untouched: i64 = query_value(
        &pg,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'later'::regclass AND attname = 'version'",
    )
    .await;
    assert_eq!(untouched, 0, "serve without migrating changed nothing");
}

/// The grants README "Least privileges" lists, for a runtime role `{role}` and another
/// application's writer `{writer}` (which had its grants on `orders` before syncar came),
/// on the default schema `public`.
const GRANTS: &str = "\
    GRANT USAGE ON SCHEMA public TO {role}, {writer}; \
    GRANT SELECT, INSERT, UPDATE, DELETE ON orders, syncar_kv TO {role}; \
    GRANT SELECT, INSERT, UPDATE ON syncar_state TO {role}; \
    GRANT SELECT, INSERT, DELETE ON syncar_changes TO {role}; \
    GRANT USAGE, SELECT, UPDATE ON SEQUENCE syncar_version_seq TO {role}; \
    GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {writer}";

/// The DBA installs with the printed SQL; syncar runs as a role with only the grants README
/// "Least privileges" lists (and REPLICATION for `wal`): it serves, writes, and hears another
/// application's writer, whose role keeps only the grants it had on its table: its inserts,
/// updates and deletes succeed, stamped and heard. The functions that write the changes log
/// for it cannot be put on a table of its own (to forge changes).
#[tokio::test]
async fn a_least_privileged_role_serves_what_the_dba_installed() {
    for source in [PostgresSource::Wal, PostgresSource::ChangesLog] {
        let env = Env::new().await;
        let pg = env.pg().await;
        let db: String = query_value(&pg, "SELECT current_database()::text").await;
        let (role, writer) = (format!("{db}_syncar"), format!("{db}_writer"));
        let replication = if source == PostgresSource::Wal {
            "REPLICATION"
        } else {
            ""
        };
        pg.batch_execute(&format!(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
             CREATE ROLE {role} LOGIN {replication}; CREATE ROLE {writer} LOGIN"
        ))
        .await
        .unwrap();
        let mut config = env.config();
        config.feeds.postgres_source = source;
        config.resources.push(resource("orders", "id", "version"));
        let (_, script) = syncar::app::run_plan(&config).await.unwrap();
        let out = psql(&env.pg_url, &script.to_sql());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.batch_execute(&GRANTS.replace("{role}", &role).replace("{writer}", &writer))
            .await
            .unwrap();

        let url = env.pg_url.replace("postgres@", &format!("{role}@"));
        let a = env
            .start(|c| {
                c.postgres.url = url.clone();
                c.feeds.postgres_source = source;
                c.resources.push(resource("orders", "id", "version"));
                c.postgres.migrate_on_start = false;
            })
            .await;
        let v = a.put("/v1/orders/1", r#"{"total": 1}"#).await;
        assert_eq!(v.status, 201, "{:?}", v.body);
        a.sees("/v1/orders/1", v.etag_version(), Duration::from_secs(5))
            .await;
        assert_eq!(a.put("/v1/kv/k", "1").await.status, 201);
        assert_eq!(a.delete("/v1/kv/k").await.status, 204);

        let writer_url = env.pg_url.replace("postgres@", &format!("{writer}@"));
        let (as_writer, conn) = tokio_postgres::connect(&writer_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        as_writer
            .execute("UPDATE orders SET total = 2 WHERE id = 1", &[])
            .await
            .unwrap();
        let v2: i64 = query_value(&pg, "SELECT version FROM orders WHERE id = 1").await;
        a.sees("/v1/orders/1", v2, Duration::from_secs(10)).await;
        let v3: i64 = query_value(
            &as_writer,
            "INSERT INTO orders (id, total) VALUES (2, 5) RETURNING version",
        )
        .await;
        assert!(v3 > v2, "{source:?}: the writer's insert is stamped");
        a.sees("/v1/orders/2", v3, Duration::from_secs(10)).await;
        as_writer
            .execute("DELETE FROM orders WHERE id = 2", &[])
            .await
            .unwrap();
        a.sees_absent("/v1/orders/2", Duration::from_secs(10)).await;
        pg.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {writer}"))
            .await
            .unwrap();
        as_writer
            .batch_execute("CREATE TABLE mine (id int PRIMARY KEY, version bigint)")
            .await
            .unwrap();
        let announce: String = query_value(
            &pg,
            "SELECT p.proname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'orders'::regclass AND t.tgname = 'syncar_log_delete'",
        )
        .await;
        let forged = as_writer
            .batch_execute(&format!(
                "CREATE TRIGGER forge AFTER DELETE ON mine REFERENCING OLD TABLE AS syncar_old \
                 FOR EACH STATEMENT EXECUTE FUNCTION {announce}()"
            ))
            .await;
        if source == PostgresSource::ChangesLog {
            let e = forged.expect_err("the log's writer runs as its owner: not for anyone's table");
            assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e:?}");
        }
        a.shutdown().await;
    }
}

/// `migrate` as a role that does not own the table: refused, saying what installing needs
/// and the way round it (the printed SQL, applied by the DBA).
#[tokio::test]
async fn a_migration_without_the_privilege_says_what_to_do() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let role = format!("{db}_app");
    pg.batch_execute(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); CREATE ROLE {role} LOGIN; \
         GRANT ALL ON DATABASE {db} TO {role}; GRANT ALL ON SCHEMA public TO {role}"
    ))
    .await
    .unwrap();
    let mut config = env.config();
    config.postgres.url = env.pg_url.replace("postgres@", &format!("{role}@"));
    config.resources.push(resource("orders", "id", "version"));
    let err =
        syncar::telemetry::error_chain(&syncar::app::run_migration(&config).await.unwrap_err());
    assert!(
        err.contains("owner") && err.contains("--print-sql"),
        "{err}"
    );
}

/// Functions planted on the writer's `search_path` under the names the triggers call (a
/// `public.nextval(text)`, which an unqualified `nextval('...')` prefers to the catalog's,
/// and a `public.json_build_object` of exact argument types: the class of CVE-2018-1058)
/// are never called by them, with either stamp's source: every name in the generated
/// bodies is schema-qualified. Each planted function fails if called.
#[tokio::test]
async fn the_triggers_call_nothing_planted_on_the_writers_search_path() {
    for source in [PostgresSource::Wal, PostgresSource::ChangesLog] {
        let env = Env::new().await;
        let pg = env.pg().await;
        pg.batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
             CREATE TABLE codes (id int PRIMARY KEY, code varchar(20) NOT NULL UNIQUE)",
        )
        .await
        .unwrap();
        let mut config = env.config();
        config.feeds.postgres_source = source;
        config.postgres.stamp = syncar::config::Stamp::Plpgsql;
        config.resources.push(resource("orders", "id", "version"));
        // Keyed by a column outside the replica identity: an UPDATE that moves a key is
        // announced by comparing old and new keys, `varchar` with `varchar`.
        config.resources.push(resource("codes", "code", "version"));
        syncar::app::run_migration(&config).await.unwrap();
        pg.batch_execute(
            "CREATE FUNCTION public.planted_eq(varchar, varchar) RETURNS bool LANGUAGE sql \
               AS 'SELECT (1/0) = 1'; \
             CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, \
               FUNCTION = public.planted_eq); \
             CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE sql \
               AS 'SELECT (1/0)::bigint'; \
             CREATE FUNCTION public.json_build_object(text, text, text, json) RETURNS json \
               LANGUAGE sql AS 'SELECT (1/0)::text::json'; \
             CREATE FUNCTION public.json_build_object(text, text, text, bigint) RETURNS json \
               LANGUAGE sql AS 'SELECT (1/0)::text::json'",
        )
        .await
        .unwrap();
        for sql in [
            "INSERT INTO orders VALUES (1, 1), (2, 2)",
            "UPDATE orders SET total = 3 WHERE id = 1",
            "UPDATE orders SET id = 3 WHERE id = 2",
            "DELETE FROM orders WHERE id = 1",
            "TRUNCATE orders",
            "INSERT INTO codes VALUES (1, 'a'), (2, 'b')",
            "UPDATE codes SET code = 'c' WHERE id = 1",
            "DELETE FROM codes WHERE id = 2",
        ] {
            pg.batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{source:?}: {sql}: {e:?}"));
        }
    }
}

/// syncar's own statements on documents (reads, batch reads, writes with and without
/// `If-Match`, deletes and the `currval()` that reads a delete's version) run with the
/// session's `search_path`, which the app's triggers may rely on; what is planted on it
/// (in `public`, which PUBLIC may write to before Postgres 15) is never called by them. Each
/// planted object is a better match than the catalog's for syncar's arguments: an
/// `=(varchar, text)` beside the catalog's `text = text` for a `varchar` key, a
/// `to_jsonb(items)` and a `jsonb_populate_record(items, jsonb)` of the table's own row type
/// beside the catalog's polymorphic ones, a `currval(text)` for a string literal; and for
/// what an instance reads of the catalog when it starts (its migration, the table's key and
/// identity, its shape's fingerprint), an `array_agg(text)`, a `concat_ws` of the exact
/// argument types the fingerprint passes, a `pg_advisory_xact_lock(text)` for an untyped
/// parameter, and privilege checks taking a string literal where the catalog's take a
/// `name`. Each fails if called, so the start or a request below would fail without the
/// qualification.
#[tokio::test]
async fn syncar_s_statements_call_nothing_planted_on_its_search_path() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE items (id varchar(40) PRIMARY KEY, n int); \
         INSERT INTO items VALUES ('old', 1), ('other', 2)",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.resources.push(resource("items", "id", "version"));
    syncar::app::run_migration(&config).await.unwrap();
    pg.batch_execute(
        "CREATE FUNCTION public.planted_eq(varchar, text) RETURNS bool LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted = called'; END$$; \
         CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = text, FUNCTION = public.planted_eq); \
         CREATE FUNCTION public.to_jsonb(items) RETURNS jsonb LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted to_jsonb called'; END$$; \
         CREATE FUNCTION public.jsonb_populate_record(items, jsonb) RETURNS items LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted jsonb_populate_record called'; END$$; \
         CREATE FUNCTION public.currval(text) RETURNS bigint LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted currval called'; END$$; \
         CREATE FUNCTION public.planted_agg(text[], text) RETURNS text[] LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted array_agg called'; END$$; \
         CREATE AGGREGATE public.array_agg(text) (SFUNC = public.planted_agg, STYPE = text[]); \
         CREATE FUNCTION public.concat_ws(text, smallint, name, text, text, text) RETURNS text \
           LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'planted concat_ws called'; END$$; \
         CREATE FUNCTION public.pg_advisory_xact_lock(text) RETURNS void LANGUAGE plpgsql \
           AS $$BEGIN RAISE EXCEPTION 'planted pg_advisory_xact_lock called'; END$$; \
         CREATE FUNCTION public.has_sequence_privilege(text, oid, text) RETURNS bool \
           LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'planted has_sequence_privilege'; END$$; \
         CREATE FUNCTION public.has_function_privilege(text, oid, text) RETURNS bool \
           LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'planted has_function_privilege'; END$$; \
         CREATE FUNCTION public.has_database_privilege(name, text) RETURNS bool \
           LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'planted has_database_privilege'; END$$",
    )
    .await
    .unwrap();
    // The planted operator is what an unqualified comparison of this key would take.
    let hijacked = pg
        .query_one("SELECT n FROM items WHERE id = 'old'::text", &[])
        .await
        .expect_err("an unqualified comparison takes the planted operator");
    assert!(format!("{hijacked:?}").contains("planted"), "{hijacked:?}");

    let a = env
        .start(|c| c.resources.push(resource("items", "id", "version")))
        .await;
    // A read from Postgres: select by key, the document built by to_jsonb.
    let old = a.get("/v1/items/old").await;
    assert_eq!(old.status, 200, "{old:?}");
    assert_eq!(old.json()["n"], 1);
    // A batch read from Postgres: = ANY.
    let batch = crate::support::request(
        a.addr(),
        "POST",
        "/v1/items",
        &[],
        Some(br#"{"keys": ["other", "nope"]}"#),
    )
    .await;
    assert_eq!(batch.status, 200, "{batch:?}");
    assert_eq!(batch.json()["results"][0]["document"]["n"], 2, "{batch:?}");
    // Writes: the upsert (jsonb_populate_record), If-Match (= on the key and the version).
    let put = a.put("/v1/items/new", r#"{"n": 3}"#).await;
    assert_eq!(put.status, 201, "{put:?}");
    let tag = format!("\"{}\"", put.etag_version());
    let updated = crate::support::request(
        a.addr(),
        "PUT",
        "/v1/items/new",
        &[("if-match", &tag)],
        Some(br#"{"n": 4}"#),
    )
    .await;
    assert_eq!(updated.status, 200, "{updated:?}");
    // Deletes, with their currval(), plain and with If-Match; and one on kv.
    let deleted = a.delete("/v1/items/old").await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let tag = format!("\"{}\"", updated.etag_version());
    let deleted = crate::support::request(
        a.addr(),
        "DELETE",
        "/v1/items/new",
        &[("if-match", &tag)],
        None,
    )
    .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert_eq!(a.put("/v1/kv/k", "1").await.status, 201);
    assert_eq!(a.delete("/v1/kv/k").await.status, 204);
    // A transaction's put and delete (its own currval()).
    assert_eq!(a.put("/v1/kv/t", "1").await.status, 201);
    let tx = crate::support::request(
        a.addr(),
        "POST",
        "/v1",
        &[],
        Some(
            br#"{"operations": [{"op": "put", "resource": "items", "key": "tx", "document": {"n": 5}},
                {"op": "delete", "resource": "kv", "key": "t"}]}"#,
        ),
    )
    .await;
    assert_eq!(tx.status, 200, "{tx:?}");
    assert_eq!(tx.json()["results"][1]["status"], 204, "{tx:?}");
    let left: i64 = query_value(&pg, "SELECT count(*) FROM items").await;
    assert_eq!(left, 2, "only 'other' and 'tx' are left");
}

/// A publication `FOR ALL TABLES` created after the DBA installed: the migration run by a
/// role that does not own the changes log cannot give it the replica identity its pruning
/// then needs, so it says what the owner should run, and fails for nothing.
#[tokio::test]
async fn a_migration_by_a_role_that_does_not_own_the_log_warns_instead_of_failing() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let (role, writer) = (format!("{db}_syncar"), format!("{db}_writer"));
    pg.batch_execute(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
         CREATE ROLE {role} LOGIN; CREATE ROLE {writer} LOGIN"
    ))
    .await
    .unwrap();
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::ChangesLog;
    config.resources.push(resource("orders", "id", "version"));
    syncar::app::run_migration(&config).await.unwrap();
    pg.batch_execute(&format!(
        "{}; CREATE PUBLICATION everything FOR ALL TABLES",
        GRANTS.replace("{role}", &role).replace("{writer}", &writer)
    ))
    .await
    .unwrap();
    config.postgres.url = env.pg_url.replace("postgres@", &format!("{role}@"));
    let migrated = syncar::app::run_migration(&config).await.unwrap();
    assert!(migrated.changes.is_empty(), "{:?}", migrated.changes);
    assert!(
        migrated
            .warnings
            .iter()
            .any(|w| w.contains("does not own it") && w.contains("REPLICA IDENTITY FULL")),
        "{:?}",
        migrated.warnings
    );
}

/// `syncar uninstall` by a role that may not drop syncar's publication (another role owns
/// it) refuses before it removes anything: the slot, the triggers and the publication stay.
#[tokio::test]
async fn an_uninstall_that_may_not_drop_the_publication_removes_nothing() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let role = format!("{db}_small");
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::Wal;
    syncar::app::run_migration(&config).await.unwrap();
    pg.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT ON syncar_state TO {role}"
    ))
    .await
    .unwrap();
    let counts = || async {
        let pg = env.pg().await;
        let row = pg
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()), \
                        (SELECT count(*) FROM pg_publication), \
                        (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'syncar%')",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    };
    let before = counts().await;
    assert!(before.0 == 1 && before.1 == 1 && before.2 > 0, "{before:?}");
    let mut small = config.clone();
    small.postgres.url = env.pg_url.replace("postgres@", &format!("{role}@"));
    let refused = syncar::app::run_uninstall(&small, false)
        .await
        .expect_err("another role owns the publication");
    assert!(
        format!("{refused:#}").contains("owned by a role"),
        "{refused:#}"
    );
    assert_eq!(counts().await, before, "nothing removed");
}

/// Row-level security that filters what an instance's role reads of a served table: that
/// instance would cache its filtered view (404s for the rows it may not see) in the Redis
/// every instance reads. The resource is unavailable on that instance, saying why, while an
/// instance whose role sees every row serves on; served again once the table's row security
/// is off.
#[tokio::test]
async fn row_level_security_makes_a_resource_unavailable_where_it_filters() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let (role, writer) = (format!("{db}_rls"), format!("{db}_rls_writer"));
    pg.batch_execute(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
         INSERT INTO orders VALUES (1, 1), (2, 2); \
         CREATE ROLE {role} LOGIN; CREATE ROLE {writer} LOGIN"
    ))
    .await
    .unwrap();
    let source = PostgresSource::ChangesLog;
    let a = env
        .start(|c| {
            c.feeds.postgres_source = source;
            c.resources.push(resource("orders", "id", "version"));
        })
        .await;
    pg.batch_execute(&GRANTS.replace("{role}", &role).replace("{writer}", &writer))
        .await
        .unwrap();
    let url = env.pg_url.replace("postgres@", &format!("{role}@"));
    let c = env
        .start(|cfg| {
            cfg.postgres.url = url.clone();
            cfg.feeds.postgres_source = source;
            cfg.resources.push(resource("orders", "id", "version"));
            cfg.postgres.migrate_on_start = false;
        })
        .await;
    assert_eq!(c.get("/v1/orders/2").await.status, 200);
    pg.batch_execute(
        "ALTER TABLE orders ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY only_one ON orders USING (id = 1)",
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "orders unavailable on c",
        || async {
            let ready = c.readyz().await;
            let r = &ready["resources"]["orders"];
            let reason = r["error"].as_str().unwrap_or_default();
            (r["ok"] == false && reason.contains("row-level security")).then_some(())
        },
    )
    .await;
    assert_eq!(c.get("/v1/orders/2").await.status, 503);
    assert_eq!(
        a.get("/v1/orders/2").await.status,
        200,
        "a's role sees every row"
    );
    pg.batch_execute("ALTER TABLE orders DISABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "orders served on c again",
        || async { (c.get("/v1/orders/2").await.status == 200).then_some(()) },
    )
    .await;
}
