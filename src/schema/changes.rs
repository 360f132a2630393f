//! The changes log (`syncar_changes`): what the triggers appended, read back for replay and
//! by the poller, and pruned. Every row becomes a [`Message`], the feeds' vocabulary.

use tokio_postgres::GenericClient;

use super::capture::STATE_TABLE;
use super::names::{CHANGES_TABLE, MIGRATION_LOCK};
use crate::coherence::{Message, Op};
use crate::resource::quote_ident;

/// The newest logged change of every key changed within the last `ago`, by Postgres' clock
/// (so the instance's own clock does not matter). The messages carry no timestamp.
///
/// # Errors
/// Postgres failing.
pub async fn changes_since(
    client: &impl GenericClient,
    schema: &str,
    ago: std::time::Duration,
) -> Result<Vec<Message>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT DISTINCT ON (resource, key) resource, key, version, op FROM {}.{CHANGES_TABLE} \
         WHERE at >= clock_timestamp() - pg_catalog.make_interval(secs => $1::pg_catalog.float8) \
         ORDER BY resource, key, version DESC",
        quote_ident(schema)
    );
    let rows = client.query(&sql, &[&ago.as_secs_f64()]).await?;
    Ok(rows
        .iter()
        .map(|r| logged(r.get(0), r.get(1), r.get(2), r.get(3), None))
        .collect())
}

/// Deletes log entries older than `retention`, unless another instance is doing it (a
/// transaction-scoped advisory lock, taken in the same statement). Returns the rows deleted.
///
/// # Errors
/// Postgres failing.
pub async fn prune_changes(
    client: &impl GenericClient,
    schema: &str,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "WITH lock AS (SELECT pg_catalog.pg_try_advisory_xact_lock($1::int8) AS held) \
                 DELETE FROM {}.{CHANGES_TABLE} \
                 WHERE (SELECT held FROM lock) AND at < clock_timestamp() - pg_catalog.make_interval(secs => $2::pg_catalog.float8)",
                quote_ident(schema)
            ),
            &[&(MIGRATION_LOCK + 1), &retention.as_secs_f64()],
        )
        .await
}

/// The poll of the changes log, prepared once per connection (an unnamed statement costs a
/// second round trip on every poll).
pub struct ChangesQuery(tokio_postgres::Statement);

impl ChangesQuery {
    /// Prepares the poll on `client`.
    ///
    /// # Errors
    /// Postgres failing.
    pub async fn prepare(
        client: &tokio_postgres::Client,
        schema: &str,
    ) -> Result<ChangesQuery, tokio_postgres::Error> {
        let s = quote_ident(schema);
        let sql = format!(
            "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) \
             SELECT (SELECT xmin FROM s), c.xid, c.resource, c.key, c.version, c.op, \
                    (extract(epoch FROM c.at) OPERATOR(pg_catalog.*) 1000000::pg_catalog.numeric)::bigint, \
                    (SELECT value FROM {s}.{STATE_TABLE} WHERE name = 'source') \
             FROM (SELECT 1) one LEFT JOIN {s}.{CHANGES_TABLE} c ON c.xid >= $1 ORDER BY c.xid"
        );
        Ok(ChangesQuery(client.prepare(&sql).await?))
    }

    /// Changes of transactions with an id of `from_xid` or more, visible now, each with its
    /// transaction id, the source the schema is migrated for now (another instance may have
    /// migrated it to another source, which no longer writes the log), and the xmin of the
    /// same snapshot: every transaction below it has ended, so nothing with a smaller id can
    /// still appear. Polling from the last xmin therefore misses nothing, however commits are
    /// ordered; rows at or above it are read again next time (callers skip what they
    /// applied). Messages carry the trigger's time in `ts_us`.
    ///
    /// # Errors
    /// Postgres failing.
    pub async fn poll(
        &self,
        client: &tokio_postgres::Client,
        from_xid: i64,
    ) -> Result<(i64, Option<String>, Vec<(i64, Message)>), tokio_postgres::Error> {
        let rows = client.query(&self.0, &[&from_xid]).await?;
        let xmin: i64 = rows.first().map_or(from_xid, |r| r.get(0));
        let source: Option<String> = rows.first().and_then(|r| r.get(7));
        let changes = rows
            .iter()
            .filter_map(|r| {
                let xid: Option<i64> = r.get(1);
                let ts_us = r.get::<_, Option<i64>>(6).unwrap_or_default();
                Some((
                    xid?,
                    logged(r.get(2), r.get(3), r.get(4), r.get(5), Some(ts_us)),
                ))
            })
            .collect();
        Ok((xmin, source, changes))
    }
}

/// The xmin of a snapshot taken now: the starting point of a fresh poller.
///
/// # Errors
/// Postgres failing.
pub async fn current_xmin(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get(0))
}

/// A log row as a message. The triggers write only `put`, `delete` and `flush`; anything
/// else (a row someone else inserted) is treated as a `put`, which invalidates.
fn logged(
    resource: String,
    key: Option<String>,
    version: i64,
    op: String,
    ts_us: Option<i64>,
) -> Message {
    Message {
        op: match op.as_str() {
            "delete" => Op::Delete,
            "flush" => Op::Flush,
            _ => Op::Put,
        },
        resource,
        key,
        version,
        ts_us,
        instance: None,
    }
}
