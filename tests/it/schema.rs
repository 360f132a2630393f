//! The migration and the triggers it installs, observed from plain SQL.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use syncar::config::PostgresSource;
use syncar::schema::NOTIFY_CHANNEL;

use crate::support::{query_value, Env};

#[tokio::test]
async fn the_migration_is_idempotent() {
    let env = Env::new().await;
    let config = env.config();
    let first = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        first.iter().any(|c| c.contains("syncar_version_seq")),
        "{first:?}"
    );
    assert!(first.iter().any(|c| c.contains("syncar_kv")), "{first:?}");
    let second = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        second.is_empty(),
        "a second run changes nothing: {second:?}"
    );
}

/// The test config with the `notify` source, whose triggers NOTIFY every change.
fn notify_config(env: &Env) -> syncar::config::Config {
    let mut config = env.config();
    config.feeds.postgres_source = syncar::config::PostgresSource::Notify;
    config
}

/// Listens on the notify channel on a connection of its own, and collects payloads.
async fn listen(
    env: &Env,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<Value>,
) {
    let (client, mut conn) = tokio_postgres::connect(&env.pg_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(serde_json::from_str(n.payload()).unwrap());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .unwrap();
    (client, rx)
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification")
        .unwrap()
}

#[tokio::test]
async fn every_write_by_anyone_is_stamped_and_announced() {
    let env = Env::new().await;
    syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap();
    let (_listener, mut rx) = listen(&env).await;
    let pg = env.pg().await;

    let v1: i64 = query_value(
        &pg,
        "INSERT INTO syncar_kv (key, value) VALUES ('a', '1') RETURNING version",
    )
    .await;
    let n = next(&mut rx).await;
    assert_eq!(n["resource"], "kv");
    assert_eq!(n["key"], "a");
    assert_eq!(n["version"], v1);
    assert_eq!(n["op"], "put");
    assert!(n["ts_us"].as_i64().unwrap() > 1_600_000_000_000_000, "{n}");

    // A writer that sets the version itself is overruled.
    let v2: i64 = query_value(
        &pg,
        "UPDATE syncar_kv SET value = '2', version = 1 WHERE key = 'a' RETURNING version",
    )
    .await;
    assert!(v2 > v1);
    assert_eq!(next(&mut rx).await["version"], v2);

    // Moving a row to another key announces the old key as deleted.
    pg.execute("UPDATE syncar_kv SET key = 'b' WHERE key = 'a'", &[])
        .await
        .unwrap();
    // The new key's put, then the old key's tombstone, which takes the newer version.
    let (y, x) = (next(&mut rx).await, next(&mut rx).await);
    assert_eq!(
        (x["key"].as_str(), x["op"].as_str()),
        (Some("a"), Some("delete"))
    );
    assert_eq!(
        (y["key"].as_str(), y["op"].as_str()),
        (Some("b"), Some("put"))
    );
    assert!(x["version"].as_i64() > y["version"].as_i64());

    pg.execute("DELETE FROM syncar_kv WHERE key = 'b'", &[])
        .await
        .unwrap();
    let d = next(&mut rx).await;
    assert_eq!(d["op"], "delete");
    assert!(
        d["version"].as_i64().unwrap() > y["version"].as_i64().unwrap(),
        "a delete takes a fresh version"
    );

    // A rolled-back write announces nothing.
    pg.batch_execute("BEGIN; INSERT INTO syncar_kv (key, value) VALUES ('r', '1'); ROLLBACK;")
        .await
        .unwrap();
    pg.execute(
        "INSERT INTO syncar_kv (key, value) VALUES ('after', '1')",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(next(&mut rx).await["key"], "after");
}

#[tokio::test]
async fn every_change_is_logged_and_old_entries_are_pruned() {
    let env = Env::new().await;
    syncar::app::run_migration(&env.config()).await.unwrap();
    let pg = env.pg().await;
    pg.batch_execute(
        "INSERT INTO syncar_kv (key, value) VALUES ('a', '1');
         DELETE FROM syncar_kv WHERE key = 'a';
         INSERT INTO syncar_changes (at, version, resource, key, op)
           VALUES (now() - interval '1 hour', 1, 'kv', 'old', 'put');",
    )
    .await
    .unwrap();
    let recent = syncar::schema::changes_since(&pg, "public", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(recent.len(), 1, "newest entry per key: {recent:?}");
    assert_eq!(
        (recent[0].key.as_deref(), recent[0].op),
        (Some("a"), syncar::coherence::Op::Delete)
    );
    let pruned = syncar::schema::prune_changes(&pg, "public", Duration::from_secs(900))
        .await
        .unwrap();
    assert_eq!(pruned, 1, "only the entry past the retention");
    let left: i64 = query_value(&pg, "SELECT count(*) FROM syncar_changes").await;
    assert_eq!(left, 2);
}

#[tokio::test]
async fn an_oversized_key_announces_a_flush_instead_of_failing_the_writer() {
    let env = Env::new().await;
    syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap();
    let (_listener, mut rx) = listen(&env).await;
    let key = "k".repeat(9000);
    env.pg()
        .await
        .execute(
            "INSERT INTO syncar_kv (key, value) VALUES ($1, '1')",
            &[&key],
        )
        .await
        .expect("the write succeeds");
    let n = next(&mut rx).await;
    assert_eq!(n["op"], "flush");
    assert_eq!(n["key"], Value::Null);
    assert_eq!(n["resource"], "kv");
}

#[tokio::test]
async fn an_adopted_version_column_keeps_versions_rising() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE docs (id bigint PRIMARY KEY, version bigint NOT NULL);
             INSERT INTO docs VALUES (1, 5000000);",
        )
        .await
        .unwrap();
    let mut config = env.config();
    config
        .resources
        .push(crate::support::resource("docs", "id", "version"));
    syncar::app::run_migration(&config).await.unwrap();
    let v: i64 = query_value(
        &env.pg().await,
        "INSERT INTO docs (id, version) VALUES (2, 0) RETURNING version",
    )
    .await;
    assert!(v > 5_000_000, "new versions stay above adopted ones: {v}");
}

#[tokio::test]
async fn a_custom_version_column_is_stamped_too() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute("CREATE TABLE items (sku text PRIMARY KEY, qty int NOT NULL)")
        .await
        .unwrap();
    let mut config = env.config();
    config
        .resources
        .push(crate::support::resource("items", "sku", "row_version"));
    syncar::app::run_migration(&config).await.unwrap();
    let pg = env.pg().await;
    let v: i64 = query_value(
        &pg,
        "INSERT INTO items VALUES ('a', 1) RETURNING row_version",
    )
    .await;
    let w: i64 = query_value(&pg, "UPDATE items SET qty = 2 RETURNING row_version").await;
    assert!(w > v && v > 0);
    assert!(syncar::app::run_migration(&config)
        .await
        .unwrap()
        .changes
        .is_empty());
}

#[tokio::test]
async fn generic_triggers_of_earlier_releases_are_replaced_and_dropped_once_unused() {
    let env = Env::new().await;
    let pg = env.pg().await;
    // What a database migrated by an earlier release holds: generic functions taking column
    // names as arguments, on syncar_kv and on a table no longer configured.
    pg.batch_execute(
        "CREATE FUNCTION syncar_send(resource text, key text, version bigint, op text, ts bigint)
           RETURNS void LANGUAGE sql AS 'SELECT';
         CREATE FUNCTION syncar_stamp_version() RETURNS trigger LANGUAGE plpgsql
           AS 'BEGIN RETURN NEW; END';
         CREATE FUNCTION syncar_notify() RETURNS trigger LANGUAGE plpgsql
           AS 'BEGIN RETURN NULL; END';
         CREATE TABLE syncar_kv (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL);
         CREATE TRIGGER syncar_stamp_version BEFORE INSERT OR UPDATE ON syncar_kv
           FOR EACH ROW EXECUTE FUNCTION syncar_stamp_version('version');
         CREATE TRIGGER syncar_notify AFTER INSERT OR UPDATE OR DELETE ON syncar_kv
           FOR EACH ROW EXECUTE FUNCTION syncar_notify('kv', 'key', 'version');
         CREATE TABLE leftover (id int PRIMARY KEY);
         CREATE TRIGGER syncar_notify AFTER INSERT OR UPDATE OR DELETE ON leftover
           FOR EACH ROW EXECUTE FUNCTION syncar_notify('leftover', 'id', 'version');",
    )
    .await
    .unwrap();
    let functions = || async {
        let rows = env
            .pg()
            .await
            .query(
                // The generated functions: not the C stamp of the syncar_stamp extension.
                "SELECT proname::text FROM pg_proc p WHERE proname LIKE 'syncar%' \
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid \
                 AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e') ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect::<Vec<String>>()
    };

    let changes = syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap()
        .changes;
    assert!(
        changes.contains(&"dropped function public.syncar_stamp_version()".to_string()),
        "{changes:?}"
    );
    assert_eq!(
        functions().await,
        [
            "syncar_announce_kv",
            "syncar_notify",
            "syncar_send",
            "syncar_stamp_kv",
            "syncar_truncate_kv"
        ],
        "the functions `leftover` still calls stay"
    );
    let (_listener, mut rx) = listen(&env).await;
    let v: i64 = query_value(
        &pg,
        "INSERT INTO syncar_kv (key, value) VALUES ('a', '1') RETURNING version",
    )
    .await;
    assert!(v > 0, "stamped by the new trigger");
    assert_eq!(
        next(&mut rx).await["version"],
        v,
        "announced by the new one"
    );

    pg.batch_execute("DROP TABLE leftover").await.unwrap();
    syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap();
    assert_eq!(
        functions().await,
        [
            "syncar_announce_kv",
            "syncar_stamp_kv",
            "syncar_truncate_kv"
        ]
    );
    let again = syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap()
        .changes;
    assert!(again.is_empty(), "then nothing to do: {again:?}");
}

#[tokio::test]
async fn the_changes_log_source_the_default_logs_every_change_without_notify() {
    let env = Env::new().await;
    syncar::app::run_migration(&notify_config(&env))
        .await
        .unwrap();
    let changes = syncar::app::run_migration(&env.config())
        .await
        .unwrap()
        .changes;
    assert_eq!(
        changes,
        [
            "postgres source is changes_log (configured)",
            "installed function public.syncar_announce_kv()",
            "installed function public.syncar_truncate_kv()"
        ],
        "switching the source records it and rewrites the announcing functions only"
    );
    let (_listener, mut rx) = listen(&env).await;
    let pg = env.pg().await;
    let key = "k".repeat(9000);
    pg.execute(
        "INSERT INTO syncar_kv (key, value) VALUES ($1, '1'), ('b', '2')",
        &[&key],
    )
    .await
    .unwrap();
    pg.execute("UPDATE syncar_kv SET key = 'c' WHERE key = 'b'", &[])
        .await
        .unwrap();
    // Notifications arrive in commit order: the marker comes first only if the writes above
    // sent none.
    pg.execute(
        &format!("SELECT pg_notify('{NOTIFY_CHANNEL}', '{{\"marker\": true}}')"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(next(&mut rx).await["marker"], true);
    let rows = pg
        .query(
            "SELECT left(key, 3), op FROM syncar_changes ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let logged: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let pair = |k: &str, op: &str| (k.to_string(), op.to_string());
    assert_eq!(
        logged,
        [
            pair("kkk", "put"),
            pair("b", "put"),
            pair("c", "put"),
            pair("b", "delete"),
        ],
        "a long key is logged whole: the log has no payload limit"
    );
}

#[tokio::test]
async fn one_statement_changing_many_rows_logs_each_of_them() {
    for source in [
        syncar::config::PostgresSource::ChangesLog,
        syncar::config::PostgresSource::Notify,
    ] {
        let env = Env::new().await;
        let mut config = env.config();
        config.feeds.postgres_source = source;
        syncar::app::run_migration(&config).await.unwrap();
        let pg = env.pg().await;
        pg.batch_execute(
            "INSERT INTO syncar_kv (key, value) SELECT 'k' || i, '1' FROM generate_series(1, 50) i;
             UPDATE syncar_kv SET value = '2' WHERE key IN ('k1', 'k2', 'k3');
             UPDATE syncar_kv SET key = 'x' || key WHERE key IN ('k4', 'k5');
             DELETE FROM syncar_kv WHERE key LIKE 'k1%';",
        )
        .await
        .unwrap();
        let count = |sql: &str| {
            let pg = &pg;
            let sql = sql.to_string();
            async move { pg.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        let log = "SELECT count(*) FROM syncar_changes WHERE";
        assert_eq!(
            count(&format!("{log} op = 'put'")).await,
            50 + 3 + 2,
            "{source:?}"
        );
        // k4 and k5 moved; k1 and k10-k19 deleted.
        assert_eq!(
            count(&format!("{log} op = 'delete'")).await,
            2 + 11,
            "{source:?}"
        );
        // Every row's newest logged version is the one it holds, and every tombstone is
        // newer than the put before it.
        assert_eq!(
            count(
                "SELECT count(*) FROM syncar_kv k WHERE version IS DISTINCT FROM \
                 (SELECT max(version) FROM syncar_changes c WHERE c.key = k.key)"
            )
            .await,
            0
        );
        // A moved row's tombstone is newer than its put under the new key.
        assert_eq!(
            count(
                "SELECT count(*) FROM syncar_changes d JOIN syncar_changes p \
                   ON p.key = 'x' || d.key AND p.op = 'put' \
                 WHERE d.op = 'delete' AND d.key IN ('k4', 'k5') AND d.version > p.version"
            )
            .await,
            2
        );
    }
}

#[tokio::test]
async fn partitioned_tables_and_partitions_are_refused() {
    let env = Env::new().await;
    env.pg()
        .await
        .batch_execute(
            "CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);",
        )
        .await
        .unwrap();
    for table in ["parted", "parted_1"] {
        let mut config = env.config();
        config
            .resources
            .push(crate::support::resource(table, "id", "version"));
        let done = syncar::app::run_migration(&config).await.unwrap();
        let err = done.unavailable.join("; ");
        assert!(err.contains("partition"), "{table}: {err}");
    }
}

/// A key column without a unique index of its own: the migration leaves the table out,
/// naming the statements that fix it, and either one, run as written, does.
#[tokio::test]
async fn a_key_without_a_unique_index_is_named_with_the_index_to_add() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute("CREATE TABLE nokey (id integer, name text, UNIQUE (id, name))")
        .await
        .unwrap();
    let mut config = env.config();
    config
        .resources
        .push(crate::support::resource("nokey", "id", "version"));
    let done = syncar::app::run_migration(&config).await.unwrap();
    let err = done.unavailable.join("; ");
    assert!(
        err.contains(
            "resource \"nokey\": key column \"id\" of public.nokey has no unique index of its own"
        ),
        "{err}"
    );
    assert!(
        err.contains("e.g. ALTER TABLE \"public\".\"nokey\" ADD PRIMARY KEY (\"id\"), or"),
        "{err}"
    );
    let (_, concurrently) = err
        .split_once("on a table in use ")
        .unwrap_or_else(|| panic!("{err}"));
    pg.batch_execute(concurrently).await.unwrap();
    let done = syncar::app::run_migration(&config).await.unwrap();
    assert!(done.unavailable.is_empty(), "{:?}", done.unavailable);
}

/// A server whose `wal_level` is below `logical`: `wal` configured is refused, naming the
/// setting and the restart it needs; `auto` falls back to the changes log, saying why.
#[tokio::test]
async fn a_wal_level_below_logical_is_named_with_the_setting_to_change() {
    let env = Env::new_on_postgres_with("-c wal_level=replica").await;
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::Wal;
    let err =
        syncar::telemetry::error_chain(&syncar::app::run_migration(&config).await.unwrap_err());
    assert!(
        err.contains("feeds.postgres_source = \"wal\" cannot work on this server")
            && err.contains("wal_level is replica: set wal_level = logical and restart Postgres"),
        "{err}"
    );
    let a = env
        .start(|c| c.feeds.postgres_source = PostgresSource::Auto)
        .await;
    let postgres = &a.readyz().await["feeds"]["postgres"];
    assert_eq!(postgres["source"], "changes_log", "{postgres}");
    assert!(
        postgres["source_reason"]
            .as_str()
            .unwrap()
            .contains("wal_level is replica: set wal_level = logical"),
        "{postgres}"
    );
    a.shutdown().await;
}

/// A replication slot of the configured name that another plugin made is never taken over:
/// the migration names it and what to set.
#[tokio::test]
async fn a_slot_of_another_plugin_is_named_with_what_to_do() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let db: String = query_value(&pg, "SELECT current_database()::text").await;
    let slot = format!("{db}_other");
    pg.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
        &[&slot],
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.feeds.postgres_source = PostgresSource::Wal;
    config.feeds.wal_slot = slot.clone();
    let err = syncar::app::run_migration(&config).await.map(|_| ());
    let plugin: String = query_value(
        &pg,
        &format!("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
    .await;
    // The slot, left as it was, holds WAL until dropped.
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let err = syncar::telemetry::error_chain(&err.unwrap_err());
    assert_eq!(plugin, "test_decoding", "the slot is untouched");
    assert!(
        err.contains(&format!(
            "replication slot {slot:?} exists for another plugin or database; set \
             feeds.wal_slot to a free name"
        )),
        "{err}"
    );
}

/// A migration that cannot get a table's lock at once (a long transaction reads the table)
/// gives up within its short `lock_timeout` and tries again, so the table's readers never
/// queue behind its lock request for long; once the reader's transaction ends, it completes.
#[tokio::test]
async fn a_migration_waiting_for_a_lock_never_holds_readers_behind_it() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute("CREATE TABLE items (id integer PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one')")
        .await
        .unwrap();
    let holder = env.pg().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM items")
        .await
        .unwrap();
    let mut config = env.config();
    config
        .resources
        .push(crate::support::resource("items", "id", "version"));
    let migration = tokio::spawn(async move { syncar::app::run_migration(&config).await });
    let reader = env.pg().await;
    // Far above the migration's lock_timeout (20 ms), far below the 5 s it used to wait.
    reader
        .batch_execute("SET statement_timeout = '2s'")
        .await
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(1);
    let mut reads = 0;
    while std::time::Instant::now() < until {
        reader
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .expect("a reader is never held behind the migration's lock request");
        reads += 1;
    }
    assert!(!migration.is_finished(), "the migration waits for the lock");
    holder.batch_execute("COMMIT").await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), migration)
        .await
        .expect("the migration completes once the lock is free")
        .unwrap()
        .unwrap();
    assert!(
        done.changes
            .iter()
            .any(|c| c.contains("added column version")),
        "{:?} after {reads} reads",
        done.changes
    );
}

/// A publication of the customer's own that carries syncar's tables to its subscribers
/// (`FOR ALL TABLES`, `FOR TABLES IN SCHEMA`) is named, with what to do, by `migrate`,
/// `migrate --print-sql` and `check-config --db`: a Postgres subscriber without syncar's
/// tables would stop replicating at their first change. One that publishes the customer's
/// tables by name is not, nor syncar's own `wal` publication.
#[tokio::test]
async fn a_publication_that_carries_syncars_tables_is_named() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE PUBLICATION by_name FOR TABLE orders",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.feeds.postgres_source = syncar::config::PostgresSource::Wal;
    let (planned, _) = syncar::app::run_plan(&config).await.unwrap();
    assert!(planned.warnings.is_empty(), "{:?}", planned.warnings);
    let migrated = syncar::app::run_migration(&config).await.unwrap();
    assert!(migrated.warnings.is_empty(), "{:?}", migrated.warnings);

    pg.batch_execute("CREATE PUBLICATION everything FOR ALL TABLES")
        .await
        .unwrap();
    let (planned, _) = syncar::app::run_plan(&config).await.unwrap();
    let check = syncar::app::run_check(&config).await.unwrap();
    let migrated = syncar::app::run_migration(&config).await.unwrap();
    for (what, warnings) in [
        ("plan", planned.warnings),
        ("migrate", migrated.warnings),
        (
            "check-config",
            check
                .notes
                .into_iter()
                .filter(|n| n.starts_with("warning: publication"))
                .collect(),
        ),
    ] {
        assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
        assert!(
            warnings[0].contains("publication everything ")
                && warnings[0].contains("syncar_changes")
                && warnings[0].contains("create them on each subscriber"),
            "{what}: {warnings:?}"
        );
    }

    let server: i32 = query_value(&pg, "SELECT current_setting('server_version_num')::int").await;
    if server >= 150_000 {
        pg.batch_execute(
            "DROP PUBLICATION everything; CREATE PUBLICATION public_schema FOR TABLES IN SCHEMA public",
        )
        .await
        .unwrap();
        let migrated = syncar::app::run_migration(&config).await.unwrap();
        assert!(
            migrated.warnings.len() == 1
                && migrated.warnings[0].contains("publication public_schema "),
            "{:?}",
            migrated.warnings
        );
    }
}

/// `syncar uninstall` refuses while an instance is connected (its triggers gone, it would go
/// on serving copies nothing evicts, or install them again), naming the connections;
/// `--force` goes on.
#[tokio::test]
async fn uninstall_refuses_while_an_instance_is_connected() {
    let env = Env::new().await;
    let a = env.start(|_| {}).await;
    assert_eq!(a.put("/v1/kv/k", "1").await.status, 201);
    let config = env.config();
    let refused = syncar::app::run_uninstall(&config, false)
        .await
        .expect_err("refused while an instance runs");
    let said = format!("{refused:#}");
    assert!(
        said.contains("still connected") && said.contains("syncar-listen"),
        "{said}"
    );
    let triggers: i64 = query_value(
        &env.pg().await,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'syncar%'",
    )
    .await;
    assert!(triggers > 0, "nothing removed");
    // Forced (the connections another deployment's, say), it goes on.
    let removed = syncar::app::run_uninstall(&config, true).await.unwrap();
    assert!(
        removed.iter().any(|c| c.starts_with("dropped trigger")),
        "{removed:?}"
    );
    a.shutdown().await;
}

/// A schema migrated for `wal`, then for `changes_log`: the publication goes with the slot
/// (left behind, it made Postgres refuse the customer's UPDATE on a table that lost its
/// replica identity, which only the `wal` source's schema task takes out of it), and going
/// back to `wal` creates a slot said to be new, not one found missing.
#[tokio::test]
async fn leaving_the_wal_source_drops_its_publication_and_slot() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one')",
    )
    .await
    .unwrap();
    let config = |source| {
        let mut c = env.config();
        c.feeds.postgres_source = source;
        c.resources
            .push(crate::support::resource("items", "id", "version"));
        c
    };
    use syncar::config::PostgresSource::{ChangesLog, Wal};
    syncar::app::run_migration(&config(Wal)).await.unwrap();
    let publications = || async {
        query_value::<i64>(
            &env.pg().await,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'syncar'",
        )
        .await
    };
    assert_eq!(publications().await, 1);
    let switched = syncar::app::run_migration(&config(ChangesLog))
        .await
        .unwrap()
        .changes;
    for what in ["dropped publication syncar", "dropped replication slot"] {
        assert!(
            switched.iter().any(|c| c.starts_with(what)),
            "{what}: {switched:?}"
        );
    }
    assert_eq!(publications().await, 0);
    pg.batch_execute(
        "ALTER TABLE items REPLICA IDENTITY NOTHING; UPDATE items SET name = 'uno' WHERE id = 1",
    )
    .await
    .expect("the customer's UPDATE succeeds");
    pg.batch_execute("ALTER TABLE items REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let back = syncar::app::run_migration(&config(Wal))
        .await
        .unwrap()
        .changes;
    assert!(
        back.iter()
            .any(|c| c.starts_with("created replication slot") && !c.contains("not on this server")),
        "{back:?}"
    );

    // While a relay streams the slot, the publication is kept, saying so; the next
    // migration once it stopped drops it.
    let relay = env
        .start(|c| {
            c.feeds.postgres_source = Wal;
            c.resources
                .push(crate::support::resource("items", "id", "version"));
        })
        .await;
    crate::support::eventually(Duration::from_secs(10), "the slot streamed", || async {
        let active: bool = query_value(
            &env.pg().await,
            "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots",
        )
        .await;
        active.then_some(())
    })
    .await;
    let kept = syncar::app::run_migration(&config(ChangesLog))
        .await
        .unwrap();
    assert!(
        kept.warnings
            .iter()
            .any(|w| w.contains("kept while a relay still streams")),
        "{:?}",
        kept.warnings
    );
    assert_eq!(publications().await, 1);
    relay.shutdown().await;
    crate::support::eventually(Duration::from_secs(10), "the slot let go", || async {
        let active: bool = query_value(
            &env.pg().await,
            "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots",
        )
        .await;
        (!active).then_some(())
    })
    .await;
    let dropped = syncar::app::run_migration(&config(ChangesLog))
        .await
        .unwrap()
        .changes;
    assert!(
        dropped
            .iter()
            .any(|c| c.starts_with("dropped publication syncar")),
        "{dropped:?}"
    );
    assert_eq!(publications().await, 0);
}

/// A publication of the customer's that happens to have the name syncar's `wal` source
/// would use is never dropped by a deployment on another source, by its migration or its
/// uninstall: only the one syncar created and recorded is.
#[tokio::test]
async fn a_customers_publication_of_the_same_name_is_never_dropped() {
    let env = Env::new().await;
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY); CREATE PUBLICATION syncar FOR TABLE orders",
    )
    .await
    .unwrap();
    let mut config = env.config();
    config.feeds.postgres_source = syncar::config::PostgresSource::ChangesLog;
    let migrated = syncar::app::run_migration(&config).await.unwrap();
    assert!(
        !migrated.changes.iter().any(|c| c.contains("publication")),
        "{:?}",
        migrated.changes
    );
    let left = || async {
        query_value::<i64>(
            &env.pg().await,
            "SELECT count(*) FROM pg_publication WHERE pubname = 'syncar'",
        )
        .await
    };
    assert_eq!(left().await, 1);
    let removed = syncar::app::run_uninstall(&config, false).await.unwrap();
    assert!(
        !removed.iter().any(|c| c.contains("publication")),
        "{removed:?}"
    );
    assert_eq!(left().await, 1, "the uninstall leaves it too");
}

/// A publication of the customer's `FOR ALL TABLES` publishes deletes of the changes log,
/// which has no replica identity, so Postgres refuses its pruning and the log grew without
/// end: the migration gives it `REPLICA IDENTITY FULL` where such a publication exists (at
/// start, or run again once one was created), and the log is pruned.
#[tokio::test]
async fn the_changes_log_is_pruned_under_a_publication_of_all_tables() {
    let env = Env::new().await;
    let pg = env.pg().await;
    let configure = |c: &mut syncar::Config| {
        c.feeds.postgres_source = PostgresSource::ChangesLog;
        // Pruned every retention / 10, at least every second.
        c.feeds.changes_retention = Duration::from_secs(10);
        c.feeds.replay_margin = Duration::from_secs(2);
        c.cache.ttl.l2_ttl = Duration::from_secs(10);
    };
    let a = env.start(configure).await;
    pg.batch_execute(
        "CREATE PUBLICATION everything FOR ALL TABLES; \
         INSERT INTO syncar_changes (at, version, resource, key, op) \
         VALUES (now() - interval '1 hour', 1, 'kv', 'old', 'put')",
    )
    .await
    .unwrap();
    let old = || async {
        query_value::<i64>(
            &env.pg().await,
            "SELECT count(*) FROM syncar_changes WHERE key = 'old'",
        )
        .await
    };
    // Several prunes later, refused by Postgres.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(old().await, 1, "Postgres refuses the prune");
    let mut config = env.config();
    configure(&mut config);
    let migrated = syncar::app::run_migration(&config).await.unwrap().changes;
    assert!(
        migrated
            .iter()
            .any(|c| c.starts_with("set replica identity full on public.syncar_changes")),
        "{migrated:?}"
    );
    crate::support::eventually(Duration::from_secs(15), "the old entry pruned", || async {
        (old().await == 0).then_some(())
    })
    .await;
    let identity: String = query_value(
        &pg,
        "SELECT relreplident::text FROM pg_class WHERE relname = 'syncar_changes'",
    )
    .await;
    assert_eq!(identity, "f");
    a.shutdown().await;
}
