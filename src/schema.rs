//! The Postgres side of versioning: `syncar migrate` (the sequence, version columns, triggers
//! and the `kv` table) and the catalog lookups that turn configured resources into
//! [`Resource`]s. Knows nothing about caches.
//!
//! # Idempotence
//! Every step looks before it changes anything, so a second run reports no change and takes
//! no lock beyond the migration's own advisory lock. Concurrent instances starting together
//! serialize on that lock.

use tokio_postgres::GenericClient;

use crate::config::{Config, ResourceConfig, KV_RESOURCE};
use crate::resource::{quote_ident, quote_literal, Catalog, Column, KeyType, Resource};

/// The channel the notify trigger sends on. Payloads are JSON:
/// `{"resource", "key", "version", "op": "put"|"delete"|"flush", "ts_us"}`. `flush` (with a
/// null key) replaces a payload that would exceed Postgres' 8000-byte limit: drop the whole
/// resource. `ts_us` is the trigger's wall clock in microseconds, as close to commit as SQL
/// gets.
pub const NOTIFY_CHANNEL: &str = "syncar_invalidations";
/// The one sequence every version comes from.
pub const VERSION_SEQUENCE: &str = "syncar_version_seq";
/// Generic trigger functions of earlier releases, replaced by per-resource ones and dropped
/// by the migration once no trigger uses them.
const LEGACY_FUNCTIONS: [&str; 3] = ["syncar_notify", "syncar_stamp_version", "syncar_send"];
/// The changes log: every announced change, kept `feeds.changes_retention` for replay after an
/// outage. `at` is the writer's clock when its trigger ran.
pub const CHANGES_TABLE: &str = "syncar_changes";
const STAMP_TRIGGER: &str = "syncar_stamp_version";
/// The statement-level triggers that log (and with `notify`, announce) what a statement
/// changed, one per event: Postgres allows transition tables only on single-event triggers.
const LOG_TRIGGERS: [&str; 3] = [
    "syncar_log_insert",
    "syncar_log_update",
    "syncar_log_delete",
];
/// The row-level AFTER trigger of earlier releases, replaced by [`LOG_TRIGGERS`].
const LEGACY_NOTIFY_TRIGGER: &str = "syncar_notify";
/// `pg_trigger.tgtype` bits.
const TG_ROW: i16 = 1;
const TG_BEFORE: i16 = 2;
const TG_INSERT: i16 = 4;
const TG_DELETE: i16 = 8;
const TG_UPDATE: i16 = 16;
/// Key of the advisory lock held while migrating ("syncar" in ASCII).
const MIGRATION_LOCK: i64 = 0x73796e636172;

/// A schema that cannot serve the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("postgres error while {doing}")]
    Postgres {
        doing: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the schema is not migrated ({0}); run `syncar migrate` or set postgres.migrate_on_start"
    )]
    NotMigrated(String),
}

/// A table as the catalog describes it.
struct TableInfo {
    oid: u32,
    columns: Vec<ColumnInfo>,
    /// Whether the key column has a unique index of its own (ON CONFLICT needs one).
    unique_key: bool,
}

struct ColumnInfo {
    num: i16,
    name: String,
    type_oid: u32,
    type_name: String,
    /// Generated or identity-always: shown in documents, never written.
    readonly: bool,
}

const TEXT_OID: u32 = 25;
const VARCHAR_OID: u32 = 1043;
const INT2_OID: u32 = 21;
const INT4_OID: u32 = 23;
const INT8_OID: u32 = 20;

/// Installs or repairs everything versioning needs, in one transaction.
///
/// Returns what it changed, one line per change; empty when the schema was up to date.
///
/// # Errors
/// A configured table or column that does not exist or has the wrong type, or Postgres
/// failing.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<String>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg("taking the migration lock"))?;
    // Installing triggers locks each table, and a lock request queued behind a long reader
    // blocks every later query of that table: give up instead (`serve` retries with backoff).
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(pg("setting lock_timeout"))?;
    let schema = &config.postgres.schema;
    let s = quote_ident(schema);
    let mut changes = Vec::new();

    let has_schema: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[schema],
        )
        .await
        .map_err(pg("looking up the schema"))?
        .get(0);
    if !has_schema {
        tx.batch_execute(&format!("CREATE SCHEMA {s}"))
            .await
            .map_err(pg("creating the schema"))?;
        changes.push(format!("created schema {schema}"));
    }

    if table_oid(&tx, schema, VERSION_SEQUENCE, "S")
        .await?
        .is_none()
    {
        tx.batch_execute(&format!("CREATE SEQUENCE {s}.{VERSION_SEQUENCE}"))
            .await
            .map_err(pg("creating the version sequence"))?;
        changes.push(format!("created sequence {schema}.{VERSION_SEQUENCE}"));
    }

    if table_oid(&tx, schema, CHANGES_TABLE, "r").await?.is_none() {
        tx.batch_execute(&format!(
            "CREATE TABLE {s}.{CHANGES_TABLE} (\
               at timestamptz NOT NULL DEFAULT clock_timestamp(), \
               xid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint), \
               version bigint NOT NULL, resource text NOT NULL, key text, op text NOT NULL); \
             CREATE INDEX {CHANGES_TABLE}_at ON {s}.{CHANGES_TABLE} (at); \
             CREATE INDEX {CHANGES_TABLE}_xid ON {s}.{CHANGES_TABLE} (xid)"
        ))
        .await
        .map_err(pg("creating the changes log"))?;
        changes.push(format!("created table {schema}.{CHANGES_TABLE}"));
    }

    let notify = config.feeds.postgres_source == crate::config::PostgresSource::Notify;
    if table_oid(&tx, schema, "syncar_kv", "r").await?.is_none() {
        tx.batch_execute(&format!(
            "CREATE TABLE {s}.syncar_kv (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL)"
        ))
        .await
        .map_err(pg("creating the kv table"))?;
        changes.push(format!("created table {schema}.syncar_kv"));
    }

    let kv = ResourceConfig {
        name: KV_RESOURCE.into(),
        table: "syncar_kv".into(),
        schema: schema.clone(),
        key: "key".into(),
        version_column: "version".into(),
        l1_ttl: None,
        l2_ttl: None,
        negative_ttl: None,
        tombstone_ttl: None,
    };
    for r in std::iter::once(&kv).chain(&config.resources) {
        let info = describe_table(&tx, r).await?;
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        match info.columns.iter().find(|c| c.name == r.version_column) {
            Some(c) if c.type_oid == INT8_OID => {}
            Some(c) => {
                return Err(SchemaError::Invalid(format!(
                "resource {:?}: column {:?} of table {} is {}, but a version column must be bigint",
                r.name, r.version_column, qualified, c.type_name
            )))
            }
            None => {
                // A volatile default gives every existing row its own version.
                tx.batch_execute(&format!(
                    "ALTER TABLE {qualified} ADD COLUMN {} bigint NOT NULL DEFAULT nextval({})",
                    quote_ident(&r.version_column),
                    quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
                ))
                .await
                .map_err(pg("adding a version column"))?;
                changes.push(format!(
                    "added column {} to table {qualified}",
                    r.version_column
                ));
            }
        }
        key_column(&info, r)?;
        let stamp = function_name("syncar_stamp", &r.name);
        let announce = function_name("syncar_announce", &r.name);
        for (function, body) in [
            (&stamp, stamp_function_body(schema, r)),
            (&announce, announce_function_body(schema, r, notify)),
        ] {
            if install_function(&tx, schema, function, &body).await? {
                changes.push(format!("installed function {schema}.{function}()"));
            }
        }
        // Name, definition, and what pg_trigger must say: function, type bits, transition
        // tables (old, new).
        let triggers = [
            (
                STAMP_TRIGGER,
                "BEFORE INSERT OR UPDATE",
                "FOR EACH ROW",
                &stamp,
                TG_ROW | TG_BEFORE | TG_INSERT | TG_UPDATE,
                (None, None),
            ),
            (
                LOG_TRIGGERS[0],
                "AFTER INSERT",
                "REFERENCING NEW TABLE AS syncar_new FOR EACH STATEMENT",
                &announce,
                TG_INSERT,
                (None, Some("syncar_new")),
            ),
            (
                LOG_TRIGGERS[1],
                "AFTER UPDATE",
                "REFERENCING OLD TABLE AS syncar_old NEW TABLE AS syncar_new FOR EACH STATEMENT",
                &announce,
                TG_UPDATE,
                (Some("syncar_old"), Some("syncar_new")),
            ),
            (
                LOG_TRIGGERS[2],
                "AFTER DELETE",
                "REFERENCING OLD TABLE AS syncar_old FOR EACH STATEMENT",
                &announce,
                TG_DELETE,
                (Some("syncar_old"), None),
            ),
        ];
        for (trigger, timing, level, function, tgtype, (old, new)) in triggers {
            type Installed = (String, String, i16, Option<String>, Option<String>);
            let current: Option<Installed> = tx
                .query_opt(
                    "SELECT n.nspname::text, p.proname::text, t.tgtype, t.tgoldtable::text, \
                            t.tgnewtable::text FROM pg_trigger t \
                     JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE t.tgrelid = $1 AND t.tgname = $2",
                    &[&info.oid, &trigger],
                )
                .await
                .map_err(pg("looking up triggers"))?
                .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)));
            if current.is_none() && trigger == STAMP_TRIGGER {
                // Adopting a table: versions already in it (an existing bigint column) must
                // stay below every version the trigger hands out from now on.
                tx.execute(
                    &format!(
                        "SELECT setval({seq}, m) FROM (SELECT max({col}) AS m FROM {qualified}) x \
                         WHERE m >= (SELECT last_value FROM {s}.{VERSION_SEQUENCE})",
                        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
                        col = quote_ident(&r.version_column),
                    ),
                    &[],
                )
                .await
                .map_err(pg("aligning the version sequence"))?;
            }
            let wanted: Installed = (
                schema.clone(),
                function.clone(),
                tgtype,
                old.map(String::from),
                new.map(String::from),
            );
            if current.as_ref() != Some(&wanted) {
                // Dropped first: CREATE OR REPLACE cannot turn a row trigger into a statement
                // trigger with transition tables.
                tx.batch_execute(&format!(
                    "DROP TRIGGER IF EXISTS {trigger} ON {qualified}; \
                     CREATE TRIGGER {trigger} {timing} ON {qualified} {level} \
                     EXECUTE FUNCTION {s}.{}()",
                    quote_ident(function)
                ))
                .await
                .map_err(pg("creating triggers"))?;
                changes.push(format!("installed trigger {trigger} on {qualified}"));
            }
        }
        let legacy_trigger: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
                &[&info.oid, &LEGACY_NOTIFY_TRIGGER],
            )
            .await
            .map_err(pg("looking up triggers"))?
            .get(0);
        if legacy_trigger {
            tx.batch_execute(&format!(
                "DROP TRIGGER {LEGACY_NOTIFY_TRIGGER} ON {qualified}"
            ))
            .await
            .map_err(pg("dropping an old trigger"))?;
            changes.push(format!(
                "dropped trigger {LEGACY_NOTIFY_TRIGGER} on {qualified}"
            ));
        }
    }
    for legacy in LEGACY_FUNCTIONS {
        // Dropped only once unused: a table no longer configured may still call one.
        let unused: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND p.proname = $2) AND NOT EXISTS (SELECT 1 FROM pg_trigger t \
                 JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND (p.proname = $2 OR ($2 = 'syncar_send' AND p.proname = 'syncar_notify')))",
                &[schema, &legacy],
            )
            .await
            .map_err(pg("looking up old trigger functions"))?
            .get(0);
        if unused {
            tx.batch_execute(&format!("DROP FUNCTION {s}.{legacy}"))
                .await
                .map_err(pg("dropping old trigger functions"))?;
            changes.push(format!("dropped function {schema}.{legacy}()"));
        }
    }
    tx.commit().await.map_err(pg("committing the migration"))?;
    Ok(changes)
}

/// Resolves the configured resources (and `kv`) against the live schema.
///
/// # Errors
/// [`SchemaError::NotMigrated`] when syncar's objects are missing; [`SchemaError::Invalid`]
/// when a configured table does not fit.
pub async fn load_catalog(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Catalog, SchemaError> {
    let schema = &config.postgres.schema;
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    if table_oid(client, schema, VERSION_SEQUENCE, "S")
        .await?
        .is_none()
    {
        return Err(SchemaError::NotMigrated(format!(
            "sequence {schema}.{VERSION_SEQUENCE} is missing"
        )));
    }
    let mut resources = vec![Resource::kv(schema, config.cache.ttl.clone())];
    for r in &config.resources {
        let info = describe_table(client, r).await?;
        let installed: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1 AND tgname = ANY($2)",
                &[
                    &info.oid,
                    &std::iter::once(STAMP_TRIGGER)
                        .chain(LOG_TRIGGERS)
                        .collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(pg("looking up triggers"))?
            .get(0);
        if installed != 1 + LOG_TRIGGERS.len() as i64
            || !info.columns.iter().any(|c| c.name == r.version_column)
        {
            return Err(SchemaError::NotMigrated(format!(
                "table {}.{} lacks its version column or triggers",
                r.schema, r.table
            )));
        }
        let key_type = key_column(&info, r)?;
        let columns = info
            .columns
            .iter()
            .filter(|c| c.name != r.version_column && (!c.readonly || c.name == r.key))
            .map(|c| Column::new(&c.name))
            .collect();
        let readonly = info
            .columns
            .iter()
            .filter(|c| c.readonly && c.name != r.key)
            .map(|c| c.name.clone())
            .collect();
        resources.push(Resource::table(
            r.name.clone(),
            config.ttl_for(r),
            &r.schema,
            &r.table,
            Column::new(&r.key),
            key_type,
            Column::new(&r.version_column),
            columns,
            readonly,
        ));
    }
    Ok(Catalog::new(resources))
}

/// Checks the key column: a supported type with a unique index of its own.
fn key_column(info: &TableInfo, r: &ResourceConfig) -> Result<KeyType, SchemaError> {
    let Some(col) = info.columns.iter().find(|c| c.name == r.key) else {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} has no column {:?}",
            r.name, r.schema, r.table, r.key
        )));
    };
    let key_type = match col.type_oid {
        TEXT_OID | VARCHAR_OID => KeyType::Text,
        INT2_OID | INT4_OID | INT8_OID => KeyType::Int,
        _ => {
            return Err(SchemaError::Invalid(format!(
                "resource {:?}: key column {:?} is {}; supported are text, varchar, smallint, integer and bigint",
                r.name, r.key, col.type_name
            )))
        }
    };
    if !info.unique_key {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: key column {:?} of {}.{} needs a unique index (or primary key) of its own",
            r.name, r.key, r.schema, r.table
        )));
    }
    Ok(key_type)
}

async fn table_oid(
    client: &impl GenericClient,
    schema: &str,
    name: &str,
    kind: &str,
) -> Result<Option<u32>, SchemaError> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind::text = ANY(string_to_array($3, ','))",
            &[&schema, &name, &kind.replace('r', "r,p")],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up tables",
            source,
        })?;
    Ok(row.map(|r| r.get(0)))
}

async fn describe_table(
    client: &impl GenericClient,
    r: &ResourceConfig,
) -> Result<TableInfo, SchemaError> {
    let pg = |source| SchemaError::Postgres {
        doing: "describing a table",
        source,
    };
    let Some(oid) = table_oid(client, &r.schema, &r.table, "r").await? else {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} does not exist",
            r.name, r.schema, r.table
        )));
    };
    // Changes are logged by statement-level triggers, which Postgres fires only on the table
    // a statement names: writes naming a partition would bypass its parent's, and writes
    // naming the parent its partitions'. Refused rather than half-covered.
    let partitioned: bool = client
        .query_one(
            "SELECT relkind::text = 'p' OR relispartition FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await
        .map_err(pg)?
        .get(0);
    if partitioned {
        return Err(SchemaError::Invalid(format!(
            "resource {:?}: table {}.{} is partitioned or a partition, which syncar does not \
             support yet (a write naming a partition would not be logged)",
            r.name, r.schema, r.table
        )));
    }
    let rows = client
        .query(
            "SELECT a.attnum, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), \
                    (a.attgenerated::text <> '' OR a.attidentity::text = 'a') \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(pg)?;
    let columns: Vec<ColumnInfo> = rows
        .iter()
        .map(|row| ColumnInfo {
            num: row.get(0),
            name: row.get(1),
            type_oid: row.get(2),
            type_name: row.get(3),
            readonly: row.get(4),
        })
        .collect();
    let key_num = columns.iter().find(|c| c.name == r.key).map(|c| c.num);
    let unique_key = match key_num {
        Some(num) => client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique \
                 AND i.indnkeyatts = 1 AND i.indkey[0] = $2 AND i.indpred IS NULL AND i.indexprs IS NULL)",
                &[&oid, &num],
            )
            .await
            .map_err(pg)?
            .get(0),
        None => false,
    };
    Ok(TableInfo {
        oid,
        columns,
        unique_key,
    })
}

/// The name of one of a resource's trigger functions: `{prefix}_{resource}`, shortened with a
/// hash of the resource's name where that would pass Postgres' 63-byte limit.
fn function_name(prefix: &str, resource: &str) -> String {
    let name = format!("{prefix}_{resource}");
    // `syncar_stamp_version`, for a resource named `version`, is an earlier release's
    // generic function, which tables no longer configured may still call.
    if name.len() <= 63 && !LEGACY_FUNCTIONS.contains(&name.as_str()) {
        return name;
    }
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = resource.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // Resource names are ASCII, so any byte index is a char boundary.
    format!("{}_{hash:08x}", &name[..name.len().min(63 - 9)])
}

/// Creates or replaces a trigger function unless its body is already `body`. Returns whether
/// it changed anything.
async fn install_function(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    name: &str,
    body: &str,
) -> Result<bool, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let current: Option<String> = tx
        .query_opt(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0",
            &[&schema, &name],
        )
        .await
        .map_err(pg("looking up trigger functions"))?
        .map(|row| row.get(0));
    if current.as_deref() == Some(body) {
        return Ok(false);
    }
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql AS {}",
        quote_ident(schema),
        quote_ident(name),
        dollar_quote(body)
    ))
    .await
    .map_err(pg("creating trigger functions"))?;
    Ok(true)
}

// The trigger functions are generated per resource, with the resource's own column names in
// them: generic ones taking names as arguments had to go through `to_jsonb` of the whole row,
// and cost plain-SQL writers about twice as much (BENCHMARKS.md, hot path, "Triggers cost plain-SQL writers").

/// BEFORE INSERT OR UPDATE: every row written, by anyone, takes a new version.
fn stamp_function_body(schema: &str, r: &ResourceConfig) -> String {
    format!(
        "
BEGIN
  NEW.{col} := nextval({seq});
  RETURN NEW;
END
",
        col = quote_ident(&r.version_column),
        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
    )
}

/// AFTER INSERT, UPDATE or DELETE, once per statement: log which keys the statement changed,
/// at which versions, and with the `notify` source announce each. A delete takes a fresh
/// version for its tombstone; an update that moves a row to another key also announces the
/// old key as deleted. The rows come from the statement's transition tables, so a statement
/// changing many rows logs them with one insert.
fn announce_function_body(schema: &str, r: &ResourceConfig, notify: bool) -> String {
    let key = quote_ident(&r.key);
    let seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"));
    // A NULL key (a nullable unique column) names no document: nothing to announce.
    let puts = format!(
        "SELECT n.{ver} AS version, n.{key}::text AS key, 'put' AS op FROM syncar_new n \
         WHERE n.{key} IS NOT NULL",
        ver = quote_ident(&r.version_column)
    );
    let deletes = format!(
        "SELECT nextval({seq}) AS version, o.{key}::text AS key, 'delete' AS op FROM syncar_old o \
         WHERE o.{key} IS NOT NULL"
    );
    // Keys that no new row has: deleted by this update. (Set semantics: two rows swapping
    // keys delete nothing.) A moved row's tombstone is the newer version: the row was
    // stamped by the BEFORE ROW trigger, before this statement trigger calls nextval.
    let moved = format!(
        "{puts} UNION ALL {deletes} \
         AND NOT EXISTS (SELECT 1 FROM syncar_new n WHERE n.{key} = o.{key})"
    );
    format!(
        "
DECLARE
  r record;
  payload text;
BEGIN
  IF TG_OP = 'INSERT' THEN
{insert}
  ELSIF TG_OP = 'UPDATE' THEN
{update}
  ELSE
{delete}
  END IF;
  RETURN NULL;
END
",
        insert = send(schema, r, notify, &puts),
        update = send(schema, r, notify, &moved),
        delete = send(schema, r, notify, &deletes),
    )
}

/// The statements logging (and with `notify` announcing) the changes `changes` selects
/// (`version`, `key`, `op`). A NOTIFY payload that would pass Postgres' 8000-byte limit
/// becomes a resource-wide `flush` instead of failing the writer's transaction; the log has
/// no such limit.
fn send(schema: &str, r: &ResourceConfig, notify: bool, changes: &str) -> String {
    let log = format!("{}.{CHANGES_TABLE}", quote_ident(schema));
    let resource = quote_literal(&r.name);
    if !notify {
        return format!(
            "    INSERT INTO {log} (version, resource, key, op)
      SELECT c.version, {resource}, c.key, c.op FROM ({changes}) c;"
        );
    }
    let channel = quote_literal(NOTIFY_CHANNEL);
    let payload = |key: &str, op: &str| {
        format!(
            "json_build_object('resource', {resource}, 'key', {key}, 'version', r.version, \
             'op', {op}, 'ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text"
        )
    };
    format!(
        "    FOR r IN {changes} LOOP
      payload := {};
      IF octet_length(payload) <= 7900 THEN
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, r.key, r.op);
      ELSE
        payload := {};
        INSERT INTO {log} (version, resource, key, op) VALUES (r.version, {resource}, NULL, 'flush');
      END IF;
      PERFORM pg_notify({channel}, payload);
    END LOOP;",
        payload("r.key", "r.op"),
        payload("NULL", "'flush'"),
    )
}

/// `body` between dollar quotes whose tag it does not contain (column names are written into
/// it, and may hold anything).
fn dollar_quote(body: &str) -> String {
    let tag = (0..)
        .map(|n| format!("$fn{n}$"))
        .find(|tag| !body.contains(tag.as_str()))
        .expect("some tag is free");
    format!("{tag}{body}{tag}")
}

/// One entry of the changes log, newest per key.
#[derive(Clone, Debug)]
pub struct Change {
    pub resource: String,
    /// `None` for a resource-wide `flush`.
    pub key: Option<String>,
    pub version: i64,
    pub op: String,
}

/// The newest logged change of every key changed within the last `ago`, by Postgres' clock
/// (so the instance's own clock does not matter).
///
/// # Errors
/// Postgres failing.
pub async fn changes_since(
    client: &impl GenericClient,
    schema: &str,
    ago: std::time::Duration,
) -> Result<Vec<Change>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT DISTINCT ON (resource, key) resource, key, version, op FROM {}.{CHANGES_TABLE} \
         WHERE at >= clock_timestamp() - make_interval(secs => $1) \
         ORDER BY resource, key, version DESC",
        quote_ident(schema)
    );
    let rows = client.query(&sql, &[&ago.as_secs_f64()]).await?;
    Ok(rows
        .iter()
        .map(|r| Change {
            resource: r.get(0),
            key: r.get(1),
            version: r.get(2),
            op: r.get(3),
        })
        .collect())
}

/// Deletes log entries older than `retention`, unless another instance is doing it (a
/// transaction-scoped advisory lock, taken in the same statement). Returns the rows deleted.
///
/// # Errors
/// Postgres failing.
pub async fn prune_changes(
    client: &impl GenericClient,
    schema: &str,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "WITH lock AS (SELECT pg_try_advisory_xact_lock($1) AS held) \
                 DELETE FROM {}.{CHANGES_TABLE} \
                 WHERE (SELECT held FROM lock) AND at < clock_timestamp() - make_interval(secs => $2)",
                quote_ident(schema)
            ),
            &[&(MIGRATION_LOCK + 1), &retention.as_secs_f64()],
        )
        .await
}

/// Changes of transactions with an id of `from_xid` or more, visible now, with the xmin of
/// the same snapshot: every transaction below it has ended, so nothing with a smaller id can
/// still appear. Polling from the last xmin therefore misses nothing, however commits are
/// ordered; rows at or above it are read again next time (callers skip what they applied).
///
/// # Errors
/// Postgres failing.
pub async fn changes_from_xid(
    client: &impl GenericClient,
    schema: &str,
    from_xid: i64,
) -> Result<(i64, Vec<(i64, Change, i64)>), tokio_postgres::Error> {
    let sql = format!(
        "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) \
         SELECT (SELECT xmin FROM s), c.xid, c.resource, c.key, c.version, c.op, \
                (extract(epoch FROM c.at) * 1000000)::bigint \
         FROM (SELECT 1) one LEFT JOIN {}.{CHANGES_TABLE} c ON c.xid >= $1 ORDER BY c.xid",
        quote_ident(schema)
    );
    let rows = client.query(&sql, &[&from_xid]).await?;
    let xmin: i64 = rows.first().map_or(from_xid, |r| r.get(0));
    let changes = rows
        .iter()
        .filter_map(|r| {
            let xid: Option<i64> = r.get(1);
            Some((
                xid?,
                Change {
                    resource: r.get(2),
                    key: r.get(3),
                    version: r.get(4),
                    op: r.get(5),
                },
                r.get::<_, Option<i64>>(6).unwrap_or_default(),
            ))
        })
        .collect();
    Ok((xmin, changes))
}

/// The xmin of a snapshot taken now: the starting point of a fresh poller.
///
/// # Errors
/// Postgres failing.
pub async fn current_xmin(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::{dollar_quote, function_name};

    #[test]
    fn function_names_fit_postgres_limit_and_stay_distinct() {
        assert_eq!(function_name("syncar_stamp", "users"), "syncar_stamp_users");
        let long = "a".repeat(63);
        let longer = format!("{long}b");
        let (x, y) = (
            function_name("syncar_announce", &long),
            function_name("syncar_announce", &longer),
        );
        assert!(x.len() <= 63 && y.len() <= 63, "{x} {y}");
        assert_ne!(x, y);
        assert_eq!(x, function_name("syncar_announce", &long), "stable");
        let clash = function_name("syncar_stamp", "version");
        assert!(
            clash.starts_with("syncar_stamp_version_"),
            "not an earlier release's generic function: {clash}"
        );
    }

    #[test]
    fn a_body_holding_the_dollar_tag_gets_another() {
        assert_eq!(dollar_quote("x"), "$fn0$x$fn0$");
        assert_eq!(dollar_quote("a $fn0$ b"), "$fn1$a $fn0$ b$fn1$");
    }
}
