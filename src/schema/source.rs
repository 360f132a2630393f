//! Which source a migration installs for, and its record in the state table: the recorded
//! one, kept (`auto` decides once, on a fresh install), or the one decided now
//! ([`capture::resolve`]). Installs no trigger.

use super::capture::{self, STATE_TABLE};
use super::error::SchemaError;
use super::objects::Found;
use super::script::Sink;
use super::table::TableInfo;
use crate::config::{Config, PostgresSource, ResourceConfig};
use crate::resource::quote_ident;

/// The source to install for, with the reason: under `auto`, the recorded one (or the
/// changes log of an install by an earlier release, which recorded none); else the
/// configured one, or what `auto` decides now ([`capture::resolve`]) for `tables`.
///
/// `auto` decides once, on a fresh install: switching a running deployment's source under
/// instances that poll the log (or listen) would leave them vouching for a log that no
/// longer hears inserts and updates. Instances of an earlier release know nothing of the
/// recorded source, so their install keeps the changes log too.
///
/// # Errors
/// `wal` configured where the server cannot do it; Postgres failing.
pub(super) async fn decide_source(
    tx: &tokio_postgres::Transaction<'_>,
    config: &Config,
    found: &Found,
    tables: &[(&ResourceConfig, &TableInfo)],
) -> Result<(PostgresSource, String), SchemaError> {
    let s = quote_ident(&config.postgres.schema);
    // (A plan on a fresh database reads no state table: it is only planned.)
    let recorded: Option<String> = if found.state_table {
        tx.query_opt(
            &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = 'source'"),
            &[],
        )
        .await
        .map_err(reading)?
        .map(|row| row.get(0))
    } else {
        None
    };
    let recorded_source = match recorded.as_deref() {
        Some("wal") => Some(PostgresSource::Wal),
        Some("notify") => Some(PostgresSource::Notify),
        Some("changes_log") => Some(PostgresSource::ChangesLog),
        _ => None,
    };
    let auto = config.feeds.postgres_source == PostgresSource::Auto;
    Ok(match (auto, recorded_source, found.changes_log) {
        (true, Some(kept), _) => {
            let reason: Option<String> = tx
                .query_opt(
                    &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = 'source_reason'"),
                    &[],
                )
                .await
                .map_err(reading)?
                .map(|row| row.get(0));
            (kept, reason.unwrap_or_else(|| "auto: kept".into()))
        }
        (true, None, true) => (
            PostgresSource::ChangesLog,
            "auto: kept the changes log of an install by an earlier release; set \
             postgres_source = \"wal\" on every instance (all restarted) to switch"
                .to_string(),
        ),
        _ => capture::resolve(tx, config, tables).await?,
    })
}

/// Records `source` and `reason` in the state table where it says otherwise (`state_table`:
/// whether there is one to read yet). Appends a line to `changes` when the source is
/// recorded.
///
/// # Errors
/// Postgres failing.
pub(super) async fn record_source(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    state_table: bool,
    source: PostgresSource,
    reason: &str,
    changes: &mut Vec<String>,
) -> Result<(), SchemaError> {
    let s = quote_ident(schema);
    for (name, value) in [("source", source.as_str()), ("source_reason", reason)] {
        let current: Option<String> = if state_table {
            tx.query_opt(
                &format!("SELECT value FROM {s}.{STATE_TABLE} WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(reading)?
            .map(|row| row.get(0))
        } else {
            None
        };
        if current.as_deref() != Some(value) {
            sink.run(
                tx,
                capture::write_state_sql(schema, name, value),
                "writing the state table",
            )
            .await?;
            if name == "source" {
                changes.push(format!("postgres source is {value} ({reason})"));
            }
        }
    }
    Ok(())
}

/// A read of the state table that failed.
fn reading(source: tokio_postgres::Error) -> SchemaError {
    SchemaError::Postgres {
        doing: "reading the state table",
        source,
    }
}
