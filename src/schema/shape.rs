//! Tables' shapes: a fingerprint of what decides how a resource's rows become documents and
//! whether syncar can serve them (the table's identity, its columns with their types, its
//! single-column unique indexes, the replica identity, syncar's triggers), and the one place
//! a change of shape is announced to the fleet. Runs plain SQL only.
//!
//! # Why
//! A cached document is a rendering of a row in the shape the table had when it was read.
//! After `ALTER TABLE ... ADD COLUMN` the row's version is unchanged but its document is not,
//! so every copy of the old shape must be retired (a flush: the resource's generation raised)
//! and every instance must reload the resource (its columns, its key). Debezium and ReadySet
//! follow the stream's `Relation` messages, which come only with the table's next change;
//! syncar caches documents, so it also notices a DDL that no write follows.
//!
//! # Who announces
//! Whoever already polls Postgres: the relay (`wal`) or each instance's poller (`changes_log`,
//! `notify`), every `feeds.lease / 2`. The state table records the last announced
//! fingerprint of each resource (`shape:{resource}`); recording a new one and announcing the
//! flush are one statement, so among instances that notice the same change at once exactly
//! one announces it. The flush travels the resource's own change stream (a logical message,
//! or the changes log), so every instance and the relay hear it like a TRUNCATE, and each
//! reloads its catalog on hearing it.

use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;

use super::capture::{MESSAGE_PREFIX, STATE_TABLE};
use super::error::SchemaError;
use super::names::{CHANGES_TABLE, NOTIFY_CHANNEL, VERSION_SEQUENCE};
use crate::config::{Config, PostgresSource, ResourceConfig};
use crate::resource::{quote_ident, quote_literal};
pub use crate::resource::{Shapes, TableShape};

/// Checks the configured tables' shapes at most once per `every`, on the connection of
/// whoever polls Postgres already (the relay, or a `changes_log` or `notify` feed), and
/// announces each change to the fleet ([`announce_changes`]). A failure is logged once and
/// is never fatal to the caller: the stream's own messages still tell of most changes.
/// Lives as long as the connection it runs on: its statement is prepared there once, so a
/// check costs Postgres one execution of a plan it keeps, not a parse and a plan of a
/// catalog query every `every` on every instance.
pub struct ShapeCheck {
    every: Duration,
    last: Option<Instant>,
    failing: bool,
    /// [`check_sql`], prepared on the caller's connection at the first check.
    statement: Option<tokio_postgres::Statement>,
}

impl ShapeCheck {
    /// A check due at once, then every `every`.
    pub fn new(every: Duration) -> Self {
        ShapeCheck {
            every,
            last: None,
            failing: false,
            statement: None,
        }
    }

    /// Makes the next [`ShapeCheck::run`] check at once (the stream said a table's shape
    /// changed: a `Relation` message).
    pub fn due_now(&mut self) {
        self.last = None;
    }

    /// Checks, if due, within `limit`, announcing through `source`'s stream.
    pub async fn run(
        &mut self,
        client: &impl GenericClient,
        config: &Config,
        source: PostgresSource,
        limit: Duration,
    ) {
        if self.last.is_some_and(|last| last.elapsed() < self.every) {
            return;
        }
        self.last = Some(Instant::now());
        let check = self.check(client, config, source);
        match tokio::time::timeout(limit, check).await {
            Ok(Ok(changed)) => {
                self.failing = false;
                for resource in changed {
                    tracing::info!(resource = %resource, "a resource's table changed shape; flushing it");
                }
            }
            Ok(Err(e)) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %crate::telemetry::error_chain(&e), "checking the tables' shapes failed");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::telemetry::error_chain(&e), "checking the tables' shapes failed")
            }
            Err(_) => tracing::debug!("checking the tables' shapes timed out"),
        }
    }

    /// [`announce_changes`], with the statement prepared on `client` once.
    async fn check(
        &mut self,
        client: &impl GenericClient,
        config: &Config,
        source: PostgresSource,
    ) -> Result<Vec<String>, SchemaError> {
        let schema = &config.postgres.schema;
        let statement = match &self.statement {
            Some(statement) => statement.clone(),
            None => {
                let statement = client.prepare(&check_sql(schema)).await.map_err(|source| {
                    SchemaError::Postgres {
                        doing: "preparing the check of the tables' shapes",
                        source,
                    }
                })?;
                self.statement.insert(statement).clone()
            }
        };
        let rows = match shape_rows(client, &statement, &config.resources).await {
            Ok(rows) => rows,
            Err(e) => {
                // Prepared again at the next check: a statement the server no longer takes
                // (its plan's result type changed under it) must not stop every check after.
                self.statement = None;
                return Err(e);
            }
        };
        announce_differing(client, schema, source, &rows).await
    }
}

/// One row per configured resource: `name`, its live `fingerprint` (NULL: no such table) and
/// the one last announced (the state table's `shape:{name}`; NULL: none yet), for the
/// arrays `$1`, `$2`, `$3` of [`table_arrays`].
fn check_sql(schema: &str) -> String {
    format!(
        "SELECT f.name, f.fingerprint, (SELECT st.value FROM {}.{STATE_TABLE} st \
         WHERE st.name = 'shape:' || f.name) FROM ({FINGERPRINT_SQL}) f",
        quote_ident(schema)
    )
}

/// The resources' names, schemas and tables as three arrays, the bind parameters of a query
/// over `unnest($1::text[], $2::text[], $3::text[])`.
pub(super) fn table_arrays(resources: &[ResourceConfig]) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    resources
        .iter()
        .fold((vec![], vec![], vec![]), |(mut n, mut s, mut t), r| {
            n.push(r.name.as_str());
            s.push(r.schema.as_str());
            t.push(r.table.as_str());
            (n, s, t)
        })
}

/// The shape of every table in `resources`, in one query.
///
/// # Errors
/// Postgres failing.
pub async fn fingerprints(
    client: &impl GenericClient,
    schema: &str,
    resources: &[ResourceConfig],
) -> Result<Shapes, SchemaError> {
    // The epoch is read in the same snapshot as the fingerprint: a catalog read between a
    // change and its announcement holds the old epoch and the new fingerprint, and the
    // announcement's recheck then finds the epoch changed.
    let sql = format!(
        "SELECT f.name, f.fingerprint, coalesce((SELECT st.value FROM {}.{STATE_TABLE} st \
         WHERE st.name = 'shape_epoch:' || f.name), '0') FROM ({FINGERPRINT_SQL}) f",
        quote_ident(schema)
    );
    let rows = shape_rows(client, sql.as_str(), resources).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let epoch: String = r.get(2);
            let shape = TableShape {
                fingerprint: r.get(1),
                epoch: epoch.parse().unwrap_or(0),
            };
            (r.get(0), shape)
        })
        .collect())
}

/// Compares each resource's live fingerprint with the one last announced (the state table's
/// `shape:{resource}`) and, for each that differs, records the new one and announces a flush
/// of the resource through `source`'s stream, atomically. Returns the resources announced.
/// The first check after an install announces every resource once (nothing was recorded).
///
/// # Errors
/// Postgres failing; a resource announced before the failure stays announced.
pub async fn announce_changes(
    client: &impl GenericClient,
    schema: &str,
    source: PostgresSource,
    resources: &[ResourceConfig],
) -> Result<Vec<String>, SchemaError> {
    let rows = shape_rows(client, check_sql(schema).as_str(), resources).await?;
    announce_differing(client, schema, source, &rows).await
}

/// The rows of `statement` (SQL over [`FINGERPRINT_SQL`], or its prepared form) for the
/// arrays of `resources` ([`table_arrays`]).
///
/// # Errors
/// Postgres failing.
async fn shape_rows<T>(
    client: &impl GenericClient,
    statement: &T,
    resources: &[ResourceConfig],
) -> Result<Vec<tokio_postgres::Row>, SchemaError>
where
    T: ?Sized + tokio_postgres::ToStatement + Sync + Send,
{
    let (names, schemas, tables) = table_arrays(resources);
    client
        .query(statement, &[&names, &schemas, &tables])
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "reading the tables' shapes",
            source,
        })
}

/// For each row of [`check_sql`] whose live fingerprint differs from the one recorded:
/// records it and announces a flush through `source`'s stream ([`announce_sql`]). Returns
/// the resources announced.
///
/// # Errors
/// Postgres failing; a resource announced before the failure stays announced.
async fn announce_differing(
    client: &impl GenericClient,
    schema: &str,
    source: PostgresSource,
    rows: &[tokio_postgres::Row],
) -> Result<Vec<String>, SchemaError> {
    let mut differing: Vec<(String, String)> = rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let live = row
                .get::<_, Option<String>>(1)
                .unwrap_or_else(|| "missing".into());
            let recorded: Option<String> = row.get(2);
            (recorded.as_ref() != Some(&live)).then_some((name, live))
        })
        .collect();
    differing.sort();
    let mut announced = Vec::new();
    for (name, value) in differing {
        let key = format!("shape:{name}");
        let sql = announce_sql(schema, source);
        let epoch_key = format!("shape_epoch:{name}");
        let rows = client
            .execute(sql.as_str(), &[&key, &value, &name, &epoch_key])
            .await
            .map_err(|source| SchemaError::Postgres {
                doing: "announcing a table's new shape",
                source,
            })?;
        if rows > 0 {
            announced.push(name);
        }
    }
    Ok(announced)
}

/// Records `$2` as the state `$1` when it differs, and only then announces a flush of the
/// resource `$3` and records a new epoch as the state `$4` (a fresh version; 0 when nothing
/// was recorded yet: the shape syncar was installed on keeps plain ETags). One statement, so
/// two instances racing on one change announce it once (the second waits for the first's
/// row lock and finds the value already there).
fn announce_sql(schema: &str, source: PostgresSource) -> String {
    let s = quote_ident(schema);
    let seq = quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"));
    // `xmax = 0` tells a row inserted from one updated by ON CONFLICT. One version (`v`, a
    // CTE with a volatile function: evaluated once) is both the new epoch and, with the
    // log-based sources, the flush's: a resource's generation reaches its epoch with the
    // flush (with `wal` the relay takes a later one), which `Tiers::read_l2` relies on.
    let recorded = format!(
        "WITH recorded AS (INSERT INTO {s}.{STATE_TABLE} AS st (name, value) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value \
         WHERE st.value IS DISTINCT FROM EXCLUDED.value RETURNING (st.xmax = 0) AS first), \
         v AS (SELECT first, pg_catalog.nextval({seq}::pg_catalog.regclass) AS version FROM recorded), \
         epoch AS (INSERT INTO {s}.{STATE_TABLE} AS st (name, value) \
         SELECT $4, CASE WHEN first THEN '0' ELSE version::text END FROM v \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value RETURNING 1)"
    );
    match source {
        PostgresSource::Wal | PostgresSource::Auto => format!(
            "{recorded} SELECT pg_catalog.pg_logical_emit_message(true, {prefix}, \
             pg_catalog.json_build_object('resource', $3::text, 'flush', true)::text) FROM v",
            prefix = quote_literal(MESSAGE_PREFIX)
        ),
        PostgresSource::ChangesLog => format!(
            "{recorded} INSERT INTO {s}.{CHANGES_TABLE} (version, resource, key, op) \
             SELECT version, $3::text, NULL, 'flush' FROM v"
        ),
        PostgresSource::Notify => format!(
            "{recorded}, logged AS (INSERT INTO {s}.{CHANGES_TABLE} (version, resource, key, op) \
             SELECT version, $3::text, NULL, 'flush' FROM v RETURNING version) \
             SELECT pg_catalog.pg_notify({channel}, pg_catalog.json_build_object('resource', $3::text, 'key', NULL, \
             'version', version, 'op', 'flush', 'ts_us', \
             (extract(epoch FROM clock_timestamp()) OPERATOR(pg_catalog.*) 1000000::pg_catalog.numeric)::bigint)::text) FROM logged",
            channel = quote_literal(NOTIFY_CHANNEL)
        ),
    }
}

/// One row per `(name, schema, table)` of the arrays `$1`, `$2`, `$3`: `name` and
/// `fingerprint` (NULL: no such table). Only what can change a document or whether syncar can
/// serve the table counts: a customer's own index or trigger does not. The file node counts
/// because a rewrite that keeps every column's type (`ALTER COLUMN ... TYPE text USING
/// upper(name)`) changes every row and no version; `VACUUM FULL`, `CLUSTER` and TRUNCATE
/// change it too, and cost one more flush. The primary key and the replica identity's
/// index count whatever their columns (a table losing a many-column identity must leave the
/// `wal` publication, see `schema::republish`). Being a partition counts (`ATTACH
/// PARTITION`, as when an existing table is partitioned: statements naming the new parent
/// fire no statement trigger of the partition's, so the resource must go unavailable);
/// nothing is added to an ordinary table's string, whose fingerprint stays as it was. Being
/// unlogged counts the same way (`SET UNLOGGED` rewrites the table today, so its file node
/// changes too; counted on its own, a change of persistence made in place is seen as well).
/// Inheritance children count, by their number (nothing for none: the table is then not
/// served, see `table::describe_table`), and row-level security turned on, forced or not
/// (nothing while it is off: whether it filters this role is `describe_table`'s).
/// The publications the table is in count (the `wal` source serves a table only while its
/// publication has it, see `schema::republish`; NULL, and so nothing in the string, for a
/// table in none), each marked `:narrowed` while it does not publish all of insert, update,
/// delete and truncate (nothing added otherwise: a fingerprint taken before the mark
/// existed stays the same). A unique index counts once valid (`CREATE UNIQUE INDEX CONCURRENTLY`
/// shows it invalid while it is built, then makes it valid and changes nothing else; a
/// failed build leaves it invalid, which the key check refuses). Not seen: a change to a type a column uses (an enum's labels renamed, a
/// composite type's attributes).
const FINGERPRINT_SQL: &str = "\
SELECT r.name, (
  SELECT pg_catalog.md5(pg_catalog.concat_ws('/', c.oid::text, c.relfilenode::text, c.relkind::text, c.relreplident::text,
    CASE WHEN c.relispartition THEN 'partition' END, CASE WHEN c.relpersistence <> 'p' THEN 'unlogged' END,
    (SELECT 'children:' || pg_catalog.count(*) FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid HAVING pg_catalog.count(*) > 0),
    CASE WHEN c.relrowsecurity THEN 'rls:' || c.relforcerowsecurity::text END,
    (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(':', a.attnum, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
                                 a.attgenerated::text, a.attidentity::text), ',' ORDER BY a.attnum)
     FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
    (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(':', i.indexrelid, i.indisprimary, i.indisreplident, i.indkey::text),
                       ',' ORDER BY i.indexrelid)
     FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
       AND i.indpred IS NULL AND i.indexprs IS NULL),
    (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(':', t.tgname, t.tgfoid, t.tgenabled::text), ',' ORDER BY t.tgname)
     FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname LIKE 'syncar%'),
    (SELECT 'published:' || pg_catalog.string_agg(pr.prpubid::text ||
              CASE WHEN p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate THEN '' ELSE ':narrowed' END,
              ',' ORDER BY pr.prpubid)
     FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
     WHERE pr.prrelid = c.oid),
    (SELECT 'identity:' || pg_catalog.string_agg(pg_catalog.concat_ws(':', i.indexrelid, i.indisprimary, i.indisreplident,
                                                i.indimmediate), ',' ORDER BY i.indexrelid)
     FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident))))
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = r.schema AND c.relname = r.tbl AND c.relkind IN ('r', 'p')) AS fingerprint
FROM unnest($1::text[], $2::text[], $3::text[]) AS r(name, schema, tbl)";
