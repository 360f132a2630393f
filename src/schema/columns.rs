//! Version columns: each configured table's, added where missing in a transaction of its
//! own that commits at once, and the tables the migration installs on, described as it
//! will find them (the version column included). Installs no trigger.

use super::error::SchemaError;
use super::lock::begin_locked;
use super::names::VERSION_SEQUENCE;
use super::objects::kv_table_info;
use super::script::Sink;
use super::table::{describe_table, fit, table_oid, ColumnInfo, TableInfo, INT8_OID};
use crate::config::{Config, ResourceConfig, KV_RESOURCE};
use crate::resource::{quote_ident, quote_literal};

/// The tables [`describe_tables`] found fit to install on, and the others.
pub(super) struct Described<'a> {
    /// Each with its table as the migration will find it: `kv` first.
    pub(super) tables: Vec<(&'a ResourceConfig, TableInfo)>,
    /// Configured resources left out, each with why (a table that does not exist...).
    pub(super) unavailable: Vec<String>,
}

/// Adds each configured table's missing version column, each in a transaction of its own
/// that commits at once: `ADD COLUMN` holds ACCESS EXCLUSIVE until its transaction ends, and
/// the rest of the migration (dozens of statements) must not keep the table's readers
/// waiting that long. A column added without the triggers yet is harmless: the resource is
/// not served until they are installed, and rows written meanwhile read as version 0.
/// Returns the changes.
///
/// # Errors
/// Postgres failing (a table that does not fit is left to the migration, which says why).
pub(super) async fn add_version_columns(
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
                     ALTER TABLE {qualified} ALTER COLUMN {column} SET DEFAULT pg_catalog.nextval({}::pg_catalog.regclass)",
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

/// `kv` (as `kv`) and each configured table as the migration's transaction `tx` finds it,
/// with its version column: planned (a plan), or added here if the table appeared after
/// [`add_version_columns`] ran. A configured table that does not exist or does not fit is
/// left out, saying why. Appends a line to `changes` for each column added.
///
/// # Errors
/// Postgres failing; `kv` not fitting.
pub(super) async fn describe_tables<'a>(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &Sink,
    config: &'a Config,
    kv: &'a ResourceConfig,
    changes: &mut Vec<String>,
) -> Result<Described<'a>, SchemaError> {
    let schema = &config.postgres.schema;
    let mut tables: Vec<(&ResourceConfig, TableInfo)> = Vec::new();
    let mut unavailable = Vec::new();
    let kv_planned = sink.is_plan() && table_oid(tx, schema, "syncar_kv", "r").await?.is_none();
    for r in std::iter::once(kv).chain(&config.resources) {
        if r.name == KV_RESOURCE && kv_planned {
            // Planned above, so not in the catalog: described as it will be.
            tables.push((r, kv_table_info()));
            continue;
        }
        // One configured table that does not fit is left out; the others are migrated.
        let info = match fit(tx, r).await {
            Ok((info, _)) => info,
            Err(SchemaError::Invalid(reason)) if r.name != KV_RESOURCE => {
                unavailable.push(reason);
                continue;
            }
            Err(e) => return Err(e),
        };
        let info = with_version_column(tx, sink, r, info, changes).await?;
        tables.push((r, info));
    }
    Ok(Described {
        tables,
        unavailable,
    })
}

/// `info` with `r`'s version column: as it is; planned by [`add_version_columns`] (a plan:
/// it will take the next attribute number); or added now, when the table appeared after
/// that ran.
///
/// # Errors
/// Postgres failing.
async fn with_version_column(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &Sink,
    r: &ResourceConfig,
    mut info: TableInfo,
    changes: &mut Vec<String>,
) -> Result<TableInfo, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
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
        info = describe_table(tx, r).await?;
    }
    Ok(info)
}
