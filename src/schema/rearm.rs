//! syncar's triggers enabled `ALWAYS` again where something left them enabled for some
//! sessions only.
//!
//! # Why
//! syncar installs its triggers `ENABLE ALWAYS`, so that writers with
//! `session_replication_role = replica` (a logical replication subscriber, `pg_restore
//! --disable-triggers`) take versions and are announced too. A bulk load's `ALTER TABLE ...
//! DISABLE TRIGGER ALL` then `ENABLE TRIGGER ALL` leaves them `ENABLE` (`tgenabled` `O`):
//! such writers then change rows unversioned. The catalog leaves the resource out meanwhile
//! (see `catalog::trigger_fault`); this puts the triggers back as they were installed, and
//! nothing else: a trigger the customer disabled (`D`) is theirs to enable, and no other
//! step of a migration runs. The change of `tgenabled` changes the table's shape
//! fingerprint, so the fleet reloads the resource with a flush.

use super::error::SchemaError;
use crate::config::Config;
use crate::resource::quote_ident;

/// Enables `ALWAYS` each of syncar's triggers that is enabled for some sessions only (`O` or
/// `R`) on the tables of `disarmed` (resource names, see
/// [`crate::resource::Catalog::disarmed`]). Returns a line per trigger. Does nothing while a
/// migration holds its lock (it enables them the same way); never waits for a customer's
/// lock on the table beyond `lock_timeout` (the caller tries again at the next recheck).
///
/// # Errors
/// Postgres failing: a lock timeout ([`SchemaError::is_lock_timeout`]), or a role that may
/// not alter the table (not its owner).
pub async fn rearm(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    disarmed: &[String],
) -> Result<Vec<String>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    if !super::lock::try_migration_lock(tx).await? {
        return Ok(Vec::new());
    }
    let mut changes = Vec::new();
    for r in config
        .resources
        .iter()
        .filter(|r| disarmed.contains(&r.name))
    {
        let triggers = tx
            .query(
                "SELECT t.tgname::pg_catalog.text FROM pg_catalog.pg_trigger t \
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                 WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relname OPERATOR(pg_catalog.=) $2 \
                   AND t.tgname LIKE 'syncar%' AND t.tgenabled IN ('O', 'R') \
                 ORDER BY t.tgname",
                &[&r.schema, &r.table],
            )
            .await
            .map_err(pg("looking up triggers"))?;
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table));
        for row in triggers {
            let trigger: String = row.get(0);
            tx.batch_execute(&format!(
                "ALTER TABLE {qualified} ENABLE ALWAYS TRIGGER {}",
                quote_ident(&trigger)
            ))
            .await
            .map_err(pg("enabling a trigger always"))?;
            changes.push(format!("enabled trigger {trigger} on {qualified} always"));
        }
    }
    Ok(changes)
}
