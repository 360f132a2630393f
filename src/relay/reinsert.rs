//! A delete racing a re-insert of its key: the deletes one term relayed, and the fresh
//! version a re-inserted row is given when it commits after its delete with a lower
//! version. Knows nothing of the stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::coherence::{Message, Op};
use crate::resource::{Catalog, Resource};

use super::error::RelayError;
use super::sql::Sql;

/// Keys deleted by transactions relayed in this term, by resource and key: the delete's
/// version and when it was relayed. Kept for [`DELETE_MEMORY`], at most
/// [`DELETE_MEMORY_KEYS`] of them.
#[derive(Default)]
pub(super) struct RecentDeletes(HashMap<(String, String), (i64, Instant)>);

/// How long a relayed delete is remembered: past any tombstone's TTL, a re-insert that
/// commits later with a lower version no longer meets a cached absence.
const DELETE_MEMORY: Duration = Duration::from_secs(120);
/// Deletes remembered at most (about 100 bytes each).
const DELETE_MEMORY_KEYS: usize = 100_000;

impl RecentDeletes {
    /// A delete racing a re-insert of its key: an INSERT takes its version in its BEFORE
    /// trigger, then waits on the uncommitted DELETE of the same key, whose statement trigger
    /// takes a later version; the insert commits after the delete with a lower version, and
    /// the delete's absence would outrank the live row in every tier. The WAL gives commits
    /// in order, so a put committed after a delete of its key with a lower version is that
    /// race: the row is given a fresh version (an UPDATE that changes nothing else, as
    /// [`Resource::restamp_sql`] does for a write below a cached copy), which reaches the
    /// tiers now and through the WAL again. If that fails (a lock held longer than the
    /// relay's `lock_timeout`), a tombstone above the delete sends reads to Postgres until
    /// it expires: correct, uncached.
    ///
    /// Then remembers the deletes among `changes`.
    ///
    /// # Errors
    /// Taking a fresh version failed.
    pub(super) async fn reinserted_after_delete(
        &mut self,
        changes: &mut [Message],
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
    ) -> Result<(), RelayError> {
        if !self.0.is_empty() {
            for m in changes.iter_mut().filter(|m| m.op == Op::Put) {
                self.restamp_if_raced(m, catalog, client, sql).await?;
            }
        }
        self.remember(changes);
        Ok(())
    }

    /// Gives the put `m` a fresh version if it committed after a relayed delete of its key
    /// with a lower version.
    async fn restamp_if_raced(
        &mut self,
        m: &mut Message,
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
    ) -> Result<(), RelayError> {
        let Some(key) = &m.key else {
            return Ok(());
        };
        let remembered = (m.resource.clone(), key.clone());
        let Some(&(deleted_at, at)) = self.0.get(&remembered) else {
            return Ok(());
        };
        if deleted_at <= m.version || at.elapsed() > DELETE_MEMORY {
            return Ok(());
        }
        // One fresh version per delete, whatever comes of it: the restamp's own
        // change comes back through the WAL and must not be restamped again (a
        // delete version above the sequence, forged or from before a reset, would
        // otherwise loop).
        self.0.remove(&remembered);
        let restamped = match catalog.get(&m.resource) {
            Some(resource) => restamp(client, resource, key).await,
            None => None,
        };
        tracing::info!(
            resource = %m.resource,
            version = m.version,
            deleted_at,
            restamped = ?restamped,
            "a row re-inserted after a concurrent delete of its key had a lower version; \
             gave it a fresh one"
        );
        m.version = match restamped {
            Some(version) => version,
            None => sql.next_version(client).await?,
        };
        Ok(())
    }

    /// Remembers the deletes among `changes`, forgetting the oldest past the bounds.
    fn remember(&mut self, changes: &[Message]) {
        let now = Instant::now();
        for m in changes.iter().filter(|m| m.op == Op::Delete) {
            if let Some(key) = &m.key {
                self.0
                    .insert((m.resource.clone(), key.clone()), (m.version, now));
            }
        }
        if self.0.len() > DELETE_MEMORY_KEYS {
            self.0.retain(|_, (_, at)| at.elapsed() < DELETE_MEMORY);
            if self.0.len() > DELETE_MEMORY_KEYS {
                // A delete storm: forgetting early only brings back the race's 404s.
                self.0.clear();
            }
        }
    }
}

/// Gives the row `key` of `resource` a fresh version; the new version, or `None` when the
/// row is gone or the statement failed.
async fn restamp(client: &tokio_postgres::Client, resource: &Resource, key: &str) -> Option<i64> {
    let param = resource.parse_key(key).ok()?;
    let sql = resource.restamp_sql();
    match client
        .query_opt(&sql, &[crate::db::key_param(&param)])
        .await
    {
        Ok(row) => row.map(|r| r.get(0)),
        Err(e) => {
            tracing::warn!(resource = %resource.name, error = %e, "giving a re-inserted row a fresh version failed");
            None
        }
    }
}
