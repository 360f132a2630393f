//! A table's trigger functions and triggers, as its source wants them: functions created or
//! replaced where their body differs, the wanted triggers installed and enabled always, the
//! others dropped, and what earlier releases left removed once unused. Creates no table
//! and no column.

use super::error::SchemaError;
use super::names::{
    wanted_triggers, LEGACY_FUNCTIONS, LEGACY_NOTIFY_TRIGGER, LOG_TRIGGERS, STAMP_EXTENSION,
    STAMP_TRIGGER, TG_BEFORE, TG_DELETE, TG_INSERT, TG_ROW, TG_TRUNCATE, TG_UPDATE,
    VERSION_SEQUENCE,
};
use super::script::Sink;
use super::stamp::StampFunction;
use super::table::{Identity, TableInfo};
use super::triggers::{
    announce_function_body, dollar_quote, function_name, stamp_function_body,
    truncate_function_body, Announce,
};
use crate::config::{PostgresSource, ResourceConfig, KV_RESOURCE};
use crate::resource::{quote_ident, quote_literal};

/// One configured table (or `kv`) the migration installs on.
pub(super) struct Table<'a> {
    /// syncar's schema, where the trigger functions live.
    pub(super) schema: &'a str,
    pub(super) r: &'a ResourceConfig,
    pub(super) info: &'a TableInfo,
    /// `"schema"."table"`, quoted.
    pub(super) qualified: String,
}

/// Installs `table`'s trigger functions and triggers for `source`, with `stamp` as its
/// version stamp, in `tx`: the functions at once (the PL/pgSQL stamp's too, the fallback
/// `postgres.stamp = "plpgsql"` switches to); the drops of unwanted triggers at once; the
/// statements that create or enable a trigger (which lock out the table's writers until the
/// commit) appended to `locking`, to run together at the end. Appends a line to `changes`
/// for each change.
///
/// # Errors
/// Postgres failing.
pub(super) async fn install_table(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    table: &Table<'_>,
    source: PostgresSource,
    stamp: &StampFunction,
    locking: &mut Vec<String>,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let functions = install_functions(tx, sink, table, source, changes).await?;
    let all = trigger_specs(table, &functions, stamp);
    let wanted = wanted_triggers(source, table.info.identity == Identity::ExcludesKey);
    for spec in all.iter().filter(|t| !wanted.contains(&t.name)) {
        drop_trigger_if_there(tx, sink, table, spec.name, "dropping a trigger", changes).await?;
    }
    for spec in all.iter().filter(|t| wanted.contains(&t.name)) {
        install_trigger(tx, sink, table, spec, locking, changes).await?;
    }
    drop_trigger_if_there(
        tx,
        sink,
        table,
        LEGACY_NOTIFY_TRIGGER,
        "dropping an old trigger",
        changes,
    )
    .await
}

/// Drops the generic trigger functions of earlier releases ([`LEGACY_FUNCTIONS`]) that no
/// trigger uses any more: a table no longer configured may still call one. Runs after the
/// triggers that replace them. Appends a line to `changes` for each.
///
/// # Errors
/// Postgres failing.
pub(super) async fn drop_legacy_functions(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    for legacy in LEGACY_FUNCTIONS {
        // Dropped only once unused: a table no longer configured may still call one.
        let unused: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND p.proname = $2) AND NOT EXISTS (SELECT 1 FROM pg_trigger t \
                 JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND (p.proname = $2 OR ($2 = 'syncar_send' AND p.proname = 'syncar_notify')))",
                &[&schema, &legacy],
            )
            .await
            .map_err(|source| SchemaError::Postgres {
                doing: "looking up old trigger functions",
                source,
            })?
            .get(0);
        if unused {
            sink.run(
                tx,
                format!("DROP FUNCTION {}.{legacy}", quote_ident(schema)),
                "dropping old trigger functions",
            )
            .await?;
            changes.push(format!("dropped function {schema}.{legacy}()"));
        }
    }
    Ok(())
}

/// The names of a table's three trigger functions, and its version column's attribute
/// number (0 while the column is still to be added).
struct Functions {
    /// Stamps each row with a fresh version.
    stamp: String,
    /// Announces what a statement changed.
    announce: String,
    /// Announces a TRUNCATE: a function of its own, since an earlier release rolled back to
    /// rewrites `syncar_announce_*` with its own body, which knows no TRUNCATE.
    truncate: String,
    version_attnum: i16,
    /// The table's OID, on which alone the stamp may find a renamed version column by its
    /// attribute number; 0 for none.
    fallback_oid: u32,
}

/// One of syncar's triggers: its name, definition, and what `pg_trigger` must say of it.
struct TriggerSpec<'f> {
    name: &'static str,
    /// `BEFORE ...` or `AFTER ...`, with its events.
    timing: &'static str,
    /// `FOR EACH ...`, with the transition tables.
    level: &'static str,
    /// The function's schema and name.
    function: (&'f str, &'f str),
    /// The arguments the trigger passes it (`pg_trigger.tgargs`).
    args: Vec<String>,
    /// `pg_trigger.tgtype`.
    tgtype: i16,
    /// `pg_trigger.tgoldtable`, `tgnewtable`.
    transition: (Option<&'static str>, Option<&'static str>),
}

/// What `pg_trigger` says of an installed trigger: its function's schema and name, its
/// type bits, its transition tables, its arguments.
type Installed = (
    String,
    String,
    i16,
    Option<String>,
    Option<String>,
    Vec<String>,
);

/// Creates or replaces `table`'s three trigger functions where their bodies differ.
async fn install_functions(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    table: &Table<'_>,
    source: PostgresSource,
    changes: &mut Vec<String>,
) -> Result<Functions, SchemaError> {
    let (schema, r) = (table.schema, table.r);
    let announce = match source {
        PostgresSource::Wal => Announce::Wal,
        PostgresSource::Notify => Announce::Notify,
        _ => Announce::Log,
    };
    let version_attnum = table
        .info
        .columns
        .iter()
        .find(|c| c.name == r.version_column)
        .map_or(0, |c| c.num);
    // `syncar_kv`'s version column is syncar's own, never renamed, and a plan may write its
    // triggers before the table exists (no OID yet): no fallback there.
    let fallback_oid = if r.name == KV_RESOURCE {
        0
    } else {
        table.info.oid
    };
    let functions = Functions {
        stamp: function_name("syncar_stamp", &r.name),
        announce: function_name("syncar_announce", &r.name),
        truncate: function_name("syncar_truncate", &r.name),
        version_attnum,
        fallback_oid,
    };
    // The log-writing announcements insert into the changes log, which a writer's role has
    // no grant on: they run as their owner (see [`Security::Definer`]). With `wal` they
    // take versions and emit messages, which any role may.
    let announcing = if announce == Announce::Wal {
        Security::Invoker
    } else {
        Security::Definer
    };
    for (function, body, security) in [
        (
            &functions.stamp,
            stamp_function_body(schema, r, version_attnum, fallback_oid),
            Security::Invoker,
        ),
        (
            &functions.announce,
            announce_function_body(schema, r, announce),
            announcing,
        ),
        (
            &functions.truncate,
            truncate_function_body(schema, r, announce),
            announcing,
        ),
    ] {
        if install_function(tx, sink, schema, function, &body, security).await? {
            changes.push(format!("installed function {schema}.{function}()"));
        }
    }
    Ok(functions)
}

/// Every trigger syncar may put on `table`, with `stamp` as its version stamp; which of them
/// a table gets depends on the source ([`wanted_triggers`]).
fn trigger_specs<'f>(
    table: &'f Table<'_>,
    functions: &'f Functions,
    stamp: &'f StampFunction,
) -> [TriggerSpec<'f>; 5] {
    let own = |function: &'f str| (table.schema, function);
    let (stamp_function, stamp_args) = match stamp {
        StampFunction::Plpgsql => (own(&functions.stamp), Vec::new()),
        // The C stamp takes by argument what the PL/pgSQL one has written into its body.
        StampFunction::Extension { schema } => (
            (schema.as_str(), STAMP_EXTENSION),
            vec![
                table.r.version_column.clone(),
                functions.version_attnum.to_string(),
                functions.fallback_oid.to_string(),
                table.schema.to_string(),
                VERSION_SEQUENCE.to_string(),
            ],
        ),
    };
    [
        TriggerSpec {
            name: STAMP_TRIGGER,
            timing: "BEFORE INSERT OR UPDATE",
            level: "FOR EACH ROW",
            function: stamp_function,
            args: stamp_args,
            tgtype: TG_ROW | TG_BEFORE | TG_INSERT | TG_UPDATE,
            transition: (None, None),
        },
        TriggerSpec {
            name: LOG_TRIGGERS[0],
            timing: "AFTER INSERT",
            level: "REFERENCING NEW TABLE AS syncar_new FOR EACH STATEMENT",
            function: own(&functions.announce),
            args: Vec::new(),
            tgtype: TG_INSERT,
            transition: (None, Some("syncar_new")),
        },
        TriggerSpec {
            name: LOG_TRIGGERS[1],
            timing: "AFTER UPDATE",
            level: "REFERENCING OLD TABLE AS syncar_old NEW TABLE AS syncar_new FOR EACH STATEMENT",
            function: own(&functions.announce),
            args: Vec::new(),
            tgtype: TG_UPDATE,
            transition: (Some("syncar_old"), Some("syncar_new")),
        },
        TriggerSpec {
            name: LOG_TRIGGERS[2],
            timing: "AFTER DELETE",
            level: "REFERENCING OLD TABLE AS syncar_old FOR EACH STATEMENT",
            function: own(&functions.announce),
            args: Vec::new(),
            tgtype: TG_DELETE,
            transition: (Some("syncar_old"), None),
        },
        TriggerSpec {
            name: LOG_TRIGGERS[3],
            timing: "AFTER TRUNCATE",
            level: "FOR EACH STATEMENT",
            function: own(&functions.truncate),
            args: Vec::new(),
            tgtype: TG_TRUNCATE,
            transition: (None, None),
        },
    ]
}

/// Drops the trigger `name` from `table` if it is there.
async fn drop_trigger_if_there(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    table: &Table<'_>,
    name: &str,
    doing: &'static str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2)",
            &[&table.info.oid, &name],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up triggers",
            source,
        })?
        .get(0);
    if exists {
        let qualified = &table.qualified;
        sink.run(tx, format!("DROP TRIGGER {name} ON {qualified}"), doing)
            .await?;
        changes.push(format!("dropped trigger {name} on {qualified}"));
    }
    Ok(())
}

/// Makes the wanted trigger `spec` of `table` what it must be: (re)created where
/// `pg_trigger` says otherwise, and enabled always, by statements appended to `locking`.
/// Before the version stamp first goes on a table syncar did not version, the sequence is
/// moved past the versions already in it.
async fn install_trigger(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    table: &Table<'_>,
    spec: &TriggerSpec<'_>,
    locking: &mut Vec<String>,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let (trigger, qualified) = (spec.name, &table.qualified);
    let current: Option<(Installed, String)> = tx
        .query_opt(
            "SELECT n.nspname::text, p.proname::text, t.tgtype, t.tgoldtable::text, \
                    t.tgnewtable::text, t.tgargs, t.tgenabled::text FROM pg_trigger t \
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE t.tgrelid = $1 AND t.tgname = $2",
            &[&table.info.oid, &trigger],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up triggers",
            source,
        })?
        .map(|row| {
            (
                (
                    row.get(0),
                    row.get(1),
                    row.get(2),
                    row.get(3),
                    row.get(4),
                    trigger_args(row.get(5)),
                ),
                row.get(6),
            )
        });
    if current.is_none()
        && trigger == STAMP_TRIGGER
        && !versioned_by_syncar(tx, table.info.oid, &table.r.version_column).await?
    {
        align_sequence(tx, sink, table).await?;
    }
    let wanted: Installed = (
        spec.function.0.to_string(),
        spec.function.1.to_string(),
        spec.tgtype,
        spec.transition.0.map(String::from),
        spec.transition.1.map(String::from),
        spec.args.clone(),
    );
    let (installed, enabled) = match current {
        Some((installed, enabled)) => (Some(installed), enabled),
        None => (None, String::new()),
    };
    if installed.as_ref() != Some(&wanted) {
        // Dropped first: CREATE OR REPLACE cannot turn a row trigger into a statement
        // trigger with transition tables.
        let args: Vec<String> = spec.args.iter().map(|a| quote_literal(a)).collect();
        locking.push(format!(
            "DROP TRIGGER IF EXISTS {trigger} ON {qualified}; \
             CREATE TRIGGER {trigger} {} ON {qualified} {} \
             EXECUTE FUNCTION {}.{}({})",
            spec.timing,
            spec.level,
            quote_ident(spec.function.0),
            quote_ident(spec.function.1),
            args.join(", ")
        ));
        changes.push(match &installed {
            // One working stamp for another: the table is served meanwhile.
            Some(was) if trigger == STAMP_TRIGGER && is_stamp(table, was) => format!(
                "replaced trigger {trigger} on {qualified} with {}",
                describe_stamp(&wanted)
            ),
            _ => format!("installed trigger {trigger} on {qualified}"),
        });
    }
    // A trigger the customer disabled (`D`, for a bulk load) stays disabled: its resource is
    // unavailable until they enable it (see `catalog::trigger_fault`).
    if installed.as_ref() != Some(&wanted) || (enabled != "A" && enabled != "D") {
        // Fired whatever session_replication_role says: rows written by logical
        // replication apply or a restore tool take a version and are announced too.
        locking.push(format!(
            "ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER {trigger}"
        ));
        if installed.as_ref() == Some(&wanted) {
            changes.push(format!("enabled trigger {trigger} on {qualified} always"));
        }
    }
    Ok(())
}

/// Adopting a table: versions already in it (an existing bigint column) must stay below
/// every version the trigger hands out from now on. (A column syncar added holds only
/// versions of its sequence: no scan of a large table for nothing, see
/// [`versioned_by_syncar`].)
async fn align_sequence(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    table: &Table<'_>,
) -> Result<(), SchemaError> {
    let schema = table.schema;
    sink.run(
        tx,
        format!(
            "SELECT pg_catalog.setval({seq}::pg_catalog.regclass, m) FROM (SELECT max({col}) AS m FROM {qualified}) x \
             WHERE m >= (SELECT last_value FROM {s}.{VERSION_SEQUENCE})",
            seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}")),
            col = quote_ident(&table.r.version_column),
            qualified = table.qualified,
            s = quote_ident(schema),
        ),
        "aligning the version sequence",
    )
    .await
}

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

/// Whose privileges a trigger function runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Security {
    /// The writer's (the default): what it does, any role may.
    Invoker,
    /// Its owner's, the role that migrated, which owns syncar's objects (`SECURITY DEFINER`):
    /// for what a writer's role was never granted (inserting into the changes log), so that
    /// an application's writes that worked before syncar was installed keep working. Hardened
    /// as Postgres' "Writing SECURITY DEFINER Functions Safely" says: `search_path` pinned to
    /// `pg_catalog, pg_temp` (the body names syncar's tables with their schema), and EXECUTE
    /// revoked from PUBLIC, so that no one can attach it to a table of theirs to write the log
    /// (Postgres checks EXECUTE when a trigger is created, not when it fires).
    Definer,
}

/// Creates or replaces a trigger function unless it is already `body` with `security`.
/// Returns whether it changed anything.
async fn install_function(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    name: &str,
    body: &str,
    security: Security,
) -> Result<bool, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    const PINNED: &str = "search_path=pg_catalog, pg_temp";
    let current: Option<(String, bool, Option<Vec<String>>, bool)> = tx
        .query_opt(
            "SELECT p.prosrc, p.prosecdef, p.proconfig, \
                    pg_catalog.has_function_privilege('public'::pg_catalog.name, p.oid, 'EXECUTE') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0",
            &[&schema, &name],
        )
        .await
        .map_err(pg("looking up trigger functions"))?
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)));
    let wanted = match security {
        Security::Invoker => (false, None, None),
        // (Whether PUBLIC may execute an invoker's function does not matter: it runs
        // with the writer's own privileges.)
        Security::Definer => (true, Some(vec![PINNED.to_string()]), Some(false)),
    };
    if let Some((source, definer, config, public)) = &current {
        if source == body
            && *definer == wanted.0
            && *config == wanted.1
            && wanted.2.is_none_or(|p| p == *public)
        {
            return Ok(false);
        }
    }
    let function = format!("{}.{}()", quote_ident(schema), quote_ident(name));
    let attributes = match security {
        Security::Invoker => "SECURITY INVOKER",
        Security::Definer => "SECURITY DEFINER SET search_path = pg_catalog, pg_temp",
    };
    let mut sql = format!(
        "CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql {attributes} \
         AS {}",
        dollar_quote(body)
    );
    if security == Security::Definer {
        sql.push_str(&format!(
            "; REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC"
        ));
    }
    sink.run(tx, sql, "creating trigger functions").await?;
    Ok(true)
}

/// `pg_trigger.tgargs`: each argument ends in a NUL byte (an empty one included).
fn trigger_args(raw: Vec<u8>) -> Vec<String> {
    let mut args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // What follows the last NUL: nothing.
    args.pop();
    args
}

/// Whether `installed` is a version stamp syncar installs on `table` (either kind), as a row
/// trigger before inserts and updates.
fn is_stamp(table: &Table<'_>, installed: &Installed) -> bool {
    let (schema, function, tgtype) = (&installed.0, &installed.1, installed.2);
    tgtype == TG_ROW | TG_BEFORE | TG_INSERT | TG_UPDATE
        && (function == STAMP_EXTENSION
            || (schema == table.schema
                && *function == function_name("syncar_stamp", &table.r.name)))
}

/// The stamp `installed` calls, for the changes' lines.
fn describe_stamp(installed: &Installed) -> &'static str {
    if installed.1 == STAMP_EXTENSION {
        "the C stamp of extension syncar_stamp"
    } else {
        "the PL/pgSQL stamp"
    }
}
