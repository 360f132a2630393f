//! The `wal` source's publication kept to the tables Postgres lets it publish.
//!
//! # Why
//! Postgres refuses UPDATE and DELETE on a table that a publication publishes without a
//! replica identity ("cannot update table ... because it does not have a replica identity
//! and publishes updates"; Postgres docs, "Logical Replication: Publication"). A customer
//! who drops a cached table's primary key with nothing in its place (the first step of a
//! migration that replaces it) would have every UPDATE and DELETE of that table fail
//! because syncar published it. So the schema task takes such a table out of the
//! publication as soon as a shape check sees it (the resource is unavailable meanwhile,
//! saying why), and puts it back, with a flush of the resource in the same transaction, once
//! it has an identity again: every change made while it was out is retired with the flush,
//! and every change after it is relayed.
//!
//! The publication must also publish every kind of change: narrowed (its `publish` option)
//! it no longer carries what it leaves out, so every resource is unavailable
//! ([`unpublished_actions`]) until the task sets the option back, with a flush of every
//! resource in the same transaction.
//!
//! Between the customer's DDL and the schema task's next look (a shape check of the relay,
//! every `feeds.lease / 2`, then the flush it announces) the customer's UPDATE and DELETE
//! still fail: closing that window needs an event trigger, which needs a superuser.

use std::collections::HashSet;

use tokio_postgres::GenericClient;

use super::capture::MESSAGE_PREFIX;
use super::error::SchemaError;
use super::names::STAMP_TRIGGER;
use super::table::IDENTITY_INDEX;
use crate::config::Config;
use crate::resource::{quote_ident, quote_literal};

/// The tables (schema, name) in `publication`, which names its tables (`FOR TABLE`, as
/// syncar creates it). Read from `pg_publication_rel` in plain SQL, so that in the catalog's
/// one snapshot (see `load_catalog`) it agrees with the shape fingerprint, which reads the
/// same table: `pg_publication_tables` reads it with Postgres' newest catalog snapshot.
///
/// # Errors
/// Postgres failing.
pub(super) async fn published(
    client: &impl GenericClient,
    publication: &str,
) -> Result<HashSet<(String, String)>, SchemaError> {
    Ok(client
        .query(
            "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text \
             FROM pg_catalog.pg_publication p \
             JOIN pg_catalog.pg_publication_rel pr ON pr.prpubid OPERATOR(pg_catalog.=) p.oid \
             JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) pr.prrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
             WHERE p.pubname OPERATOR(pg_catalog.=) $1",
            &[&publication],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the publication",
            source,
        })?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

/// What `publication` does not publish of `insert, update, delete, truncate` (its `publish`
/// option), comma-separated; empty when it publishes all four, or does not exist. A DBA may
/// narrow it (`ALTER PUBLICATION ... SET (publish = 'insert, truncate')`, to let UPDATEs
/// through on a table without a replica identity): then the relay never hears the changes
/// it leaves out, and no cached copy could be trusted.
///
/// # Errors
/// Postgres failing.
pub(super) async fn unpublished_actions(
    client: &impl GenericClient,
    publication: &str,
) -> Result<String, SchemaError> {
    let row = client
        .query_opt(
            "SELECT pg_catalog.concat_ws(', ', CASE WHEN NOT pubinsert THEN 'insert' END, \
               CASE WHEN NOT pubupdate THEN 'update' END, \
               CASE WHEN NOT pubdelete THEN 'delete' END, \
               CASE WHEN NOT pubtruncate THEN 'truncate' END) \
             FROM pg_catalog.pg_publication WHERE pubname OPERATOR(pg_catalog.=) $1",
            &[&publication],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up what the publication publishes",
            source,
        })?;
    Ok(row.map(|r| r.get(0)).unwrap_or_default())
}

/// Why every resource is unavailable while its publication leaves `missing` out.
pub(super) fn narrowed_reason(publication: &str, missing: &str) -> String {
    format!(
        "publication {publication} does not publish {missing} (its publish option was \
         changed), so those changes are not relayed: syncar sets it back to insert, update, \
         delete, truncate and flushes (with postgres.migrate_on_start; else ALTER PUBLICATION \
         {publication} SET (publish = 'insert, update, delete, truncate'))"
    )
}

/// The statement announcing a flush of `resource` through the WAL, as a shape change does
/// (the relay gives it a version of its own).
pub(super) fn flush_message(resource: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_logical_emit_message(true, {}, \
         pg_catalog.json_build_object('resource', {}, 'flush', true)::pg_catalog.text)",
        quote_literal(MESSAGE_PREFIX),
        quote_literal(resource),
    )
}

/// Why a resource whose table `qualified` has no replica identity is left out.
pub(super) fn no_identity_reason(qualified: &str, publication: &str) -> String {
    format!(
        "table {qualified} has no replica identity (no primary key, or it was dropped), and \
         Postgres refuses UPDATE and DELETE on a published table without one: syncar leaves it \
         out of publication {publication} (with postgres.migrate_on_start) so that they \
         work; add a primary key, or ALTER TABLE {qualified} REPLICA IDENTITY FULL (or USING \
         INDEX, on a unique index of NOT NULL columns), and it is published and served"
    )
}

/// Takes out of the publication every configured table it publishes that has no replica
/// identity, and puts back the tables of `unpublished` (resources whose tables fit in every
/// other way, [`crate::resource::Catalog::unpublished`]) that have one again, each with a
/// flush of its resource in the same transaction. Returns a line per change. Does nothing
/// while a migration holds its lock (the migration publishes the same way), or where the
/// publication is gone.
///
/// # Errors
/// Postgres failing (this role may not alter the publication: not its owner).
pub async fn republish(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    publication: &str,
    unpublished: &[String],
) -> Result<Vec<String>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    // ALTER PUBLICATION takes a lock on the table: never queue behind a customer's long
    // transaction (and every statement on the table behind this one); the next recheck tries
    // again.
    if !super::lock::try_migration_lock(tx).await? {
        return Ok(Vec::new());
    }
    let (names, schemas, tables) = super::shape::table_arrays(&config.resources);
    let rows = tx
        .query(
            &format!(
                "SELECT t.name, \
               coalesce(c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i \
                 WHERE i.indrelid = c.oid AND {IDENTITY_INDEX}), false), \
               EXISTS (SELECT 1 FROM pg_publication_rel pr \
                 JOIN pg_publication p ON p.oid = pr.prpubid \
                 WHERE p.pubname = $4 AND pr.prrelid = c.oid), \
               EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = c.oid AND tg.tgname = $5) \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS t(name, schema, tab) \
             JOIN pg_namespace n ON n.nspname = t.schema \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tab \
               AND c.relkind IN ('r', 'p') \
             WHERE EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $4)"
            ),
            &[&names, &schemas, &tables, &publication, &STAMP_TRIGGER],
        )
        .await
        .map_err(pg("looking up the published tables' replica identities"))?;
    let mut changes = Vec::new();
    // A publication narrowed under the fleet: set back, with a flush of every resource it
    // publishes in the same transaction (what it left out meanwhile was never relayed).
    let missing = unpublished_actions(tx, publication).await?;
    if !missing.is_empty() {
        let p = quote_ident(publication);
        let sql =
            format!("ALTER PUBLICATION {p} SET (publish = 'insert, update, delete, truncate')");
        // `kv` too: its table is in the publication, and plain-SQL writers may write it.
        let mut sql = format!("{sql}; {}", flush_message(crate::config::KV_RESOURCE));
        let mut flushed = vec![crate::config::KV_RESOURCE.to_string()];
        for row in &rows {
            let (name, published): (String, bool) = (row.get(0), row.get(2));
            if published {
                sql.push_str("; ");
                sql.push_str(&flush_message(&name));
                flushed.push(name);
            }
        }
        tx.batch_execute(&sql)
            .await
            .map_err(pg("setting the publication's publish option back"))?;
        changes.push(format!(
            "publication {publication} did not publish {missing}: set back to insert, update, \
             delete, truncate, and flushed {}",
            flushed.join(", ")
        ));
    }
    for row in rows {
        let (name, identity, published, migrated): (String, bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let Some(r) = config.resources.iter().find(|r| r.name == name) else {
            continue;
        };
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        let p = quote_ident(publication);
        if published && !identity {
            tx.batch_execute(&format!("ALTER PUBLICATION {p} DROP TABLE {qualified}"))
                .await
                .map_err(pg(
                    "taking a table without replica identity out of the publication",
                ))?;
            changes.push(format!(
                "took {qualified} out of publication {publication}: it has no replica identity, \
                 and Postgres would refuse its UPDATE and DELETE"
            ));
        } else if !published && identity && migrated && unpublished.contains(&name) {
            // In one transaction: every change after this commit is relayed, and the flush,
            // at this commit, retires whatever a cache held of the table before.
            tx.batch_execute(&format!(
                "ALTER PUBLICATION {p} ADD TABLE {qualified}; {}",
                flush_message(&name)
            ))
            .await
            .map_err(pg("publishing a table again"))?;
            changes.push(format!(
                "put {qualified} in publication {publication}: it has a replica identity"
            ));
        }
    }
    Ok(changes)
}
