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
const NOTIFY_TRIGGER: &str = "syncar_notify";
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
        let functions = [
            (
                STAMP_TRIGGER,
                "BEFORE INSERT OR UPDATE",
                function_name("syncar_stamp", &r.name),
                stamp_function_body(schema, r),
            ),
            (
                NOTIFY_TRIGGER,
                "AFTER INSERT OR UPDATE OR DELETE",
                function_name("syncar_announce", &r.name),
                announce_function_body(schema, r, notify),
            ),
        ];
        for (trigger, timing, function, body) in functions {
            if install_function(&tx, schema, &function, &body).await? {
                changes.push(format!("installed function {schema}.{function}()"));
            }
            let current: Option<(String, String, Vec<u8>)> = tx
                .query_opt(
                    "SELECT n.nspname::text, p.proname::text, t.tgargs FROM pg_trigger t \
                     JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE t.tgrelid = $1 AND t.tgname = $2",
                    &[&info.oid, &trigger],
                )
                .await
                .map_err(pg("looking up triggers"))?
                .map(|row| (row.get(0), row.get(1), row.get(2)));
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
            let wanted = (schema.clone(), function.clone(), Vec::new());
            if current.as_ref() != Some(&wanted) {
                tx.batch_execute(&format!(
                    "CREATE OR REPLACE TRIGGER {trigger} {timing} ON {qualified} \
                     FOR EACH ROW EXECUTE FUNCTION {s}.{}()",
                    quote_ident(&function)
                ))
                .await
                .map_err(pg("creating triggers"))?;
                changes.push(format!("installed trigger {trigger} on {qualified}"));
            }
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
                &[&info.oid, &vec![STAMP_TRIGGER, NOTIFY_TRIGGER]],
            )
            .await
            .map_err(pg("looking up triggers"))?
            .get(0);
        if installed != 2 || !info.columns.iter().any(|c| c.name == r.version_column) {
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
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = resource.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // Resource names are ASCII, so any byte index is a char boundary.
    format!("{}_{hash:08x}", &name[..63 - 9])
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
             WHERE n.nspname = $1 AND p.proname = $2",
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
// and cost plain-SQL writers about twice as much (BENCHMARKS.md, "What the triggers cost").

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

/// AFTER INSERT OR UPDATE OR DELETE: log which key changed, at which version, and with the
/// `notify` source announce it. A delete takes a fresh version for its tombstone; an update
/// that moves a row to another key also announces the old key as deleted.
fn announce_function_body(schema: &str, r: &ResourceConfig, notify: bool) -> String {
    let key = quote_ident(&r.key);
    format!(
        "
DECLARE
  v bigint;
  payload text;
BEGIN
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.{key} IS DISTINCT FROM NEW.{key}) THEN
    v := nextval({seq});
{delete}
  END IF;
  IF TG_OP <> 'DELETE' THEN
{put}
  END IF;
  RETURN NULL;
END
",
        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
        delete = send(
            schema,
            r,
            notify,
            &format!("OLD.{key}::text"),
            "v",
            "delete"
        ),
        put = send(
            schema,
            r,
            notify,
            &format!("NEW.{key}::text"),
            &format!("NEW.{}", quote_ident(&r.version_column)),
            "put"
        ),
    )
}

/// The statements logging (and with `notify` announcing) one change. A NOTIFY payload that
/// would pass Postgres' 8000-byte limit becomes a resource-wide `flush` instead of failing
/// the writer's transaction; the log has no such limit.
fn send(
    schema: &str,
    r: &ResourceConfig,
    notify: bool,
    key: &str,
    version: &str,
    op: &str,
) -> String {
    let log = format!("{}.{CHANGES_TABLE}", quote_ident(schema));
    let resource = quote_literal(&r.name);
    let insert = |key: &str, op: &str| {
        format!("INSERT INTO {log} (version, resource, key, op) VALUES ({version}, {resource}, {key}, '{op}');")
    };
    if !notify {
        return format!("    {}", insert(key, op));
    }
    let payload = |key: &str, op: &str| {
        format!(
            "json_build_object('resource', {resource}, 'key', {key}, 'version', {version}, 'op', '{op}', \
             'ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text"
        )
    };
    let channel = quote_literal(NOTIFY_CHANNEL);
    format!(
        "    payload := {};
    IF octet_length(payload) <= 7900 THEN
      {}
    ELSE
      payload := {};
      {}
    END IF;
    PERFORM pg_notify({channel}, payload);",
        payload(key, op),
        insert(key, op),
        payload("NULL", "flush"),
        insert("NULL", "flush"),
    )
}

fn dollar_quote(body: &str) -> String {
    assert!(!body.contains("$fn$"), "function bodies never contain $fn$");
    format!("$fn${body}$fn$")
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
    use super::function_name;

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
    }
}
