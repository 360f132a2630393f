//! `syncar migrate`: installs or repairs everything versioning needs, in one transaction.
//!
//! # Idempotence
//! Every step looks before it changes anything, so a second run reports no change and takes
//! no lock beyond the migration's own advisory lock. Concurrent instances starting together
//! serialize on that lock.

use super::capture::{self, SlotState, STATE_TABLE};
use super::error::SchemaError;
use super::names::{
    wanted_triggers, CHANGES_TABLE, LEGACY_FUNCTIONS, LEGACY_NOTIFY_TRIGGER, LOG_TRIGGERS,
    MIGRATION_LOCK, STAMP_TRIGGER, TG_BEFORE, TG_DELETE, TG_INSERT, TG_ROW, TG_TRUNCATE, TG_UPDATE,
    VERSION_SEQUENCE,
};
use super::table::{describe_table, fit, table_oid, ColumnInfo, Identity, TableInfo, INT8_OID};
use super::triggers::{
    announce_function_body, dollar_quote, function_name, stamp_function_body,
    truncate_function_body, Announce,
};
use std::time::Duration;
use tokio_postgres::GenericClient;

use crate::config::{Config, PostgresSource, ResourceConfig, KV_RESOURCE};
use crate::resource::{quote_ident, quote_literal};

/// Installs or repairs everything versioning needs, in one transaction: the sequence, the
/// state table, the changes log, the kv table, version columns, the triggers of the resolved
/// source (`auto` resolves here, see [`capture::resolve`]), and for `wal` the publication.
/// Then, outside that transaction, the `wal` source's replication slot (created if missing or
/// invalidated); other sources drop an idle syncar slot, which would retain WAL for nobody.
///
/// A configured table that does not exist or does not fit (its key, its version column) is
/// left out, with the reason in [`Migration::unavailable`]: the other resources do not go
/// down with it.
///
/// # Errors
/// `wal` configured where the server cannot do it, or Postgres failing.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Migration, SchemaError> {
    let mut retries = LockRetries::new();
    loop {
        match migrate_once(client, config, &mut Sink::Postgres).await {
            Err(e) if retries.again(&e, "migration", client, config).await => {}
            Err(e) => return Err(with_privilege_hint(e)),
            result => return result,
        }
    }
}

/// A migration refused for want of a privilege (SQLSTATE 42501) said with what to do: the
/// install needs what running does not.
fn with_privilege_hint(e: SchemaError) -> SchemaError {
    match &e {
        SchemaError::Postgres { doing, source }
            if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
        {
            let reason = source
                .as_db_error()
                .map_or_else(|| source.to_string(), |db| db.message().to_string());
            SchemaError::Invalid(format!(
                "postgres refused {doing}: {reason}. Installing needs the cached tables' owner \
                 (a version column, triggers, the publication), CREATE on the database and, \
                 for the wal source, REPLICATION: run `syncar migrate` as such a role, or have \
                 the DBA apply what `syncar migrate --print-sql` prints and serve with \
                 postgres.migrate_on_start = false (README \"DDL for the DBA, and least \
                 privileges\")"
            ))
        }
        _ => e,
    }
}

/// What [`migrate`] would run on this database for this configuration, changing nothing: the
/// same look at the catalog, in a read-only transaction, with every statement that would
/// change something written into a [`Script`] instead of run (`syncar migrate --print-sql`,
/// and what `serve` compares with when `postgres.migrate_on_start = false`). An up-to-date
/// schema gives an empty script.
///
/// # Errors
/// As [`migrate`]; a lock timeout is not retried.
pub async fn plan(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<(Migration, Script), SchemaError> {
    let mut sink = Sink::Script(Script::default());
    let mut migration = migrate_once(client, config, &mut sink).await?;
    for change in &mut migration.changes {
        *change = pending(change);
    }
    let Sink::Script(script) = sink else {
        unreachable!("the sink stays a script")
    };
    Ok((migration, script))
}

/// A line of [`Migration::changes`] as what is still to do: "added column v to table t"
/// becomes "add column v to table t".
fn pending(done: &str) -> String {
    for (was, to_do) in [
        ("added ", "add "),
        ("installed ", "install "),
        ("created ", "create "),
        ("recreated ", "recreate "),
        ("dropped ", "drop "),
        ("enabled ", "enable "),
        ("postgres source is ", "record postgres source "),
        ("publication ", "make publication "),
    ] {
        if let Some(rest) = done.strip_prefix(was) {
            let rest = if was == "publication " {
                rest.replacen(" names ", " name ", 1)
            } else {
                rest.to_string()
            };
            return format!("{to_do}{rest}");
        }
    }
    done.to_string()
}

/// The SQL a migration would run, in the transactions it would run it in (see [`plan`]).
#[derive(Debug, Default)]
pub struct Script {
    /// Each a transaction of its own, or a statement that must run outside one (creating a
    /// replication slot), with a comment saying what it is for.
    pub blocks: Vec<Block>,
}

/// One unit of a [`Script`].
#[derive(Debug)]
pub struct Block {
    /// What it is for, one line.
    pub comment: String,
    /// Whether its statements run in one transaction (with a short `lock_timeout`, as
    /// `migrate` runs them).
    pub transaction: bool,
    pub statements: Vec<String>,
}

impl Script {
    /// Whether the schema is up to date (nothing to run).
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().all(|b| b.statements.is_empty())
    }

    /// The script as one SQL file for psql or a migration tool (Flyway, Liquibase, Alembic,
    /// sqitch): each transaction between `BEGIN` and `COMMIT` with `SET LOCAL lock_timeout`
    /// (a lock request that waits makes every later query of that table wait behind it: on
    /// a lock timeout, run it again later), every statement ending in `;`.
    pub fn to_sql(&self) -> String {
        let mut out = String::new();
        for block in self.blocks.iter().filter(|b| !b.statements.is_empty()) {
            out.push_str(&format!("-- {}\n", one_line(&block.comment)));
            if !block.transaction {
                out.push_str("SET synchronous_commit = local;\n");
            }
            if block.transaction {
                // As `migrate` runs it: never holding a table's readers behind a lock wait
                // for long, never waiting for a synchronous standby (the relay among them).
                out.push_str(&format!(
                    "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\nSET LOCAL synchronous_commit = local;\n",
                    LOCK_TIMEOUT.as_millis()
                ));
            }
            for statement in &block.statements {
                out.push_str(statement.trim_end_matches(';'));
                out.push_str(";\n");
            }
            if block.transaction {
                out.push_str("COMMIT;\n");
            }
            out.push('\n');
        }
        out
    }
}

/// `text` on one line, for an SQL comment: a table name holding a newline must not start a
/// line of its own in the script (psql would run a `\` command there).
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Where the migration's statements go.
enum Sink {
    /// Run on the connection (`migrate`).
    Postgres,
    /// Written down ([`plan`]): the transaction is read-only, and rolled back.
    Script(Script),
}

impl Sink {
    fn is_plan(&self) -> bool {
        matches!(self, Sink::Script(_))
    }

    /// Starts a new block of the script (nothing when running).
    fn block(&mut self, comment: impl Into<String>, transaction: bool) {
        if let Sink::Script(script) = self {
            script.blocks.push(Block {
                comment: comment.into(),
                transaction,
                statements: Vec::new(),
            });
        }
    }

    /// Runs `sql` (statements without parameters), or writes it into the current block.
    async fn run(
        &mut self,
        client: &impl GenericClient,
        sql: String,
        doing: &'static str,
    ) -> Result<(), SchemaError> {
        match self {
            Sink::Postgres => client
                .batch_execute(&sql)
                .await
                .map_err(|source| SchemaError::Postgres { doing, source }),
            Sink::Script(script) => {
                if script.blocks.is_empty() {
                    script.blocks.push(Block {
                        comment: doing.into(),
                        transaction: true,
                        statements: Vec::new(),
                    });
                }
                script
                    .blocks
                    .last_mut()
                    .expect("a block")
                    .statements
                    .push(sql);
                Ok(())
            }
        }
    }

    /// Ends a transaction [`begin_locked`] started: committed when running, rolled back when
    /// planning.
    async fn commit(
        &self,
        tx: tokio_postgres::Transaction<'_>,
        doing: &'static str,
    ) -> Result<(), SchemaError> {
        let ended = match self {
            Sink::Postgres => tx.commit().await,
            Sink::Script(_) => tx.rollback().await,
        };
        ended.map_err(|source| SchemaError::Postgres { doing, source })
    }
}

/// Tries a migration (or an uninstall) again after a lock timeout, for up to
/// [`LOCK_RETRIES_FOR`], with the crate's one backoff.
struct LockRetries {
    started: std::time::Instant,
    backoff: crate::backoff::Backoff,
}

impl LockRetries {
    fn new() -> Self {
        LockRetries {
            started: std::time::Instant::now(),
            backoff: crate::backoff::Backoff::new(
                Duration::from_millis(50),
                Duration::from_secs(2),
            ),
        }
    }

    /// Whether to try again after `e`: a lock timeout within the time allowed, after saying
    /// who holds the lock and waiting the next pause.
    async fn again(
        &mut self,
        e: &SchemaError,
        what: &str,
        client: &tokio_postgres::Client,
        config: &Config,
    ) -> bool {
        if !e.is_lock_timeout() || self.started.elapsed() >= LOCK_RETRIES_FOR {
            return false;
        }
        let pause = self.backoff.next_pause();
        let held = lock_holders(client, config).await;
        tracing::warn!(
            step = e.step(),
            held_by = %held,
            retry_in_ms = pause.as_millis() as u64,
            "the {what} waited {} ms for a table lock and gave up, so as not to hold that \
             table's readers and writers behind it; retrying",
            LOCK_TIMEOUT.as_millis()
        );
        tokio::time::sleep(pause).await;
        true
    }
}

/// How long one statement of the migration waits for a table lock. While a lock request
/// waits, every later request for that table queues behind it, readers included: so it
/// waits briefly and the whole migration is tried again later.
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(20);

/// How long [`migrate`] goes on retrying a migration that could not get its locks.
const LOCK_RETRIES_FOR: Duration = Duration::from_secs(60);

/// Who holds locks on the configured tables (and syncar's), for the log: pid, state, how
/// long its transaction has been open, and the start of its query.
async fn lock_holders(client: &tokio_postgres::Client, config: &Config) -> String {
    let tables: Vec<String> = std::iter::once(format!("{}.syncar_kv", config.postgres.schema))
        .chain(
            config
                .resources
                .iter()
                .map(|r| format!("{}.{}", r.schema, r.table)),
        )
        .collect();
    let rows = client
        .query(
            "SELECT DISTINCT l.relation::regclass::text, a.pid, coalesce(a.state, ''), \
                    coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8, \
                    left(coalesce(a.query, ''), 60) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE l.granted AND a.pid <> pg_backend_pid() \
               AND n.nspname || '.' || c.relname = ANY($1) \
             ORDER BY 4 DESC LIMIT 3",
            &[&tables],
        )
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => "nobody now".into(),
        Ok(rows) => rows
            .iter()
            .map(|r| {
                let (table, pid, state, secs, query): (String, i32, String, f64, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                format!("{table}: pid {pid}, {state} for {secs:.1} s ({query})")
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Adds each configured table's missing version column, each in a transaction of its own
/// that commits at once: `ADD COLUMN` holds ACCESS EXCLUSIVE until its transaction ends, and
/// the rest of the migration (dozens of statements) must not keep the table's readers
/// waiting that long. A column added without the triggers yet is harmless: the resource is
/// not served until they are installed, and rows written meanwhile read as version 0.
/// Whether `table`'s column `column` defaults to syncar's sequence: syncar added it (now,
/// or in a migration that was retried, or an earlier release's), so every version in it
/// came from the sequence and needs no alignment (a scan of the whole table).
async fn versioned_by_syncar(
    tx: &tokio_postgres::Transaction<'_>,
    table: u32,
    column: &str,
) -> Result<bool, SchemaError> {
    let default: Option<String> = tx
        .query_opt(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d \
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
             WHERE d.adrelid = $1 AND a.attname = $2",
            &[&table, &column],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up a version column's default",
            source,
        })?
        .map(|row| row.get(0));
    Ok(default.is_some_and(|d| d.contains(VERSION_SEQUENCE)))
}

/// Returns the changes.
async fn add_version_columns(
    client: &mut tokio_postgres::Client,
    config: &Config,
    sink: &mut Sink,
) -> Result<Vec<String>, SchemaError> {
    let mut changes = Vec::new();
    for r in &config.resources {
        let tx = begin_locked(client, sink.is_plan()).await?;
        let missing = match fit(&tx, r).await {
            Ok((info, _)) => info.columns.iter().all(|c| c.name != r.version_column),
            Err(SchemaError::Invalid(_)) => false, // left out by the migration, saying why
            Err(e) => return Err(e),
        };
        if missing {
            // The default below names the sequence: make sure it exists (the main
            // transaction reports nothing then).
            let schema = &config.postgres.schema;
            let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
            sink.block(
                format!(
                    "the version column of {qualified}: nullable, then the sequence as its \
                     default for new rows (catalog changes only, no rewrite)"
                ),
                true,
            );
            sink.run(
                &tx,
                format!(
                    "CREATE SCHEMA IF NOT EXISTS {s}; CREATE SEQUENCE IF NOT EXISTS {s}.{VERSION_SEQUENCE}",
                    s = quote_ident(schema)
                ),
                "creating the version sequence",
            )
            .await?;
            // Nullable and without a default: a change of the catalog only (Postgres 11+),
            // which does not rewrite the table. A volatile default would give every row its
            // own version by rewriting the whole table under ACCESS EXCLUSIVE (3.4 s for 3
            // million rows). A row not written since reads as version 0, older than every
            // version syncar hands out; its first write stamps it.
            // The default, set in a second statement, applies to rows inserted from now on
            // only (a catalog change too): a row inserted with the triggers disabled (a
            // restore with --disable-triggers) still takes a version.
            let column = quote_ident(&r.version_column);
            sink.run(
                &tx,
                format!(
                    "ALTER TABLE {qualified} ADD COLUMN {column} bigint; \
                     ALTER TABLE {qualified} ALTER COLUMN {column} SET DEFAULT nextval({})",
                    quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
                ),
                "adding a version column",
            )
            .await?;
            changes.push(format!(
                "added column {} to table {qualified}",
                r.version_column
            ));
        }
        sink.commit(tx, "adding a version column").await?;
    }
    Ok(changes)
}

async fn migrate_once(
    client: &mut tokio_postgres::Client,
    config: &Config,
    sink: &mut Sink,
) -> Result<Migration, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let mut changes = add_version_columns(client, config, sink).await?;
    let tx = begin_locked(client, sink.is_plan()).await?;
    sink.block(
        "syncar's own objects, its triggers and (wal) the publication, in one transaction",
        true,
    );
    let schema = &config.postgres.schema;
    let s = quote_ident(schema);

    let has_schema: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[schema],
        )
        .await
        .map_err(pg("looking up the schema"))?
        .get(0);
    if !has_schema {
        // (IF NOT EXISTS: a script's earlier block may have created it already.)
        sink.run(
            &tx,
            format!("CREATE SCHEMA IF NOT EXISTS {s}"),
            "creating the schema",
        )
        .await?;
        changes.push(format!("created schema {schema}"));
    }

    if table_oid(&tx, schema, VERSION_SEQUENCE, "S")
        .await?
        .is_none()
    {
        sink.run(
            &tx,
            format!("CREATE SEQUENCE IF NOT EXISTS {s}.{VERSION_SEQUENCE}"),
            "creating the version sequence",
        )
        .await?;
        changes.push(format!("created sequence {schema}.{VERSION_SEQUENCE}"));
    }

    // An install by an earlier release: it has the changes log but no recorded source.
    let earlier_install = table_oid(&tx, schema, CHANGES_TABLE, "r").await?.is_some();
    if !earlier_install {
        sink.run(
            &tx,
            format!(
                "CREATE TABLE {s}.{CHANGES_TABLE} (\
                   at timestamptz NOT NULL DEFAULT clock_timestamp(), \
                   xid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint), \
                   version bigint NOT NULL, resource text NOT NULL, key text, op text NOT NULL); \
                 CREATE INDEX {CHANGES_TABLE}_at ON {s}.{CHANGES_TABLE} (at); \
                 CREATE INDEX {CHANGES_TABLE}_xid ON {s}.{CHANGES_TABLE} (xid)"
            ),
            "creating the changes log",
        )
        .await?;
        changes.push(format!("created table {schema}.{CHANGES_TABLE}"));
    }

    let has_state = table_oid(&tx, schema, STATE_TABLE, "r").await?.is_some();
    if !has_state {
        sink.run(
            &tx,
            format!("CREATE TABLE {s}.{STATE_TABLE} (name text PRIMARY KEY, value text NOT NULL)"),
            "creating the state table",
        )
        .await?;
        changes.push(format!("created table {schema}.{STATE_TABLE}"));
    }

    if table_oid(&tx, schema, "syncar_kv", "r").await?.is_none() {
        sink.run(
            &tx,
            format!(
                "CREATE TABLE {s}.syncar_kv (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL)"
            ),
            "creating the kv table",
        )
        .await?;
        changes.push(format!("created table {schema}.syncar_kv"));
    }

    let kv = kv_resource(schema);
    let mut tables: Vec<(&ResourceConfig, TableInfo)> = Vec::new();
    let mut unavailable = Vec::new();
    let kv_planned = sink.is_plan() && table_oid(&tx, schema, "syncar_kv", "r").await?.is_none();
    for r in std::iter::once(&kv).chain(&config.resources) {
        if r.name == KV_RESOURCE && kv_planned {
            // Planned above, so not in the catalog: described as it will be.
            tables.push((r, kv_table_info()));
            continue;
        }
        // One configured table that does not fit is left out; the others are migrated.
        let mut info = match fit(&tx, r).await {
            Ok((info, _)) => info,
            Err(SchemaError::Invalid(reason)) if r.name != KV_RESOURCE => {
                unavailable.push(reason);
                continue;
            }
            Err(e) => return Err(e),
        };
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        if info.columns.iter().all(|c| c.name != r.version_column) && sink.is_plan() {
            // Planned by `add_version_columns`: it will take the next attribute number.
            let natts: i16 = tx
                .query_one("SELECT relnatts FROM pg_class WHERE oid = $1", &[&info.oid])
                .await
                .map_err(pg("looking up a table's columns"))?
                .get(0);
            info.columns.push(ColumnInfo {
                num: natts + 1,
                name: r.version_column.clone(),
                type_oid: INT8_OID,
                type_name: "bigint".into(),
                readonly: false,
            });
        } else if info.columns.iter().all(|c| c.name != r.version_column) {
            // Added by `add_version_columns` unless the table appeared since.
            tx.batch_execute(&format!(
                "ALTER TABLE {qualified} ADD COLUMN {} bigint",
                quote_ident(&r.version_column),
            ))
            .await
            .map_err(pg("adding a version column"))?;
            changes.push(format!(
                "added column {} to table {qualified}",
                r.version_column
            ));
            info = describe_table(&tx, r).await?;
        }
        tables.push((r, info));
    }
    let described: Vec<(&ResourceConfig, &TableInfo)> =
        tables.iter().map(|(r, info)| (*r, info)).collect();
    // (A plan on a fresh database reads no state table: it is only planned.)
    let recorded: Option<String> = if has_state {
        tx.query_opt(
            &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = 'source'"),
            &[],
        )
        .await
        .map_err(pg("reading the state table"))?
        .map(|row| row.get(0))
    } else {
        None
    };
    // `auto` decides once, on a fresh install: switching a running deployment's source under
    // instances that poll the log (or listen) would leave them vouching for a log that no
    // longer hears inserts and updates. Instances of an earlier release know nothing of the
    // recorded source, so their install keeps the changes log too.
    let recorded_source = match recorded.as_deref() {
        Some("wal") => Some(PostgresSource::Wal),
        Some("notify") => Some(PostgresSource::Notify),
        Some("changes_log") => Some(PostgresSource::ChangesLog),
        _ => None,
    };
    let auto = config.feeds.postgres_source == PostgresSource::Auto;
    let (source, reason) = match (auto, recorded_source, earlier_install) {
        (true, Some(kept), _) => {
            let reason: Option<String> = tx
                .query_opt(
                    &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = 'source_reason'"),
                    &[],
                )
                .await
                .map_err(pg("reading the state table"))?
                .map(|row| row.get(0));
            (kept, reason.unwrap_or_else(|| "auto: kept".into()))
        }
        (true, None, true) => (
            PostgresSource::ChangesLog,
            "auto: kept the changes log of an install by an earlier release; set \
             postgres_source = \"wal\" on every instance (all restarted) to switch"
                .to_string(),
        ),
        _ => capture::resolve(&tx, config, &described).await?,
    };
    for (name, value) in [
        ("source", source.as_str()),
        ("source_reason", reason.as_str()),
    ] {
        let current: Option<String> = if has_state {
            tx.query_opt(
                &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(pg("reading the state table"))?
            .map(|row| row.get(0))
        } else {
            None
        };
        if current.as_deref() != Some(value) {
            sink.run(
                &tx,
                capture::write_state_sql(schema, name, value),
                "writing the state table",
            )
            .await?;
            if name == "source" {
                changes.push(format!("postgres source is {value} ({reason})"));
            }
        }
    }
    let announce = match source {
        PostgresSource::Wal => Announce::Wal,
        PostgresSource::Notify => Announce::Notify,
        _ => Announce::Log,
    };
    // The statements that lock a table against its writers, run together at the end.
    let mut locking: Vec<String> = Vec::new();
    for (r, info) in &tables {
        let (r, info) = (*r, info);
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        let stamp = function_name("syncar_stamp", &r.name);
        let version_attnum = info
            .columns
            .iter()
            .find(|c| c.name == r.version_column)
            .map_or(0, |c| c.num);
        let announce_fn = function_name("syncar_announce", &r.name);
        // TRUNCATE has a function of its own: an earlier release rolled back to rewrites
        // `syncar_announce_*` with its own body, which knows no TRUNCATE.
        let truncate_fn = function_name("syncar_truncate", &r.name);
        for (function, body) in [
            (&stamp, stamp_function_body(schema, r, version_attnum)),
            (&announce_fn, announce_function_body(schema, r, announce)),
            (&truncate_fn, truncate_function_body(schema, r, announce)),
        ] {
            if install_function(&tx, sink, schema, function, &body).await? {
                changes.push(format!("installed function {schema}.{function}()"));
            }
        }
        // Name, definition, and what pg_trigger must say: function, type bits, transition
        // tables (old, new). Only the source's own are kept.
        let all = [
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
                &announce_fn,
                TG_INSERT,
                (None, Some("syncar_new")),
            ),
            (
                LOG_TRIGGERS[1],
                "AFTER UPDATE",
                "REFERENCING OLD TABLE AS syncar_old NEW TABLE AS syncar_new FOR EACH STATEMENT",
                &announce_fn,
                TG_UPDATE,
                (Some("syncar_old"), Some("syncar_new")),
            ),
            (
                LOG_TRIGGERS[2],
                "AFTER DELETE",
                "REFERENCING OLD TABLE AS syncar_old FOR EACH STATEMENT",
                &announce_fn,
                TG_DELETE,
                (Some("syncar_old"), None),
            ),
            (
                LOG_TRIGGERS[3],
                "AFTER TRUNCATE",
                "FOR EACH STATEMENT",
                &truncate_fn,
                TG_TRUNCATE,
                (None, None),
            ),
        ];
        let wanted_names = wanted_triggers(source, info.identity == Identity::ExcludesKey);
        for (trigger, ..) in all.iter().filter(|t| !wanted_names.contains(&t.0)) {
            let exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
                    &[&info.oid, trigger],
                )
                .await
                .map_err(pg("looking up triggers"))?
                .get(0);
            if exists {
                sink.run(
                    &tx,
                    format!("DROP TRIGGER {trigger} ON {qualified}"),
                    "dropping a trigger",
                )
                .await?;
                changes.push(format!("dropped trigger {trigger} on {qualified}"));
            }
        }
        let triggers = all.into_iter().filter(|t| wanted_names.contains(&t.0));
        for (trigger, timing, level, function, tgtype, (old, new)) in triggers {
            type Installed = (String, String, i16, Option<String>, Option<String>);
            let current: Option<(Installed, String)> = tx
                .query_opt(
                    "SELECT n.nspname::text, p.proname::text, t.tgtype, t.tgoldtable::text, \
                            t.tgnewtable::text, t.tgenabled::text FROM pg_trigger t \
                     JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE t.tgrelid = $1 AND t.tgname = $2",
                    &[&info.oid, &trigger],
                )
                .await
                .map_err(pg("looking up triggers"))?
                .map(|row| {
                    (
                        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)),
                        row.get(5),
                    )
                });
            if current.is_none()
                && trigger == STAMP_TRIGGER
                && !versioned_by_syncar(&tx, info.oid, &r.version_column).await?
            {
                // Adopting a table: versions already in it (an existing bigint column) must
                // stay below every version the trigger hands out from now on. (A column
                // syncar added holds only versions of its sequence: no scan of a large table
                // for nothing.)
                sink.run(
                    &tx,
                    format!(
                        "SELECT setval({seq}, m) FROM (SELECT max({col}) AS m FROM {qualified}) x \
                         WHERE m >= (SELECT last_value FROM {s}.{VERSION_SEQUENCE})",
                        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
                        col = quote_ident(&r.version_column),
                    ),
                    "aligning the version sequence",
                )
                .await?;
            }
            let wanted: Installed = (
                schema.clone(),
                function.clone(),
                tgtype,
                old.map(String::from),
                new.map(String::from),
            );
            let (installed, enabled) = match current {
                Some((installed, enabled)) => (Some(installed), enabled),
                None => (None, String::new()),
            };
            if installed.as_ref() != Some(&wanted) {
                // Dropped first: CREATE OR REPLACE cannot turn a row trigger into a statement
                // trigger with transition tables.
                locking.push(format!(
                    "DROP TRIGGER IF EXISTS {trigger} ON {qualified}; \
                     CREATE TRIGGER {trigger} {timing} ON {qualified} {level} \
                     EXECUTE FUNCTION {s}.{}()",
                    quote_ident(function)
                ));
                changes.push(format!("installed trigger {trigger} on {qualified}"));
            }
            if installed.as_ref() != Some(&wanted) || enabled != "A" {
                // Fired whatever session_replication_role says: rows written by logical
                // replication apply or a restore tool take a version and are announced too.
                locking.push(format!(
                    "ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER {trigger}"
                ));
                if installed.as_ref() == Some(&wanted) {
                    changes.push(format!("enabled trigger {trigger} on {qualified} always"));
                }
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
            sink.run(
                &tx,
                format!("DROP TRIGGER {LEGACY_NOTIFY_TRIGGER} ON {qualified}"),
                "dropping an old trigger",
            )
            .await?;
            changes.push(format!(
                "dropped trigger {LEGACY_NOTIFY_TRIGGER} on {qualified}"
            ));
        }
    }
    let slot = capture::slot_name(&tx, config).await?;
    if source == PostgresSource::Wal {
        // Every column is published, never a column list: Postgres refuses UPDATE and
        // DELETE on a table whose publication's column list does not cover its replica
        // identity, and refuses to drop a listed column, so a list would make the
        // customer's own `REPLICA IDENTITY FULL` or `DROP COLUMN` fail because of syncar.
        let published: Vec<capture::Published> = tables
            .iter()
            .map(|(r, _)| (r.schema.clone(), r.table.clone(), None))
            .collect();
        if let Some((sql, change)) =
            capture::publication_change(&tx, &config.feeds.wal_publication, &published).await?
        {
            sink.run(&tx, sql, "creating the publication").await?;
            changes.push(change);
        }
    }
    // Last, in one round trip: creating a trigger locks out the table's writers (SHARE ROW
    // EXCLUSIVE) until the commit, so little else of the migration runs while they wait
    // (only the drop of earlier releases' functions, which must come after their triggers).
    if !locking.is_empty() {
        sink.run(&tx, locking.join("; "), "creating triggers")
            .await?;
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
            sink.run(
                &tx,
                format!("DROP FUNCTION {s}.{legacy}"),
                "dropping old trigger functions",
            )
            .await?;
            changes.push(format!("dropped function {schema}.{legacy}()"));
        }
    }
    sink.commit(tx, "committing the migration").await?;
    // A slot is created in a transaction of its own (Postgres refuses one that wrote).
    if source == PostgresSource::Wal {
        let (state, statements) = capture::slot_plan(client, schema, &slot).await?;
        sink.block(
            "the replication slot, outside any transaction that wrote (Postgres refuses it \
             there), by a role that may replicate",
            false,
        );
        for sql in statements {
            sink.run(client, sql, "creating the replication slot")
                .await?;
        }
        match state {
            SlotState::Kept => {}
            SlotState::Created => changes.push(format!("created replication slot {slot}")),
            SlotState::Missing => changes.push(format!(
                "created replication slot {slot}: the one syncar had created is not on this \
                 server (a failover it did not follow, or dropped)"
            )),
            SlotState::Recreated => changes.push(format!(
                "recreated replication slot {slot}: it had been invalidated"
            )),
        }
    } else if let Some(sql) = capture::idle_slot(client, &slot).await? {
        sink.block(
            "a syncar slot nobody reads retains WAL until the disk is full",
            false,
        );
        sink.run(client, sql, "dropping the replication slot")
            .await?;
        changes.push(format!("dropped replication slot {slot}"));
    }
    Ok(Migration {
        changes,
        unavailable,
    })
}

/// What [`migrate`] did (or [`plan`] would do).
#[derive(Debug, Default)]
pub struct Migration {
    /// What it changed, one line per change; empty when the schema was up to date. From
    /// [`plan`], what it would change ("add column version to table public.orders").
    pub changes: Vec<String>,
    /// Configured resources it left out, each with why (a table that does not exist…).
    pub unavailable: Vec<String>,
}

/// Creates or replaces a trigger function unless its body is already `body`. Returns whether
/// it changed anything.
async fn install_function(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
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
    sink.run(
        tx,
        format!(
            "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql AS {}",
            quote_ident(schema),
            quote_ident(name),
            dollar_quote(body)
        ),
        "creating trigger functions",
    )
    .await?;
    Ok(true)
}

/// Starts the transaction `migrate` and `uninstall` run in, holding the migration lock (one
/// at a time across instances) with a `lock_timeout` of [`LOCK_TIMEOUT`]: adding a column
/// or changing triggers locks each table, and a lock request queued behind a long reader
/// blocks every later query of that table, so give up at once instead ([`migrate`] retries
/// with backoff, `serve` too).
///
/// # Errors
/// Postgres failing.
async fn begin_locked(
    client: &mut tokio_postgres::Client,
    read_only: bool,
) -> Result<tokio_postgres::Transaction<'_>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    // A plan only looks: read-only, so nothing it runs can change anything.
    let tx = client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await
        .map_err(pg("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg("taking the migration lock"))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis()
    ))
    .await
    .map_err(pg("setting lock_timeout"))?;
    Ok(tx)
}

/// `syncar uninstall`: removes what makes syncar cost every writer and the primary's disk:
/// the triggers on every configured table (and `kv`), their functions, the publication and
/// the replication slot. Keeps the data: version columns, the sequence, `syncar_kv`, the
/// changes log and the state table stay (a later `migrate` adopts them again).
///
/// Returns what it removed, one line per object.
///
/// # Errors
/// The slot is being streamed (stop every instance first), or Postgres failing.
pub async fn uninstall(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<String>, SchemaError> {
    let mut retries = LockRetries::new();
    loop {
        match uninstall_once(client, config).await {
            Err(e) if retries.again(&e, "uninstall", client, config).await => {}
            result => return result,
        }
    }
}

async fn uninstall_once(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<String>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let schema = &config.postgres.schema;
    let mut changes = Vec::new();
    let slot = capture::slot_name(&*client, config).await?;
    let active: Option<bool> = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?
        .map(|r| r.get(0));
    if active == Some(true) {
        return Err(SchemaError::Invalid(format!(
            "replication slot {slot} is being streamed by a relay: stop every syncar instance \
             (and `syncar relay`) first"
        )));
    }
    if let Some(change) = capture::drop_idle_slot(&*client, &slot).await? {
        changes.push(change);
    }
    let tx = begin_locked(client, false).await?;
    let publication = &config.feeds.wal_publication;
    let published: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[publication],
        )
        .await
        .map_err(pg("looking up the publication"))?
        .get(0);
    if published {
        tx.batch_execute(&format!("DROP PUBLICATION {}", quote_ident(publication)))
            .await
            .map_err(pg("dropping the publication"))?;
        changes.push(format!("dropped publication {publication}"));
    }
    let kv = kv_resource(schema);
    for r in std::iter::once(&kv).chain(&config.resources) {
        let Some(oid) = table_oid(&tx, &r.schema, &r.table, "r").await? else {
            continue;
        };
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        for trigger in std::iter::once(STAMP_TRIGGER)
            .chain(LOG_TRIGGERS)
            .chain([LEGACY_NOTIFY_TRIGGER])
        {
            let exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
                    &[&oid, &trigger],
                )
                .await
                .map_err(pg("looking up triggers"))?
                .get(0);
            if exists {
                tx.batch_execute(&format!("DROP TRIGGER {trigger} ON {qualified}"))
                    .await
                    .map_err(pg("dropping a trigger"))?;
                changes.push(format!("dropped trigger {trigger} on {qualified}"));
            }
        }
        for function in [
            function_name("syncar_stamp", &r.name),
            function_name("syncar_announce", &r.name),
            function_name("syncar_truncate", &r.name),
        ] {
            let unused: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname = $1 AND p.proname = $2) AND NOT EXISTS (SELECT 1 FROM pg_trigger t \
                     JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname = $1 AND p.proname = $2)",
                    &[schema, &function],
                )
                .await
                .map_err(pg("looking up trigger functions"))?
                .get(0);
            if unused {
                tx.batch_execute(&format!(
                    "DROP FUNCTION {}.{}()",
                    quote_ident(schema),
                    quote_ident(&function)
                ))
                .await
                .map_err(pg("dropping trigger functions"))?;
                changes.push(format!("dropped function {schema}.{function}()"));
            }
        }
    }
    // An install by an earlier release has no state table.
    if table_oid(&tx, schema, STATE_TABLE, "r").await?.is_some() {
        tx.execute(
            &format!(
                "DELETE FROM {}.{STATE_TABLE} WHERE name IN ('source', 'source_reason')",
                quote_ident(schema)
            ),
            &[],
        )
        .await
        .map_err(pg("clearing the state table"))?;
    }
    tx.commit().await.map_err(pg("committing the uninstall"))?;
    Ok(changes)
}

/// The built-in resource as a configured one.
/// `syncar_kv` as the migration creates it, for a plan on a database that lacks it.
fn kv_table_info() -> TableInfo {
    let column = |num, name: &str, type_oid, type_name: &str| ColumnInfo {
        num,
        name: name.into(),
        type_oid,
        type_name: type_name.into(),
        readonly: false,
    };
    TableInfo {
        oid: 0,
        columns: vec![
            column(1, "key", 25, "text"),
            column(2, "value", 3802, "jsonb"),
            column(3, "version", INT8_OID, "bigint"),
        ],
        unique_key: true,
        identity: Identity::IncludesKey,
    }
}

fn kv_resource(schema: &str) -> ResourceConfig {
    ResourceConfig {
        name: KV_RESOURCE.into(),
        table: "syncar_kv".into(),
        schema: schema.to_string(),
        key: "key".into(),
        version_column: "version".into(),
        l1_ttl: None,
        l2_ttl: None,
        negative_ttl: None,
        tombstone_ttl: None,
    }
}
