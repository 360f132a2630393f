//! DDL for the DBA: `syncar migrate --print-sql` changes nothing and prints what `migrate`
//! would run; applied by psql (as a migration tool would), it is the install `migrate`
//! makes; `serve` with `postgres.migrate_on_start = false` and `check-config --db` name what
//! differs, table by table.

use std::process::Command;

use syncar::config::PostgresSource;

use crate::support::{query_value, resource, Env};

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
