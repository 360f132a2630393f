//! The catalog: configured resources (and the built-in `kv`) resolved against the live
//! schema, refusing what syncar cannot serve. Reads the catalog; changes nothing.

use tokio_postgres::GenericClient;

use super::capture;
use super::error::SchemaError;
use super::names::{wanted_triggers, VERSION_SEQUENCE};
use super::table::{fit, table_oid, Identity, TableInfo};
use super::triggers::function_name;
use crate::config::{Config, ResourceConfig};
use crate::resource::{quote_ident, Catalog, Column, Resource};

/// Resolves the configured resources (and `kv`) against the live schema. A configured table
/// that does not exist or does not fit is left out of the catalog and listed in
/// [`Catalog::unavailable`] with the reason; the other resources serve.
///
/// Everything is read in one snapshot (a read-only `REPEATABLE READ` transaction): the
/// tables' shapes and the facts the catalog draws from them are of one moment. Read in
/// statements of their own, a catalog could hold a fingerprint from before a change and a
/// fact from after it (a trigger disabled); when the change was undone before anyone looked
/// again, the live fingerprint then equalled the catalog's, and no recheck ever read the
/// table again: the resource stayed unavailable.
///
/// # Errors
/// [`SchemaError::NotMigrated`] when syncar's objects are missing.
pub async fn load_catalog(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Catalog, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg("starting the catalog's snapshot"))?;
    let catalog = read_catalog(&tx, config).await?;
    tx.commit()
        .await
        .map_err(pg("ending the catalog's snapshot"))?;
    Ok(catalog)
}

/// [`load_catalog`]'s reads, on `client` (a transaction: one snapshot).
async fn read_catalog(
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
    let capture = capture::load(client, config).await?;
    let shapes = super::shape::fingerprints(client, schema, &config.resources).await?;
    let mut resources = vec![Resource::kv(schema, config.cache.ttl.clone())];
    let mut unavailable = Vec::new();
    let mut unpublished = Vec::new();
    let mut disarmed = Vec::new();
    let mut uninstalled = Vec::new();
    // With `wal`: the tables the publication has, and what of a change it leaves out.
    let (published, narrowed) = if capture.source == crate::config::PostgresSource::Wal {
        (
            Some(super::republish::published(client, &capture.publication).await?),
            super::republish::unpublished_actions(client, &capture.publication).await?,
        )
    } else {
        (None, String::new())
    };
    for r in &config.resources {
        let (info, key_type) = match fit(client, r).await {
            Ok(fits) => fits,
            Err(SchemaError::Invalid(reason)) => {
                unavailable.push((r.name.clone(), reason));
                continue;
            }
            Err(e) => return Err(e),
        };
        let wanted = wanted_triggers(capture.source, info.identity == Identity::ExcludesKey);
        // Each wanted trigger's name and `tgenabled` (`A` always, as syncar installs them;
        // `O` origin and local sessions only; `R` replicas only; `D` disabled).
        let installed: Vec<(String, String)> = client
            .query(
                "SELECT tgname::pg_catalog.text, tgenabled::pg_catalog.text \
                 FROM pg_catalog.pg_trigger \
                 WHERE tgrelid = $1 AND tgname OPERATOR(pg_catalog.=) ANY($2) ORDER BY tgname",
                &[&info.oid, &wanted],
            )
            .await
            .map_err(pg("looking up triggers"))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        if installed.len() != wanted.len()
            || !info.columns.iter().any(|c| c.name == r.version_column)
        {
            // Fits, but not migrated (left out by a migration while it did not fit, or
            // created since): this resource waits for a migration, the others serve. One
            // that has none of syncar's triggers is installed by the schema task (with
            // `migrate_on_start`); one that lost some of them or its version column is the
            // DBA's to look at.
            let installs = installed.is_empty() && config.postgres.migrate_on_start;
            if installed.is_empty() {
                uninstalled.push(r.name.clone());
            }
            unavailable.push((
                r.name.clone(),
                format!(
                    "table {}.{} lacks its version column or triggers; {}",
                    r.schema,
                    r.table,
                    if installs {
                        "syncar installs them (postgres.migrate_on_start; or run `syncar migrate`)"
                    } else {
                        "run `syncar migrate`"
                    }
                ),
            ));
            continue;
        }
        if let Some(reason) = trigger_fault(&r.schema, &r.table, &installed) {
            // Writes the trigger does not see change rows without a version or an
            // announcement: no cached copy could be trusted.
            if !installed.iter().any(|(_, enabled)| enabled == "D") {
                disarmed.push(r.name.clone());
            }
            unavailable.push((r.name.clone(), reason));
            continue;
        }
        if let Some(published) = &published {
            let qualified = format!("{}.{}", r.schema, r.table);
            if info.identity == Identity::Missing {
                unavailable.push((
                    r.name.clone(),
                    super::republish::no_identity_reason(&qualified, &capture.publication),
                ));
                continue;
            }
            if !narrowed.is_empty() {
                unavailable.push((
                    r.name.clone(),
                    super::republish::narrowed_reason(&capture.publication, &narrowed),
                ));
                continue;
            }
            if !published.contains(&(r.schema.clone(), r.table.clone())) {
                unavailable.push((
                    r.name.clone(),
                    format!(
                        "table {qualified} is not in publication {}, so its changes are not \
                         relayed: syncar publishes it again (with postgres.migrate_on_start; \
                         else run `syncar migrate`)",
                        capture.publication
                    ),
                ));
                unpublished.push(r.name.clone());
                continue;
            }
        }
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
        let epoch = shapes.get(&r.name).map_or(0, |s| s.epoch);
        resources.push(
            Resource::table(
                r.name.clone(),
                config.ttl_for(r),
                &r.schema,
                &r.table,
                Column::new(&r.key),
                key_type,
                Column::new(&r.version_column),
                columns,
                readonly,
            )
            .with_shape_epoch(epoch),
        );
    }
    Ok(Catalog::new(resources)
        .with_shapes(shapes)
        .with_capture(capture)
        .with_unavailable(unavailable)
        .with_unpublished(unpublished)
        .with_disarmed(disarmed)
        .with_uninstalled(uninstalled))
}

/// Why syncar's triggers on `schema.table` (`installed`: name and `tgenabled`) do not see
/// every write, if they do not: one disabled (`D`: `ALTER TABLE ... DISABLE TRIGGER`, as
/// for a bulk load), or enabled for some sessions only (`O`, what `ENABLE TRIGGER ALL`
/// leaves, skips writers with `session_replication_role = replica`, such as a logical
/// replication subscriber or `pg_restore --disable-triggers`; `R` fires for those only).
fn trigger_fault(schema: &str, table: &str, installed: &[(String, String)]) -> Option<String> {
    let qualified = format!("{schema}.{table}");
    let disabled: Vec<&str> = installed
        .iter()
        .filter(|(_, enabled)| enabled == "D")
        .map(|(name, _)| name.as_str())
        .collect();
    if !disabled.is_empty() {
        return Some(format!(
            "trigger {} on {qualified} is disabled (ALTER TABLE ... DISABLE TRIGGER): writes \
             change rows without a version syncar sees; the resource is served again once \
             it is enabled (ALTER TABLE {qualified} ENABLE TRIGGER ALL)",
            disabled.join(", ")
        ));
    }
    let partial: Vec<&str> = installed
        .iter()
        .filter(|(_, enabled)| enabled != "A")
        .map(|(name, _)| name.as_str())
        .collect();
    (!partial.is_empty()).then(|| {
        format!(
            "trigger {} on {qualified} is not enabled ALWAYS (as ENABLE TRIGGER ALL leaves \
             it): writers with session_replication_role = replica would bypass it; syncar \
             enables it always again (with postgres.migrate_on_start; else run `syncar \
             migrate`)",
            partial.join(", ")
        )
    })
}

/// What `syncar check-config --db` found: each configured resource checked against the live
/// tables, whether the schema is migrated, and the source `auto` would pick. Changes nothing.
#[derive(Debug, Default)]
pub struct Check {
    /// One line per fact that holds.
    pub notes: Vec<String>,
    /// One line per problem; `serve` would leave such a resource out (503
    /// `resource_unavailable`), or not start serving at all (an impossible `wal`).
    pub problems: Vec<String>,
}

/// Checks `config` against the database `client` is connected to, read-only (the source
/// decision runs in a transaction that is rolled back).
///
/// # Errors
/// Postgres failing.
pub async fn check(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<Check, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(pg("starting a read-only transaction"))?;
    let mut report = Check::default();
    let migrated = check_migrated(&tx, &config.postgres.schema, &mut report).await?;
    let tables = check_tables(&tx, config, &mut report).await?;
    if migrated {
        let kv = table_oid(&tx, &config.postgres.schema, "syncar_kv", "r").await?;
        let oids: Vec<u32> = tables.iter().map(|(_, info)| info.oid).chain(kv).collect();
        report
            .notes
            .push(super::stamp::describe(&tx, config.postgres.stamp, &oids).await?);
    }
    let described: Vec<_> = tables.iter().map(|(r, info)| (*r, info)).collect();
    match capture::resolve(&tx, config, &described).await {
        Ok((source, reason)) => {
            report
                .notes
                .push(format!("postgres source: {} ({reason})", source.as_str()));
            if source == crate::config::PostgresSource::Wal {
                if let Some(gap) = capture::retention_gap(&tx).await? {
                    report.notes.push(format!("warning: {gap}"));
                }
            }
        }
        Err(SchemaError::Invalid(reason)) => report.problems.push(reason),
        Err(e) => return Err(e),
    }
    let schema = &config.postgres.schema;
    if let Some(shared) =
        capture::sharing_publications(&tx, schema, &config.feeds.wal_publication).await?
    {
        report.notes.push(format!("warning: {shared}"));
    }
    tx.rollback().await.map_err(pg("ending the check"))?;
    // Per table, what the migration would still do: `serve` leaves out a table without its
    // version column or triggers, whatever the sequence says.
    let planned = match super::migrate::plan(client, config).await {
        Ok((planned, _)) => planned.changes,
        Err(SchemaError::Invalid(_)) => Vec::new(), // reported above
        Err(e) => return Err(e),
    };
    let fitting: Vec<&ResourceConfig> = tables.iter().map(|(r, _)| *r).collect();
    report_plan(&planned, &fitting, config, migrated, &mut report);
    Ok(report)
}

/// Whether syncar's sequence is there, said in `report`.
async fn check_migrated(
    client: &impl GenericClient,
    schema: &str,
    report: &mut Check,
) -> Result<bool, SchemaError> {
    let migrated = table_oid(client, schema, VERSION_SEQUENCE, "S")
        .await?
        .is_some();
    if migrated {
        report.notes.push(format!("schema {schema} is migrated"));
    } else {
        report.notes.push(format!(
            "schema {schema} is not migrated yet: `syncar migrate` (or serve, with \
             postgres.migrate_on_start) installs it"
        ));
    }
    Ok(migrated)
}

/// Each configured table that fits, as the catalog describes it; each that does not is a
/// problem in `report`.
async fn check_tables<'a>(
    client: &impl GenericClient,
    config: &'a Config,
    report: &mut Check,
) -> Result<Vec<(&'a ResourceConfig, TableInfo)>, SchemaError> {
    let mut tables = Vec::new();
    for r in &config.resources {
        match fit(client, r).await {
            Ok((info, key_type)) => {
                report.notes.push(format!(
                    "resource {:?}: table {}.{}, key {:?} ({key_type:?})",
                    r.name, r.schema, r.table, r.key
                ));
                tables.push((r, info));
            }
            Err(SchemaError::Invalid(reason)) => report.problems.push(reason),
            Err(e) => return Err(e),
        }
    }
    Ok(tables)
}

/// What the migration would still do (`planned`, as [`super::plan`] words it), said per
/// table of `tables` in `report`: a problem where `serve` would leave the table out (a
/// version column or a trigger missing, once the schema is migrated or when `serve` does
/// not migrate), else a note; the rest of the plan in one note.
fn report_plan(
    planned: &[String],
    tables: &[&ResourceConfig],
    config: &Config,
    migrated: bool,
    report: &mut Check,
) {
    let schema = &config.postgres.schema;
    let mut attributed = vec![false; planned.len()];
    for r in tables {
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        let functions = ["syncar_stamp", "syncar_announce", "syncar_truncate"]
            .map(|f| format!("{schema}.{}()", function_name(f, &r.name)));
        let mut lines = Vec::new();
        for (i, line) in planned.iter().enumerate() {
            // (The publication's line names every table: it is the schema's, not one table's.)
            let own = line.contains(&qualified) || functions.iter().any(|f| line.contains(f));
            if own && !line.starts_with("make publication") {
                attributed[i] = true;
                lines.push(line.as_str());
            }
        }
        if lines.is_empty() {
            continue;
        }
        let refused = lines
            .iter()
            .any(|l| l.starts_with("add column") || l.starts_with("install trigger"));
        let line = format!(
            "resource {:?}: table {qualified} is not migrated for this configuration: {}; run \
             `syncar migrate`, or apply what `syncar migrate --print-sql` prints",
            r.name,
            lines.join("; ")
        );
        // Before the first migration that is what migrate (or serve) is for.
        if refused && (migrated || !config.postgres.migrate_on_start) {
            report
                .problems
                .push(format!("{line} (serve leaves it out until then)"));
        } else {
            report.notes.push(line);
        }
    }
    let rest: Vec<&str> = planned
        .iter()
        .zip(&attributed)
        .filter(|(_, done)| !**done)
        .map(|(l, _)| l.as_str())
        .collect();
    if !rest.is_empty() {
        report
            .notes
            .push(format!("the migration would also: {}", rest.join("; ")));
    }
}
