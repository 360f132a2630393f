//! The catalog: configured resources (and the built-in `kv`) resolved against the live
//! schema, refusing what syncar cannot serve. Reads the catalog; changes nothing.

use tokio_postgres::GenericClient;

use super::capture;
use super::error::SchemaError;
use super::names::{wanted_triggers, VERSION_SEQUENCE};
use super::table::{describe_table, key_column, table_oid, Identity};
use crate::config::Config;
use crate::resource::{Catalog, Column, Resource};

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
    let capture = capture::load(client, config).await?;
    let mut resources = vec![Resource::kv(schema, config.cache.ttl.clone())];
    for r in &config.resources {
        let info = describe_table(client, r).await?;
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
    Ok(Catalog::new(resources).with_capture(capture))
}
