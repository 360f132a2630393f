//! `syncar migrate`: installs or repairs everything versioning needs, as a list of named
//! phases (`migrate_once`), and [`plan`], the same run written down instead of run. Owns the
//! order of the phases, not their SQL: they live beside it, `columns.rs` (version columns),
//! `objects.rs` (syncar's own objects), `source.rs` (the source installed for),
//! `install.rs` (trigger functions and triggers) and `capture.rs` (publication and slot),
//! every statement going through `script.rs`' [`Sink`], under `lock.rs`' migration lock.
//! Removing it all is `uninstall.rs`'s.
//!
//! # Idempotence
//! Every step looks before it changes anything, so a second run reports no change and takes
//! no lock beyond the migration's own advisory lock. Concurrent instances starting together
//! serialize on that lock.

use super::capture::{self, OwnPublication, SlotState};
use super::columns::{add_version_columns, describe_tables, Described};
use super::error::SchemaError;
use super::install::{drop_legacy_functions, install_table, Table};
use super::lock::{begin_locked, LockRetries};
use super::names::CHANGES_TABLE;
use super::objects::{create_own_objects, kv_resource};
use super::script::{Script, Sink};
use super::source::{decide_source, record_source};
use super::stamp::choose_stamp;
use super::table::{Identity, TableInfo};
use crate::config::{Config, PostgresSource, ResourceConfig};
use crate::resource::quote_ident;

/// Installs or repairs everything versioning needs, in one transaction: the sequence, the
/// state table, the changes log, the kv table, version columns, the triggers of the resolved
/// source (`auto` resolves here, see [`capture::resolve`]), and for `wal` the publication
/// (recorded as syncar's own in the state table); for the other sources, the publication
/// syncar created for `wal` dropped (`unpublish`); the changes log's replica identity where
/// a publication publishes its deletes (`capture::changes_log_identity`). Then, outside
/// that transaction, the `wal` source's replication slot (created if missing or
/// invalidated); other sources drop an idle syncar slot, which would retain WAL for nobody.
/// What it may not change is in [`Migration::warnings`].
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

/// What [`migrate`] did (or [`plan`] would do).
#[derive(Debug, Default)]
pub struct Migration {
    /// What it changed, one line per change; empty when the schema was up to date. From
    /// [`plan`], what it would change ("add column version to table public.orders").
    pub changes: Vec<String>,
    /// Configured resources it left out, each with why (a table that does not exist…).
    pub unavailable: Vec<String>,
    /// What the operator should know and this migration did not change: another
    /// publication carrying syncar's tables ([`capture::sharing_publications`]), the
    /// changes log's replica identity this role may not set, a publication syncar created
    /// that it keeps for now or may not drop.
    pub warnings: Vec<String>,
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

/// A line of [`Migration::changes`] as what is still to do: "added column v to table t"
/// becomes "add column v to table t".
fn pending(done: &str) -> String {
    for (was, to_do) in [
        ("added ", "add "),
        ("installed ", "install "),
        ("created ", "create "),
        ("recreated ", "recreate "),
        ("replaced ", "replace "),
        ("dropped ", "drop "),
        ("enabled ", "enable "),
        ("recorded ", "record "),
        ("forgot ", "forget "),
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

/// One run of the migration (or of the plan, as `sink` says): the phases in their order,
/// each adding what it changed to the list.
async fn migrate_once(
    client: &mut tokio_postgres::Client,
    config: &Config,
    sink: &mut Sink,
) -> Result<Migration, SchemaError> {
    let mut changes = add_version_columns(client, config, sink).await?;
    let tx = begin_locked(client, sink.is_plan()).await?;
    sink.block(
        "syncar's own objects, its triggers and (wal) the publication, in one transaction",
        true,
    );
    let schema = &config.postgres.schema;
    let found = create_own_objects(&tx, sink, schema, &mut changes).await?;
    // Here, before any table of the customer's is locked, and with syncar's tables already
    // created in this transaction (a publication listing them by schema sees them).
    let mut warnings: Vec<String> =
        capture::sharing_publications(&tx, schema, &config.feeds.wal_publication)
            .await?
            .into_iter()
            .collect();
    let kv = kv_resource(schema);
    let Described {
        tables,
        mut unavailable,
    } = describe_tables(&tx, sink, config, &kv, &mut changes).await?;
    let described: Vec<(&ResourceConfig, &TableInfo)> =
        tables.iter().map(|(r, info)| (*r, info)).collect();
    let (source, reason) = decide_source(&tx, config, &found, &described).await?;
    record_source(
        &tx,
        sink,
        schema,
        found.state_table,
        source,
        &reason,
        &mut changes,
    )
    .await?;
    let stamp = choose_stamp(&tx, sink, schema, config.postgres.stamp, &mut changes).await?;
    // The statements that lock a table against its writers, run together at the end.
    let mut locking: Vec<String> = Vec::new();
    for (r, info) in &tables {
        let table = Table {
            schema,
            r,
            info,
            qualified: format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.table)),
        };
        install_table(
            &tx,
            sink,
            &table,
            source,
            &stamp,
            &mut locking,
            &mut changes,
        )
        .await?;
    }
    let slot = capture::slot_name(&tx, config).await?;
    if source == PostgresSource::Wal {
        publish(&tx, sink, config, &described, &mut changes).await?;
        // (A plan on a fresh database has only planned the state table.)
        let recorded = if found.state_table || !sink.is_plan() {
            capture::read_state_value(&tx, schema, capture::OWN_PUBLICATION).await?
        } else {
            None
        };
        let publication = &config.feeds.wal_publication;
        if let Some(old) = recorded.as_ref().filter(|old| *old != publication) {
            warnings.push(format!(
                "publication {old}, which syncar created for the wal source, is no longer used \
                 now that feeds.wal_publication names {publication}: drop it once no relay \
                 streams it (DROP PUBLICATION {})",
                quote_ident(old)
            ));
        }
        record_own_publication(&tx, sink, schema, publication, recorded, &mut changes).await?;
        for (r, info) in &described {
            if info.identity == Identity::Missing {
                unavailable.push(format!(
                    "resource {:?}: {}",
                    r.name,
                    super::republish::no_identity_reason(
                        &format!("{}.{}", r.schema, r.table),
                        &config.feeds.wal_publication
                    )
                ));
            }
        }
    } else if found.state_table {
        if let Some(warning) = unpublish(&tx, sink, schema, &slot, source, &mut changes).await? {
            warnings.push(warning);
        }
    }
    match capture::changes_log_identity(&tx, schema).await? {
        Some(Ok(sql)) => {
            // ACCESS EXCLUSIVE on the log, which every announcing trigger writes: with the
            // other locking statements, for the last moment of the transaction.
            locking.push(sql);
            changes.push(format!(
                "set replica identity full on {schema}.{CHANGES_TABLE}: a publication \
                 publishes its deletes, which Postgres refuses without one"
            ));
        }
        Some(Err(warning)) => warnings.push(warning),
        None => {}
    }
    // Last, in one round trip: creating a trigger locks out the table's writers (SHARE ROW
    // EXCLUSIVE) until the commit, so little else of the migration runs while they wait
    // (only the drop of earlier releases' functions, which must come after their triggers).
    if !locking.is_empty() {
        sink.run(&tx, locking.join("; "), "creating triggers")
            .await?;
    }
    drop_legacy_functions(&tx, sink, schema, &mut changes).await?;
    sink.commit(tx, "committing the migration").await?;
    settle_slot(client, sink, schema, source, &slot, &mut changes).await?;
    Ok(Migration {
        changes,
        unavailable,
        warnings,
    })
}

/// Makes the `wal` source's publication name exactly `tables`, in `tx`.
///
/// Every column is published, never a column list: Postgres refuses UPDATE and DELETE on a
/// table whose publication's column list does not cover its replica identity, and refuses
/// to drop a listed column, so a list would make the customer's own `REPLICA IDENTITY FULL`
/// or `DROP COLUMN` fail because of syncar.
async fn publish(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    config: &Config,
    tables: &[(&ResourceConfig, &TableInfo)],
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    // A table without a replica identity is left out: published, its UPDATE and DELETE
    // would fail (see `schema::republish`, which puts it back once it has one).
    let published: Vec<capture::Published> = tables
        .iter()
        .filter(|(_, info)| info.identity != Identity::Missing)
        .map(|(r, _)| (r.schema.clone(), r.table.clone(), None))
        .collect();
    if let Some((sql, change)) =
        capture::publication_change(tx, &config.feeds.wal_publication, &published).await?
    {
        // A table the publication did not have (taken out while it had no replica
        // identity, or new): its changes until now were never relayed, so its resource is
        // flushed at this commit, the moment from which they are.
        let before = super::republish::published(tx, &config.feeds.wal_publication).await?;
        let flushes: Vec<String> = tables
            .iter()
            .filter(|(r, info)| {
                info.identity != Identity::Missing
                    && !before.contains(&(r.schema.clone(), r.table.clone()))
            })
            .map(|(r, _)| super::republish::flush_message(&r.name))
            .collect();
        sink.run(tx, sql, "creating the publication").await?;
        changes.push(change);
        if !flushes.is_empty() {
            sink.run(tx, flushes.join("; "), "flushing newly published tables")
                .await?;
        }
    }
    Ok(())
}

/// Records `publication` as syncar's own (see [`capture::OWN_PUBLICATION`]) where the state table
/// says otherwise (`recorded`): a fresh install, or one by an earlier release.
async fn record_own_publication(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    publication: &str,
    recorded: Option<String>,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    if recorded.as_deref() == Some(publication) {
        return Ok(());
    }
    sink.run(
        tx,
        capture::write_state_sql(schema, capture::OWN_PUBLICATION, publication),
        "recording the publication",
    )
    .await?;
    changes.push(format!(
        "recorded publication {publication} as syncar's own"
    ));
    Ok(())
}

/// Drops the publication syncar created for the `wal` source ([`capture::own_publication`],
/// under whatever name it was created) when the schema is migrated for `source`, another
/// source (switched from `wal`): nothing reads it any more, and Postgres would go on
/// refusing UPDATE and DELETE on any of its tables that loses its replica identity (which
/// only the `wal` source's schema task takes out of it), and `SET UNLOGGED` on all of them.
/// Kept, with a warning, while a relay still streams `slot` (a later migration drops it:
/// the record stays) or when this role may not drop it. Returns the warning.
async fn unpublish(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    slot: &str,
    source: PostgresSource,
    changes: &mut Vec<String>,
) -> Result<Option<String>, SchemaError> {
    let forget = capture::delete_state_sql(schema, capture::OWN_PUBLICATION);
    match capture::own_publication(tx, schema, None, slot).await? {
        OwnPublication::NoneRecorded => Ok(None),
        OwnPublication::Gone(name) => {
            sink.run(tx, forget, "forgetting the publication").await?;
            changes.push(format!("forgot publication {name}: it no longer exists"));
            Ok(None)
        }
        OwnPublication::Streamed(name) => Ok(Some(format!(
            "publication {name} is kept while a relay still streams slot {slot}: stop it; the \
             next migration drops the publication"
        ))),
        OwnPublication::NotOwned(name) => Ok(Some(format!(
            "publication {name}, which syncar created for the wal source, is not needed by the \
             {} source: drop it as its owner (DROP PUBLICATION {})",
            source.as_str(),
            quote_ident(&name)
        ))),
        OwnPublication::Droppable(name) => {
            sink.run(
                tx,
                format!("DROP PUBLICATION {}; {forget}", quote_ident(&name)),
                "dropping the publication",
            )
            .await?;
            changes.push(format!(
                "dropped publication {name}: the {} source does not read it",
                source.as_str()
            ));
            Ok(None)
        }
    }
}

/// The replication slot, once the migration's transaction is over (Postgres refuses to
/// create one in a transaction that wrote): for `wal`, created where missing or
/// invalidated; for the other sources, an idle syncar slot dropped, which would retain WAL
/// for nobody.
async fn settle_slot(
    client: &tokio_postgres::Client,
    sink: &mut Sink,
    schema: &str,
    source: PostgresSource,
    slot: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    if source == PostgresSource::Wal {
        let (state, statements) = capture::slot_plan(client, schema, slot).await?;
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
    } else if let Some(sql) = capture::idle_slot(client, slot).await? {
        sink.block(
            "a syncar slot nobody reads retains WAL until the disk is full",
            false,
        );
        sink.run(client, sql, "dropping the replication slot")
            .await?;
        // Forgotten with it: a slot created if `wal` comes back is a new one, not one that
        // went missing (a failover it did not follow).
        sink.run(
            client,
            capture::delete_state_sql(schema, "slot_epoch"),
            "forgetting the slot's epoch",
        )
        .await?;
        changes.push(format!("dropped replication slot {slot}"));
    }
    Ok(())
}
