//! How changes are captured: which Postgres source the server allows (`auto` resolves here),
//! the state table that records what the migration installed, and, for the `wal` source,
//! the publication and the replication slot (Postgres docs, "Logical Decoding" chapter 49).
//! Runs plain SQL only; the replication protocol is the relay's.

use tokio_postgres::GenericClient;

use super::error::SchemaError;
use super::names::VERSION_SEQUENCE;
use super::table::{table_oid, Identity, TableInfo};
use crate::config::{Config, PostgresSource, ResourceConfig};
use crate::resource::{quote_ident, quote_literal, Capture};

/// `name → value` rows recording what the migration installed: `source`, `source_reason`,
/// `slot_epoch`, the version taken when the current slot was created (a Redis fed by an
/// older slot may have missed changes), and `publication`, the one syncar created for the
/// `wal` source (the one a migration to another source, or an uninstall, drops). The schema
/// task adds `shape:{resource}` and
/// `shape_epoch:{resource}` (see `schema::shape`).
pub const STATE_TABLE: &str = "syncar_state";

/// The prefix of every logical decoding message syncar emits (heartbeats, and the DELETE and
/// TRUNCATE announcements of the `wal` triggers).
pub const MESSAGE_PREFIX: &str = "syncar";

/// Decides the source: the configured one, or for `auto` `wal` when the server and every
/// table allow it, else `changes_log`, with the reason either way.
///
/// # Errors
/// `wal` configured where it cannot work, naming what to set; Postgres failing.
pub(super) async fn resolve(
    client: &impl GenericClient,
    config: &Config,
    tables: &[(&ResourceConfig, &TableInfo)],
) -> Result<(PostgresSource, String), SchemaError> {
    let configured = config.feeds.postgres_source;
    if matches!(
        configured,
        PostgresSource::ChangesLog | PostgresSource::Notify
    ) {
        return Ok((configured, "configured".into()));
    }
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text, \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
                    OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'rds_replication' \
                               AND pg_has_role(current_user, r.oid, 'member')), \
                    current_setting('max_replication_slots')::int, \
                    current_setting('max_wal_senders')::int",
            &[],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "checking what logical decoding needs",
            source,
        })?;
    let (wal_level, user, may_replicate, slots, senders): (String, String, Option<bool>, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let mut missing = Vec::new();
    if wal_level != "logical" {
        missing.push(format!(
            "wal_level is {wal_level}: set wal_level = logical and restart Postgres (on a managed \
             service, its parameter, e.g. rds.logical_replication = 1 on Amazon RDS)"
        ));
    }
    if !may_replicate.unwrap_or(false) && config.postgres.replication_url.is_none() {
        missing.push(format!(
            "role {user} may not replicate: ALTER ROLE {} REPLICATION (on Amazon RDS: GRANT \
             rds_replication TO {0}), or set postgres.replication_url to a role that may",
            quote_ident(&user)
        ));
    }
    if slots == 0 || senders == 0 {
        missing.push(
            "max_replication_slots and max_wal_senders must be at least 1 (a restart)".into(),
        );
    }
    // Configured `wal`: a table without one is left out of the publication and unavailable
    // (see `schema::republish`), the others served. `auto` deciding now takes the changes
    // log, which serves every table.
    for (r, info) in tables.iter().filter(|_| configured == PostgresSource::Auto) {
        if info.identity == Identity::Missing {
            missing.push(format!(
                "table {}.{} has no replica identity, and a published table without one \
                 refuses UPDATE and DELETE: add a primary key, or ALTER TABLE ... REPLICA \
                 IDENTITY USING INDEX (the key's unique index) or FULL",
                r.schema, r.table
            ));
        }
    }
    match (configured, missing.is_empty()) {
        (PostgresSource::Wal, true) => Ok((PostgresSource::Wal, "configured".into())),
        (_, true) => Ok((
            PostgresSource::Wal,
            "auto: wal_level is logical and the role may replicate".into(),
        )),
        (PostgresSource::Wal, false) => Err(SchemaError::Invalid(format!(
            "feeds.postgres_source = \"wal\" cannot work on this server: {}",
            missing.join("; ")
        ))),
        (_, false) => Ok((
            PostgresSource::ChangesLog,
            format!("auto: changes_log, since {}", missing.join("; ")),
        )),
    }
}

/// The slot's name: `feeds.wal_slot`, or `syncar_` and the database's name, in the characters
/// a slot name may hold, within 63 bytes.
///
/// # Errors
/// Postgres failing.
pub async fn slot_name(
    client: &impl GenericClient,
    config: &Config,
) -> Result<String, SchemaError> {
    if !config.feeds.wal_slot.is_empty() {
        return Ok(config.feeds.wal_slot.clone());
    }
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "naming the replication slot",
            source,
        })?
        .get(0);
    let mut name: String = format!("syncar_{db}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    name.truncate(63);
    Ok(name)
}

/// The capture the schema was migrated for, from the state table.
///
/// # Errors
/// [`SchemaError::NotMigrated`] when the state table or its `source` is missing, or the
/// configured source disagrees with it; Postgres failing.
pub(super) async fn load(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Capture, SchemaError> {
    let schema = &config.postgres.schema;
    let state = read_state(client, schema).await?;
    let source = match state.get("source").map(String::as_str) {
        Some("wal") => PostgresSource::Wal,
        Some("changes_log") => PostgresSource::ChangesLog,
        Some("notify") => PostgresSource::Notify,
        other => {
            return Err(SchemaError::NotMigrated(format!(
                "{schema}.{STATE_TABLE} names no source ({other:?})"
            )))
        }
    };
    let configured = config.feeds.postgres_source;
    if configured != PostgresSource::Auto && configured != source {
        return Err(SchemaError::NotMigrated(format!(
            "the schema is migrated for postgres_source = {:?}, but this instance is configured \
             for {:?}; every instance of a deployment must use the same source",
            source.as_str(),
            configured.as_str()
        )));
    }
    let slot = match source {
        PostgresSource::Wal => slot_name(client, config).await?,
        _ => String::new(),
    };
    Ok(Capture {
        source,
        reason: state
            .get("source_reason")
            .cloned()
            .unwrap_or_else(|| "configured".into()),
        slot,
        publication: config.feeds.wal_publication.clone(),
    })
}

/// The state table's name for the publication syncar created for the `wal` source: the one
/// a migration to another source or an uninstall drops (a publication of the customer's may
/// share the configured name, and one of another deployment the database). Only the
/// uninstall of an install that has no state table at all (an early release) falls back on
/// the configured name.
pub(super) const OWN_PUBLICATION: &str = "publication";

/// The publication syncar created for the `wal` source, as [`own_publication`] finds it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OwnPublication {
    /// None recorded (and no fallback): nothing of syncar's to drop.
    NoneRecorded,
    /// Recorded, but no longer there: only the record is left.
    Gone(String),
    /// A relay streams the slot: dropping it would break that relay for good (pgoutput
    /// decodes each change with the catalog as of that change).
    Streamed(String),
    /// This role may not drop it (not a member of its owner).
    NotOwned(String),
    /// Syncar's, there, idle, and this role's to drop.
    Droppable(String),
}

/// The publication syncar created for the `wal` source (the state table's
/// [`OWN_PUBLICATION`]; where none is recorded, `fallback`: an install by an earlier
/// release, which recorded none), and whether it may be dropped now: not while `slot` is
/// streamed, and only by a member of its owner.
///
/// # Errors
/// Postgres failing.
pub(super) async fn own_publication(
    client: &impl GenericClient,
    schema: &str,
    fallback: Option<&str>,
    slot: &str,
) -> Result<OwnPublication, SchemaError> {
    let recorded = read_state_value(client, schema, OWN_PUBLICATION).await?;
    let Some(name) = recorded.or(fallback.map(str::to_string)) else {
        return Ok(OwnPublication::NoneRecorded);
    };
    let row = client
        .query_opt(
            "SELECT pg_catalog.pg_has_role(p.pubowner, 'USAGE'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s \
                            WHERE s.slot_name OPERATOR(pg_catalog.=) $2 AND s.active) \
             FROM pg_catalog.pg_publication p WHERE p.pubname OPERATOR(pg_catalog.=) $1",
            &[&name, &slot],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the publication",
            source,
        })?;
    Ok(
        match row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
            None => OwnPublication::Gone(name),
            Some((_, true)) => OwnPublication::Streamed(name),
            Some((false, _)) => OwnPublication::NotOwned(name),
            Some((true, false)) => OwnPublication::Droppable(name),
        },
    )
}

/// The statement giving the changes log `REPLICA IDENTITY FULL`, where a publication that
/// publishes deletes carries it (one of [`sharing_publications`]) and it has no replica
/// identity: without one, Postgres refuses syncar's pruning of the log ("does not have a
/// replica identity and publishes deletes") and the log grows without end. `Err` with a
/// warning instead when this role may not alter the log (not a member of its owner: an
/// install by an administrator, served by a smaller role), so that the migration never
/// fails for it; `None` when there is nothing to do. On a database where the log is only
/// planned (`--print-sql` before the install), a publication `FOR ALL TABLES` that
/// publishes deletes is what would carry it.
///
/// # Errors
/// Postgres failing.
pub(super) async fn changes_log_identity(
    client: &impl GenericClient,
    schema: &str,
) -> Result<Option<Result<String, String>>, SchemaError> {
    let pg = |source| SchemaError::Postgres {
        doing: "looking up the changes log's publications",
        source,
    };
    let table = format!(
        "{}.{}",
        quote_ident(schema),
        quote_ident(super::names::CHANGES_TABLE)
    );
    let statement = format!("ALTER TABLE {table} REPLICA IDENTITY FULL");
    if table_oid(client, schema, super::names::CHANGES_TABLE, "r")
        .await?
        .is_none()
    {
        let all: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication \
                 WHERE puballtables AND pubdelete)",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        return Ok(all.then_some(Ok(statement)));
    }
    let row = client
        .query_opt(
            "SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE') FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
               WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relname OPERATOR(pg_catalog.=) $2 \
                 AND (c.relreplident OPERATOR(pg_catalog.=) 'n' \
                      OR (c.relreplident OPERATOR(pg_catalog.=) 'd' AND NOT EXISTS ( \
                          SELECT 1 FROM pg_catalog.pg_index i \
                          WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisprimary))) \
                 AND EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t \
                   JOIN pg_catalog.pg_publication p ON p.pubname OPERATOR(pg_catalog.=) t.pubname \
                   WHERE t.schemaname OPERATOR(pg_catalog.=) n.nspname \
                     AND t.tablename OPERATOR(pg_catalog.=) c.relname AND p.pubdelete)",
            &[&schema, &super::names::CHANGES_TABLE],
        )
        .await
        .map_err(pg)?;
    Ok(row.map(|row| {
        if row.get::<_, bool>(0) {
            Ok(statement)
        } else {
            Err(format!(
                "a publication publishes deletes of {table}, which has no replica identity, so \
                 Postgres refuses syncar's pruning of it and it grows without end; this role does \
                 not own it: run {statement} as its owner"
            ))
        }
    }))
}

/// Whether syncar is installed on this database: its state table records the source it was
/// migrated for (`syncar uninstall` forgets it). The schema task asks before it installs a
/// table that came to fit, so as never to undo an uninstall.
///
/// # Errors
/// Postgres failing.
pub async fn installed(client: &impl GenericClient, schema: &str) -> Result<bool, SchemaError> {
    match recorded_source(client, schema).await {
        Ok(source) => Ok(source.is_some()),
        Err(SchemaError::NotMigrated(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

async fn read_state(
    client: &impl GenericClient,
    schema: &str,
) -> Result<std::collections::HashMap<String, String>, SchemaError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2)",
            &[&schema, &STATE_TABLE],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the state table",
            source,
        })?
        .get(0);
    if !exists {
        return Err(SchemaError::NotMigrated(format!(
            "table {schema}.{STATE_TABLE} is missing"
        )));
    }
    let rows = client
        .query(
            &format!(
                "SELECT name, value FROM {}.{STATE_TABLE}",
                quote_ident(schema)
            ),
            &[],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "reading the state table",
            source,
        })?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records `name = value` in the state table.
///
/// # Errors
/// Postgres failing.
pub(super) async fn write_state(
    client: &impl GenericClient,
    schema: &str,
    name: &str,
    value: &str,
) -> Result<(), SchemaError> {
    client
        .execute(
            &format!(
                "INSERT INTO {}.{STATE_TABLE} (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                quote_ident(schema)
            ),
            &[&name, &value],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "writing the state table",
            source,
        })?;
    Ok(())
}

/// One value of the state table, if recorded.
///
/// # Errors
/// Postgres failing.
pub(super) async fn read_state_value(
    client: &impl GenericClient,
    schema: &str,
    name: &str,
) -> Result<Option<String>, SchemaError> {
    Ok(client
        .query_opt(
            &format!(
                "SELECT value FROM {}.{STATE_TABLE} WHERE name OPERATOR(pg_catalog.=) $1",
                quote_ident(schema)
            ),
            &[&name],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "reading the state table",
            source,
        })?
        .map(|row| row.get(0)))
}

/// The statement that forgets the state table's `name`.
pub(super) fn delete_state_sql(schema: &str, name: &str) -> String {
    format!(
        "DELETE FROM {}.{STATE_TABLE} WHERE name = {}",
        quote_ident(schema),
        quote_literal(name)
    )
}

/// [`write_state`] as one statement with its values written in, for a migration's script.
pub(super) fn write_state_sql(schema: &str, name: &str, value: &str) -> String {
    format!(
        "INSERT INTO {}.{STATE_TABLE} (name, value) VALUES ({}, {}) \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        quote_ident(schema),
        quote_literal(name),
        quote_literal(value)
    )
}

/// One table of the publication: schema, table, and the columns to publish (`None`: all).
pub(super) type Published = (String, String, Option<Vec<String>>);

/// What makes the publication name exactly `tables`, each with its column list where one is
/// given (Postgres 15 and later): the statement and a line saying what it does, or `None`
/// when it already does. The migration gives no list (see there); a list left by an earlier
/// release, which published only the key, the version and the replica identity, is removed.
///
/// # Errors
/// Postgres failing.
pub(super) async fn publication_change(
    client: &impl GenericClient,
    publication: &str,
    tables: &[Published],
) -> Result<Option<(String, String)>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let lists = server_version_num(client).await? >= 150_000;
    let exists = publication_exists(client, publication).await?;
    let mut wanted: Vec<Published> = tables
        .iter()
        .map(|(s, t, cols)| {
            let cols = cols.clone().filter(|_| lists).map(|mut c| {
                c.sort();
                c.dedup();
                c
            });
            (s.clone(), t.clone(), cols)
        })
        .collect();
    wanted.sort();
    let mut current: Vec<Published> = if !exists {
        Vec::new()
    } else if lists {
        client
            .query(
                "SELECT p.schemaname::text, p.tablename::text, \
                        CASE WHEN pg_catalog.array_length(p.attnames, 1) = (SELECT count(*) FROM pg_attribute a \
                             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                             WHERE n.nspname = p.schemaname AND c.relname = p.tablename \
                               AND a.attnum > 0 AND NOT a.attisdropped) \
                             THEN NULL ELSE p.attnames::text[] END \
                 FROM pg_publication_tables p WHERE p.pubname = $1",
                &[&publication],
            )
            .await
            .map_err(pg("looking up the publication"))?
            .iter()
            .map(|r| {
                let cols: Option<Vec<String>> = r.get(2);
                (r.get(0), r.get(1), cols.map(|mut c| {
                    c.sort();
                    c
                }))
            })
            .collect()
    } else {
        client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
                 WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(pg("looking up the publication"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), None))
            .collect()
    };
    current.sort();
    if exists && current == wanted {
        return Ok(None);
    }
    let list = wanted
        .iter()
        .map(|(s, t, cols)| {
            let cols = cols.as_ref().map_or(String::new(), |c| {
                format!(
                    " ({})",
                    c.iter()
                        .map(|c| quote_ident(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            format!("{}.{}{cols}", quote_ident(s), quote_ident(t))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let p = quote_ident(publication);
    let sql = if exists {
        format!("ALTER PUBLICATION {p} SET TABLE {list}")
    } else {
        format!("CREATE PUBLICATION {p} FOR TABLE {list}")
    };
    Ok(Some((
        sql,
        format!("publication {publication} names {list}"),
    )))
}

/// What [`ensure_slot`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// In use as it was.
    Kept,
    /// Created (there was none, and none was recorded).
    Created,
    /// Created, though the state table records that syncar had created one before (its
    /// `slot_epoch`): the slot did not follow a failover to this server (Postgres before
    /// 17, or a standby without `sync_replication_slots`, or a slot not yet synchronized
    /// when the standby was promoted), or somebody dropped it. Changes since are lost to it.
    Missing,
    /// The slot was invalidated (its WAL removed, `wal_status = lost`) and was dropped and
    /// created again: every change since its last confirmed position is lost to it.
    Recreated,
}

/// Makes sure the logical replication slot `slot` exists for pgoutput and can still stream,
/// recording a new `slot_epoch` when it had to be created. On Postgres 17 and later the slot
/// is created as a failover slot (`pg_create_logical_replication_slot(..., failover =>
/// true)`): a standby with `sync_replication_slots = on` keeps a copy that continues after
/// its promotion. Run outside any transaction that wrote (Postgres refuses to create a slot
/// there), as a role that may replicate.
///
/// # Errors
/// Postgres failing; a slot of that name for another plugin or database.
pub async fn ensure_slot(
    client: &impl GenericClient,
    schema: &str,
    slot: &str,
) -> Result<SlotState, SchemaError> {
    let (state, statements) = slot_plan(client, schema, slot).await?;
    for sql in statements {
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SchemaError::Postgres {
                doing: "creating the replication slot",
                source,
            })?;
    }
    Ok(state)
}

/// What [`ensure_slot`] finds, and the statements that make the slot right (none when it
/// is kept), in order: a new `slot_epoch` first (if this stops halfway, the next attempt
/// finds an epoch Redis was not fed by, never an old one beside a new slot), the drop of an
/// invalidated slot, the creation.
///
/// # Errors
/// Postgres failing; a slot of that name for another plugin or database.
pub(super) async fn slot_plan(
    client: &impl GenericClient,
    schema: &str,
    slot: &str,
) -> Result<(SlotState, Vec<String>), SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text = current_database()::text, \
                    coalesce(wal_status, '') = 'lost', active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    let state = match row {
        Some(row) => {
            let (plugin, here, lost, active): (Option<String>, Option<bool>, bool, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if plugin.as_deref() != Some("pgoutput") || here != Some(true) {
                return Err(SchemaError::Invalid(format!(
                    "replication slot {slot:?} exists for another plugin or database; set \
                     feeds.wal_slot to a free name"
                )));
            }
            if !lost {
                return Ok((SlotState::Kept, Vec::new()));
            }
            if active {
                // Its consumer fails on its own and lets go; try again then.
                return Err(SchemaError::Invalid(format!(
                    "replication slot {slot:?} is invalidated but still held"
                )));
            }
            SlotState::Recreated
        }
        // (A plan on a fresh database has only planned the state table.)
        None if table_oid(client, schema, STATE_TABLE, "r").await?.is_some()
            && slot_epoch(client, schema).await?.is_some() =>
        {
            SlotState::Missing
        }
        None => SlotState::Created,
    };
    let mut statements = vec![format!(
        "INSERT INTO {s}.{STATE_TABLE} (name, value) \
         SELECT 'slot_epoch', pg_catalog.nextval({seq}::pg_catalog.regclass)::text \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        s = quote_ident(schema),
        seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"))
    )];
    if state == SlotState::Recreated {
        statements.push(format!(
            "SELECT pg_catalog.pg_drop_replication_slot({})",
            quote_literal(slot)
        ));
    }
    statements.push(if server_version_num(client).await? >= 170_000 {
        // slot_name, plugin, temporary, twophase, failover
        format!(
            "SELECT pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput', false, false, true)",
            quote_literal(slot)
        )
    } else {
        format!(
            "SELECT pg_catalog.pg_create_logical_replication_slot({}, 'pgoutput')",
            quote_literal(slot)
        )
    });
    Ok((state, statements))
}

/// `server_version_num`: 170004 for 17.4.
///
/// # Errors
/// Postgres failing.
pub async fn server_version_num(client: &impl GenericClient) -> Result<i32, SchemaError> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "reading the server's version",
            source,
        })?
        .get(0))
}

/// What would keep the relay's slot from following a failover to a standby, on Postgres 17
/// and later: the slot is not a failover slot (created before syncar made failover slots),
/// or the primary's `synchronized_standby_slots` is empty (then the relay may relay a
/// change no standby has yet). One line each, with what to do; empty before Postgres 17
/// (no slot follows a failover there) and when the settings cannot be read.
///
/// # Errors
/// Postgres failing.
pub async fn failover_gaps(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Vec<String>, SchemaError> {
    if server_version_num(client).await? < 170_000 {
        return Ok(Vec::new());
    }
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let mut gaps = Vec::new();
    let failover: Option<bool> = client
        .query_opt(
            "SELECT (pg_catalog.to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading the slot's failover flag"))?
        .and_then(|r| r.get(0));
    if failover == Some(false) {
        gaps.push(format!(
            "replication slot {slot:?} is not a failover slot, so a standby cannot keep it: \
             run `psql \"dbname=<database> replication=database\" -c 'ALTER_REPLICATION_SLOT \
             {slot} (FAILOVER true)'` (syncar creates its slots so from Postgres 17 on)"
        ));
    }
    let standby_slots: String = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(pg("reading synchronized_standby_slots"))?
        .get(0);
    if standby_slots.trim().is_empty() {
        gaps.push(
            "synchronized_standby_slots is empty on the primary: the relay may relay changes \
             a standby has not received, which a failover to it loses; name the standby's \
             physical slot there (see README \"Failover\")"
                .into(),
        );
    }
    Ok(gaps)
}

/// What to do when nothing bounds the WAL the relay's slot keeps: `max_slot_wal_keep_size`
/// is -1 (Postgres' default), so while no relay confirms (every instance stopped, or left
/// running without Redis) the primary keeps every WAL segment until its disk is full, and
/// then fails every statement. `None` when it is bounded.
///
/// # Errors
/// Postgres failing.
pub async fn retention_gap(client: &impl GenericClient) -> Result<Option<String>, SchemaError> {
    let keep: String = client
        .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "reading max_slot_wal_keep_size",
            source,
        })?
        .get(0);
    Ok((keep.trim() == "-1").then(|| {
        "max_slot_wal_keep_size is -1: while no relay reads the replication slot (every \
         instance stopped, or Redis down), the primary keeps all its WAL until the disk is \
         full and every statement fails; set it within the disk you can spare (ALTER SYSTEM \
         SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); on a managed service, \
         its parameter), after which Postgres invalidates the slot instead and syncar flushes \
         the caches and recreates it (README \"Caring for the slot\")"
            .to_string()
    }))
}

/// The customer's publications that carry syncar's own tables to their subscribers: one
/// `FOR ALL TABLES`, or one that lists them (`FOR TABLES IN SCHEMA`, or by name), other than
/// syncar's `own` (the `wal` source's, which publishes `syncar_kv` on purpose). Such a
/// publication picks up syncar's tables at the install, and a Postgres subscriber that does
/// not have them stops applying every change ("logical replication target relation ...
/// does not exist", see Postgres' "Logical Replication" chapter, "Restrictions"). Returns a
/// warning naming them and what to do, or `None`. Inside the migration's transaction the
/// new tables are seen already; before the install, a `FOR ALL TABLES` one is.
///
/// # Errors
/// Postgres failing.
pub async fn sharing_publications(
    client: &impl GenericClient,
    schema: &str,
    own: &str,
) -> Result<Option<String>, SchemaError> {
    let tables = [STATE_TABLE, super::names::CHANGES_TABLE, "syncar_kv"];
    let names: Vec<String> = client
        .query(
            "SELECT p.pubname::pg_catalog.text FROM pg_catalog.pg_publication p \
             WHERE p.pubname OPERATOR(pg_catalog.<>) $3 AND (p.puballtables OR EXISTS ( \
               SELECT 1 FROM pg_catalog.pg_publication_tables t \
               WHERE t.pubname OPERATOR(pg_catalog.=) p.pubname \
                 AND t.schemaname OPERATOR(pg_catalog.=) $1 \
                 AND t.tablename::pg_catalog.text OPERATOR(pg_catalog.=) ANY($2::pg_catalog.text[]))) \
             ORDER BY 1",
            &[&schema, &&tables[..], &own],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up publications",
            source,
        })?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!names.is_empty()).then(|| {
        format!(
            "publication {} carries syncar's own tables ({schema}.{}) to its subscribers (FOR \
             ALL TABLES, or listing them): a Postgres subscriber without these tables stops \
             replicating at their first change (\"logical replication target relation ... does \
             not exist\"); create them on each subscriber first (`pg_dump --schema-only \
             --table '{schema}.syncar_*'` prints them; leave out its CREATE TRIGGER lines), \
             or publish your tables by name (README \"Other publications\")",
            names.join(", "),
            tables.join(&format!(", {schema}."))
        )
    }))
}

/// Records a fresh version as the slot's epoch (see [`STATE_TABLE`]) and returns it.
///
/// # Errors
/// Postgres failing.
pub async fn new_slot_epoch(client: &impl GenericClient, schema: &str) -> Result<i64, SchemaError> {
    let epoch: i64 = client
        .query_one(
            &format!(
                "SELECT pg_catalog.nextval({}::pg_catalog.regclass)",
                quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"))
            ),
            &[],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "taking the slot's epoch",
            source,
        })?
        .get(0);
    write_state(client, schema, "slot_epoch", &epoch.to_string()).await?;
    Ok(epoch)
}

/// The source the schema is migrated for now, as the state table records it.
///
/// # Errors
/// Postgres failing, or no state table.
pub async fn recorded_source(
    client: &impl GenericClient,
    schema: &str,
) -> Result<Option<String>, SchemaError> {
    Ok(read_state(client, schema).await?.remove("source"))
}

/// The version taken when the current slot was created, if recorded.
///
/// # Errors
/// Postgres failing, or no state table.
pub async fn slot_epoch(
    client: &impl GenericClient,
    schema: &str,
) -> Result<Option<i64>, SchemaError> {
    Ok(read_state(client, schema)
        .await?
        .get("slot_epoch")
        .and_then(|v| v.parse().ok()))
}

/// The statement that drops the slot if it exists and nobody streams it (a slot nobody reads
/// retains WAL until the primary's disk is full); `None` when there is no such slot.
///
/// # Errors
/// Postgres failing.
pub(super) async fn idle_slot(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<String>, SchemaError> {
    let idle: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active AND database = current_database())",
            &[&slot],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the replication slot",
            source,
        })?
        .get(0);
    Ok(idle.then(|| {
        format!(
            "SELECT pg_catalog.pg_drop_replication_slot({})",
            quote_literal(slot)
        )
    }))
}

/// Drops the slot if it exists and nobody streams it: a slot nobody reads retains WAL until
/// the primary's disk is full. Returns a line when it dropped one.
///
/// # Errors
/// Postgres failing.
pub(super) async fn drop_idle_slot(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<String>, SchemaError> {
    let dropped = client
        .query_opt(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "dropping the replication slot",
            source,
        })?;
    Ok(dropped.map(|_| format!("dropped replication slot {slot}")))
}

/// How far the slot lags: bytes of WAL it retains behind the server's current position, and
/// whether its WAL is still all there (`wal_status` not `lost`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLag {
    pub bytes: i64,
    pub lost: bool,
}

/// [`SlotLag`] of `slot`; `None` when it does not exist.
///
/// # Errors
/// Postgres failing.
pub async fn slot_lag(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<SlotLag>, SchemaError> {
    let row = client
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint, \
                    coalesce(wal_status, '') = 'lost' \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "measuring the slot's lag",
            source,
        })?;
    Ok(row.map(|r| SlotLag {
        bytes: r.get(0),
        lost: r.get(1),
    }))
}

/// Whether the publication `name` exists.
///
/// # Errors
/// Postgres failing.
pub(crate) async fn publication_exists(
    client: &impl GenericClient,
    name: &str,
) -> Result<bool, SchemaError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the publication",
            source,
        })?
        .get(0))
}
