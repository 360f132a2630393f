//! One migration at a time, and never a table's readers held behind it: the migration's
//! advisory lock, its short `lock_timeout`, and the retries after a lock timeout (saying
//! who held the lock). Decides nothing about what a migration changes.

use std::time::Duration;

use super::error::SchemaError;
use super::names::MIGRATION_LOCK;
use crate::config::Config;

/// How long one statement of the migration waits for a table lock. While a lock request
/// waits, every later request for that table queues behind it, readers included: so it
/// waits briefly and the whole migration is tried again later.
pub(super) const LOCK_TIMEOUT: Duration = Duration::from_millis(20);

/// Tries a migration (or an uninstall) again after a lock timeout, for up to
/// [`LOCK_RETRIES_FOR`], with the crate's one backoff.
pub(super) struct LockRetries {
    started: std::time::Instant,
    backoff: crate::backoff::Backoff,
}

/// Starts the transaction `migrate` and `uninstall` run in, holding the migration lock (one
/// at a time across instances) with a `lock_timeout` of [`LOCK_TIMEOUT`]: adding a column
/// or changing triggers locks each table, and a lock request queued behind a long reader
/// blocks every later query of that table, so give up at once instead (`migrate` retries
/// with backoff, `serve` too).
///
/// # Errors
/// Postgres failing.
pub(super) async fn begin_locked(
    client: &mut tokio_postgres::Client,
    read_only: bool,
) -> Result<tokio_postgres::Transaction<'_>, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    // A plan only looks: read-only, so nothing it runs can change anything.
    let tx = client
        .build_transaction()
        .read_only(read_only)
        .start()
        .await
        .map_err(pg("starting the migration"))?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1::int8)",
        &[&MIGRATION_LOCK],
    )
    .await
    .map_err(pg("taking the migration lock"))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis()
    ))
    .await
    .map_err(pg("setting lock_timeout"))?;
    Ok(tx)
}

/// In `tx`, the migration lock if no one holds it, then a `lock_timeout` of
/// [`LOCK_TIMEOUT`]: for the schema task's small repairs (publishing a table again, enabling
/// a trigger always), which a running migration does the same way and which a customer's
/// lock on the table defers rather than queues. Returns whether the lock was taken (`false`:
/// do nothing now).
///
/// # Errors
/// Postgres failing.
pub(super) async fn try_migration_lock(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<bool, SchemaError> {
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    let locked: bool = tx
        .query_one(
            "SELECT pg_catalog.pg_try_advisory_xact_lock($1::int8)",
            &[&MIGRATION_LOCK],
        )
        .await
        .map_err(pg("taking the migration lock"))?
        .get(0);
    if locked {
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            LOCK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(pg("setting lock_timeout"))?;
    }
    Ok(locked)
}

impl LockRetries {
    /// Starts counting the time allowed, now.
    pub(super) fn new() -> Self {
        LockRetries {
            started: std::time::Instant::now(),
            backoff: crate::backoff::Backoff::new(
                Duration::from_millis(50),
                Duration::from_secs(2),
            ),
        }
    }

    /// Whether to try again after `e`: a lock timeout within the time allowed, after saying
    /// who holds the lock and waiting the next pause.
    pub(super) async fn again(
        &mut self,
        e: &SchemaError,
        what: &str,
        client: &tokio_postgres::Client,
        config: &Config,
    ) -> bool {
        if !e.is_lock_timeout() || self.started.elapsed() >= LOCK_RETRIES_FOR {
            return false;
        }
        let pause = self.backoff.next_pause();
        let held = lock_holders(client, config).await;
        tracing::warn!(
            step = e.step(),
            held_by = %held,
            retry_in_ms = pause.as_millis() as u64,
            "the {what} waited {} ms for a table lock and gave up, so as not to hold that \
             table's readers and writers behind it; retrying",
            LOCK_TIMEOUT.as_millis()
        );
        tokio::time::sleep(pause).await;
        true
    }
}

/// How long `migrate` (or `uninstall`) goes on retrying when it could not get its locks.
const LOCK_RETRIES_FOR: Duration = Duration::from_secs(60);

/// Who holds locks on the configured tables (and syncar's), for the log: pid, state, how
/// long its transaction has been open, and the start of its query.
async fn lock_holders(client: &tokio_postgres::Client, config: &Config) -> String {
    let tables: Vec<String> = std::iter::once(format!("{}.syncar_kv", config.postgres.schema))
        .chain(
            config
                .resources
                .iter()
                .map(|r| format!("{}.{}", r.schema, r.table)),
        )
        .collect();
    let rows = client
        .query(
            "SELECT DISTINCT l.relation::regclass::text, a.pid, coalesce(a.state, ''), \
                    coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8, \
                    left(coalesce(a.query, ''), 60) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE l.granted AND a.pid <> pg_backend_pid() \
               AND pg_catalog.concat(n.nspname, '.', c.relname) = ANY($1::pg_catalog.text[]) \
             ORDER BY 4 DESC LIMIT 3",
            &[&tables],
        )
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => "nobody now".into(),
        Ok(rows) => rows
            .iter()
            .map(|r| {
                let (table, pid, state, secs, query): (String, i32, String, f64, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                format!("{table}: pid {pid}, {state} for {secs:.1} s ({query})")
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("unknown ({e})"),
    }
}
