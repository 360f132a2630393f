//! syncar's own objects, created in the migration's transaction where missing: the schema,
//! the version sequence, the changes log, the state table and the `kv` table (and `kv` as
//! a configured resource). Touches no table of the application's.

use super::capture::STATE_TABLE;
use super::error::SchemaError;
use super::names::{CHANGES_TABLE, VERSION_SEQUENCE};
use super::script::Sink;
use super::table::{table_oid, ColumnInfo, Identity, TableInfo, INT8_OID};
use crate::config::{ResourceConfig, KV_RESOURCE};
use crate::resource::quote_ident;

/// What [`create_own_objects`] found already there.
pub(super) struct Found {
    /// The changes log was there: an install by this release or an earlier one (which has
    /// the changes log but no recorded source).
    pub(super) changes_log: bool,
    /// The state table was there (a plan on a fresh database reads none: it is only
    /// planned).
    pub(super) state_table: bool,
}

/// Creates what is missing of syncar's own objects, in `tx`, in this order: the schema, the
/// version sequence, the changes log, the state table, the `kv` table. Appends a line to
/// `changes` for each.
///
/// # Errors
/// Postgres failing.
pub(super) async fn create_own_objects(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<Found, SchemaError> {
    create_schema(tx, sink, schema, changes).await?;
    create_sequence(tx, sink, schema, changes).await?;
    let changes_log = create_changes_log(tx, sink, schema, changes).await?;
    let state_table = create_state_table(tx, sink, schema, changes).await?;
    create_kv_table(tx, sink, schema, changes).await?;
    Ok(Found {
        changes_log,
        state_table,
    })
}

/// `syncar_kv` as a configured resource, in `schema`.
pub(super) fn kv_resource(schema: &str) -> ResourceConfig {
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

/// `syncar_kv` as the migration creates it, for a plan on a database that lacks it.
pub(super) fn kv_table_info() -> TableInfo {
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

/// The schema syncar's objects live in.
async fn create_schema(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let has_schema: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the schema",
            source,
        })?
        .get(0);
    if !has_schema {
        // (IF NOT EXISTS: a script's earlier block may have created it already.)
        sink.run(
            tx,
            format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)),
            "creating the schema",
        )
        .await?;
        changes.push(format!("created schema {schema}"));
    }
    Ok(())
}

/// The one sequence every version comes from, with USAGE granted to PUBLIC.
///
/// Every role that writes a cached table calls `nextval` on it: the version column's
/// default, the version stamp and the delete and truncate announcements run as the writer.
/// Without USAGE an application's own INSERT, UPDATE or DELETE, which worked before syncar
/// was installed, would fail with `permission denied for sequence`. USAGE allows `nextval`
/// and `currval` only, never `setval`: any role can take versions (as any writer of a table
/// with an identity column takes its values), none can move the sequence back, which is
/// what coherence rests on.
async fn create_sequence(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let sequence = format!("{}.{VERSION_SEQUENCE}", quote_ident(schema));
    let granted = match table_oid(tx, schema, VERSION_SEQUENCE, "S").await? {
        Some(oid) => tx
            .query_one(
                "SELECT pg_catalog.has_sequence_privilege('public'::pg_catalog.name, $1::pg_catalog.oid, 'USAGE')",
                &[&oid],
            )
            .await
            .map_err(|source| SchemaError::Postgres {
                doing: "reading the version sequence's privileges",
                source,
            })?
            .get::<_, bool>(0),
        None => {
            sink.run(
                tx,
                format!("CREATE SEQUENCE IF NOT EXISTS {sequence}"),
                "creating the version sequence",
            )
            .await?;
            changes.push(format!("created sequence {schema}.{VERSION_SEQUENCE}"));
            false
        }
    };
    if !granted {
        sink.run(
            tx,
            format!("GRANT USAGE ON SEQUENCE {sequence} TO PUBLIC"),
            "granting USAGE on the version sequence",
        )
        .await?;
        changes.push(format!(
            "granted USAGE on sequence {schema}.{VERSION_SEQUENCE} to PUBLIC (every writer of a \
             cached table takes versions from it)"
        ));
    }
    Ok(())
}

/// The changes log, with its indexes. Returns whether it was there already.
async fn create_changes_log(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<bool, SchemaError> {
    let there = table_oid(tx, schema, CHANGES_TABLE, "r").await?.is_some();
    if !there {
        let s = quote_ident(schema);
        sink.run(
            tx,
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
    Ok(there)
}

/// The state table (see [`STATE_TABLE`]). Returns whether it was there already.
async fn create_state_table(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<bool, SchemaError> {
    let there = table_oid(tx, schema, STATE_TABLE, "r").await?.is_some();
    if !there {
        sink.run(
            tx,
            format!(
                "CREATE TABLE {}.{STATE_TABLE} (name text PRIMARY KEY, value text NOT NULL)",
                quote_ident(schema)
            ),
            "creating the state table",
        )
        .await?;
        changes.push(format!("created table {schema}.{STATE_TABLE}"));
    }
    Ok(there)
}

/// The table of the built-in `kv` resource.
async fn create_kv_table(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    if table_oid(tx, schema, "syncar_kv", "r").await?.is_none() {
        sink.run(
            tx,
            format!(
                "CREATE TABLE {}.syncar_kv (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL)",
                quote_ident(schema)
            ),
            "creating the kv table",
        )
        .await?;
        changes.push(format!("created table {schema}.syncar_kv"));
    }
    Ok(())
}
