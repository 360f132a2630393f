//! The catalog: configured resources (and the built-in `kv`) resolved against the live
//! schema, refusing what syncar cannot serve. Reads the catalog; changes nothing.

use tokio_postgres::GenericClient;

use super::capture;
use super::error::SchemaError;
use super::names::{wanted_triggers, VERSION_SEQUENCE};
use super::table::{fit, table_oid, Identity};
use crate::config::Config;
use crate::resource::{Catalog, Column, Resource};

/// Resolves the configured resources (and `kv`) against the live schema. A configured table
/// that does not exist or does not fit is left out of the catalog and listed in
/// [`Catalog::unavailable`] with the reason; the other resources serve.
///
/// # Errors
/// [`SchemaError::NotMigrated`] when syncar's objects are missing.
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
    let capture = capture::load(client, config).await?;
    // Read before the tables: a change between the two reads shows up as a difference at
    // the next check, never as a catalog that looks newer than it is.
    let shapes = super::shape::fingerprints(client, schema, &config.resources).await?;
    let mut resources = vec![Resource::kv(schema, config.cache.ttl.clone())];
    let mut unavailable = Vec::new();
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
        let installed: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1 AND tgname = ANY($2)",
                &[&info.oid, &wanted],
            )
            .await
            .map_err(pg("looking up triggers"))?
            .get(0);
        if installed != wanted.len() as i64
            || !info.columns.iter().any(|c| c.name == r.version_column)
        {
            // Fits, but not migrated (left out by a migration while it did not fit, or
            // created since): this resource waits for `syncar migrate`, the others serve.
            unavailable.push((
                r.name.clone(),
                format!(
                    "table {}.{} lacks its version column or triggers; run `syncar migrate`",
                    r.schema, r.table
                ),
            ));
            continue;
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
        .with_unavailable(unavailable))
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
    let schema = &config.postgres.schema;
    if table_oid(&tx, schema, VERSION_SEQUENCE, "S")
        .await?
        .is_some()
    {
        report.notes.push(format!("schema {schema} is migrated"));
    } else {
        report.notes.push(format!(
            "schema {schema} is not migrated yet: `syncar migrate` (or serve, with \
             postgres.migrate_on_start) installs it"
        ));
    }
    let mut tables = Vec::new();
    for r in &config.resources {
        match fit(&tx, r).await {
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
    let described: Vec<_> = tables.iter().map(|(r, info)| (*r, info)).collect();
    match capture::resolve(&tx, config, &described).await {
        Ok((source, reason)) => report
            .notes
            .push(format!("postgres source: {} ({reason})", source.as_str())),
        Err(SchemaError::Invalid(reason)) => report.problems.push(reason),
        Err(e) => return Err(e),
    }
    tx.rollback().await.map_err(pg("ending the check"))?;
    Ok(report)
}
