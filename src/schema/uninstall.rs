//! `syncar uninstall`: removes what makes syncar cost every writer and the primary's disk
//! (triggers, their functions, the publication, the replication slot), as named phases.
//! Keeps every row: version columns, the sequence, `syncar_kv`, the changes log and the
//! state table stay.

use super::capture::{self, OwnPublication, STATE_TABLE};
use super::error::SchemaError;
use super::lock::{begin_locked, LockRetries};
use super::names::{LEGACY_NOTIFY_TRIGGER, LOG_TRIGGERS, STAMP_EXTENSION, STAMP_TRIGGER};
use super::objects::kv_resource;
use super::table::table_oid;
use super::triggers::function_name;
use crate::config::{Config, ResourceConfig};
use crate::resource::quote_ident;

/// `syncar uninstall`: removes what makes syncar cost every writer and the primary's disk:
/// the triggers on every configured table (and `kv`), their functions, the `syncar_stamp`
/// extension once no trigger uses it, the publication and the replication slot. Keeps the data: version columns, the sequence, `syncar_kv`, the
/// changes log and the state table stay (a later `migrate` adopts them again).
///
/// Returns what it removed, one line per object.
///
/// `force` skips the look for other syncar connections (those of another deployment on
/// the same database, or backends a pooler keeps under syncar's `application_name`); a
/// relay streaming the slot still refuses it.
///
/// # Errors
/// The slot is being streamed or another syncar is connected (stop every instance first);
/// syncar's publication is owned by a role this one is not a member of; or Postgres
/// failing.
pub async fn uninstall(
    client: &mut tokio_postgres::Client,
    config: &Config,
    force: bool,
) -> Result<Vec<String>, SchemaError> {
    let mut retries = LockRetries::new();
    loop {
        match uninstall_once(client, config, force).await {
            Err(e) if retries.again(&e, "uninstall", client, config).await => {}
            result => return result,
        }
    }
}

/// One run of the uninstall: the refusals first (a streamed slot, running instances, a
/// publication this role may not drop), then the slot (outside any transaction), then,
/// under the migration lock, the publication, each table's triggers and functions, and the
/// recorded source.
async fn uninstall_once(
    client: &mut tokio_postgres::Client,
    config: &Config,
    force: bool,
) -> Result<Vec<String>, SchemaError> {
    let schema = &config.postgres.schema;
    let mut changes = Vec::new();
    let slot = capture::slot_name(&*client, config).await?;
    refuse_a_streamed_slot(client, &slot).await?;
    if !force {
        refuse_running_instances(client).await?;
    }
    // Before anything is removed: a publication this role may not drop refuses it all.
    let publication =
        publication_to_drop(&*client, schema, &config.feeds.wal_publication, &slot).await?;
    if let Some(change) = capture::drop_idle_slot(&*client, &slot).await? {
        changes.push(change);
    }
    let tx = begin_locked(client, false).await?;
    if let Some(name) = publication {
        if capture::publication_exists(&tx, &name).await? {
            tx.batch_execute(&format!("DROP PUBLICATION {}", quote_ident(&name)))
                .await
                .map_err(pg("dropping the publication"))?;
            changes.push(format!("dropped publication {name}"));
        }
    }
    let kv = kv_resource(schema);
    for r in std::iter::once(&kv).chain(&config.resources) {
        drop_table_triggers(&tx, schema, r, &mut changes).await?;
    }
    drop_unused_extension(&tx, &mut changes).await?;
    forget_the_source(&tx, schema).await?;
    tx.commit().await.map_err(pg("committing the uninstall"))?;
    Ok(changes)
}

/// A statement of the uninstall that failed while `doing`.
fn pg(doing: &'static str) -> impl Fn(tokio_postgres::Error) -> SchemaError {
    move |source| SchemaError::Postgres { doing, source }
}

/// Refuses to go on while a relay streams from `slot`: every instance must stop first.
async fn refuse_a_streamed_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), SchemaError> {
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
    Ok(())
}

/// The `application_name`s syncar's own connections carry: the pool's and the commands'
/// (unless the URL names another), each instance's feed, the relay's.
const OWN_APPLICATION_NAMES: [&str; 3] = ["syncar", "syncar-listen", "syncar-relay"];

/// Refuses to go on while another syncar is connected to this database (its connections'
/// `application_name`s in `pg_stat_activity`, which every role may read): a running
/// instance would go on serving copies that nothing evicts any more once the triggers are
/// gone, and with `postgres.migrate_on_start` it installs syncar on its tables again.
async fn refuse_running_instances(client: &tokio_postgres::Client) -> Result<(), SchemaError> {
    let mut others = running_instances(client).await?;
    // A connection just closed (this command's own pooler check) leaves its backend listed
    // for the moment it takes to exit: looked at again before refusing.
    for _ in 0..5 {
        if others.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        others = running_instances(client).await?;
    }
    if others.is_empty() {
        return Ok(());
    }
    Err(SchemaError::Invalid(format!(
        "syncar is still connected to this database: {}; stop every syncar instance (and \
         `syncar relay`, and any other `syncar` command) first: a running instance would go \
         on serving copies nothing evicts once the triggers are gone, or install them again \
         (`--force` if these are another deployment's, or a pooler's idle backends)",
        others.join(", ")
    )))
}

/// The other backends of this database that carry one of [`OWN_APPLICATION_NAMES`], each
/// said with its pid and client address.
async fn running_instances(client: &tokio_postgres::Client) -> Result<Vec<String>, SchemaError> {
    Ok(client
        .query(
            "SELECT pg_catalog.concat(application_name, ' (pid ', pid, ', from ', \
                    coalesce(pg_catalog.host(client_addr), 'a local socket'), ')') \
             FROM pg_catalog.pg_stat_activity \
             WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database() \
               AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() \
               AND application_name OPERATOR(pg_catalog.=) ANY($1::pg_catalog.text[]) \
             ORDER BY pid",
            &[&&OWN_APPLICATION_NAMES[..]],
        )
        .await
        .map_err(pg("looking for running instances"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The publication to drop: the one syncar created for the `wal` source
/// ([`capture::own_publication`]); where nothing recorded it (an install by an earlier
/// release), the configured one if the recorded source is `wal`, or if there is no state
/// table at all (an early release: the old rule, which cannot tell a customer's publication
/// of the same name). Otherwise none: a publication of the customer's that shares the name
/// is left alone.
///
/// # Errors
/// A relay streams its slot; another role owns it (this one not a member); or Postgres
/// failing.
async fn publication_to_drop(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    publication: &str,
    slot: &str,
) -> Result<Option<String>, SchemaError> {
    let fallback = if table_oid(client, schema, STATE_TABLE, "r").await?.is_none() {
        return Ok(Some(publication.to_string()));
    } else if capture::recorded_source(client, schema).await?.as_deref() == Some("wal") {
        Some(publication)
    } else {
        None
    };
    match capture::own_publication(client, schema, fallback, slot).await? {
        OwnPublication::NoneRecorded | OwnPublication::Gone(_) => Ok(None),
        OwnPublication::Droppable(name) => Ok(Some(name)),
        OwnPublication::Streamed(name) => Err(SchemaError::Invalid(format!(
            "publication {name}'s slot {slot} is being streamed by a relay: stop every syncar \
             instance (and `syncar relay`) first"
        ))),
        OwnPublication::NotOwned(name) => Err(SchemaError::Invalid(format!(
            "publication {name}, which syncar created, is owned by a role this one is not a \
             member of: run the uninstall as its owner, or DROP PUBLICATION {} as its owner \
             first",
            quote_ident(&name)
        ))),
    }
}

/// Drops the `syncar_stamp` extension (the C stamp) if it is there, no trigger calls its
/// function any more (a table not configured here may still), and this role owns it.
async fn drop_unused_extension(
    tx: &tokio_postgres::Transaction<'_>,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let unused: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extname = $1 \
                            AND pg_has_role(e.extowner, 'USAGE')) \
             AND NOT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_depend d \
                 ON d.classid = 'pg_proc'::regclass AND d.objid = t.tgfoid AND d.deptype = 'e' \
                 JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = $1)",
            &[&STAMP_EXTENSION],
        )
        .await
        .map_err(pg("looking up the syncar_stamp extension"))?
        .get(0);
    if unused {
        tx.batch_execute(&format!("DROP EXTENSION {STAMP_EXTENSION}"))
            .await
            .map_err(pg("dropping the syncar_stamp extension"))?;
        changes.push(format!("dropped extension {STAMP_EXTENSION}"));
    }
    Ok(())
}

/// Drops syncar's triggers (this release's and earlier ones') from `r`'s table, if it
/// exists, then its trigger functions that no trigger uses any more.
async fn drop_table_triggers(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    r: &ResourceConfig,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let Some(oid) = table_oid(tx, &r.schema, &r.table, "r").await? else {
        return Ok(());
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
        drop_unused_function(tx, schema, &function, changes).await?;
    }
    Ok(())
}

/// Drops the trigger function `function` unless a trigger still uses it.
async fn drop_unused_function(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    function: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let unused: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2) AND NOT EXISTS (SELECT 1 FROM pg_trigger t \
             JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2)",
            &[&schema, &function],
        )
        .await
        .map_err(pg("looking up trigger functions"))?
        .get(0);
    if unused {
        tx.batch_execute(&format!(
            "DROP FUNCTION {}.{}()",
            quote_ident(schema),
            quote_ident(function)
        ))
        .await
        .map_err(pg("dropping trigger functions"))?;
        changes.push(format!("dropped function {schema}.{function}()"));
    }
    Ok(())
}

/// Clears the recorded source from the state table, so that a later `migrate` decides
/// again, the slot's epoch (the slot is gone: a later one is new, not missing) and the
/// publication syncar created (gone too). (An install by an earlier release has no state
/// table.)
async fn forget_the_source(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<(), SchemaError> {
    if table_oid(tx, schema, STATE_TABLE, "r").await?.is_some() {
        tx.execute(
            &format!(
                "DELETE FROM {}.{STATE_TABLE} \
                 WHERE name IN ('source', 'source_reason', 'slot_epoch', 'publication')",
                quote_ident(schema)
            ),
            &[],
        )
        .await
        .map_err(pg("clearing the state table"))?;
    }
    Ok(())
}
