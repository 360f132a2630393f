//! One transaction of the stream: its row changes taken as they arrive, and at its commit
//! the messages they make, checked against what the triggers announced. Knows nothing of
//! Redis or of publishing.

use std::collections::{HashMap, HashSet};

use crate::coherence::{Message, Op};
use crate::model::Version;
use crate::resource::Catalog;
use crate::schema::FLUSH_ABOVE_KEYS;

use super::error::RelayError;
use super::pgoutput::{Change, Column};
use super::relations::{Keyed, Relations};
use super::sql::Sql;

/// What one transaction said, kept until its commit.
#[derive(Default)]
pub(super) struct Transaction {
    /// When it committed, in microseconds since the Unix epoch.
    commit_time_us: Option<i64>,
    /// What inserts and updates changed, turned into messages as they arrive: only keys and
    /// versions are kept, never a row, so a transaction of 100 000 rows costs megabytes.
    changes: Vec<Message>,
    /// Rows deleted (the key when the WAL names it) and resources truncated, resolved at
    /// commit against `announced`.
    deleted: Vec<(String, Option<String>)>,
    /// The keys among `deleted`, by resource and key, to tell a put after them.
    deleted_keys: HashSet<(String, String)>,
    /// Keys deleted and then written again in this transaction, in the WAL's order: their
    /// row exists at the commit, so their delete makes no absence. Its version may be
    /// above the row's: a DELETE and an INSERT of the key in one statement (`WITH d AS
    /// (DELETE ... RETURNING ...) INSERT ... SELECT ... FROM d`) stamp the row in its BEFORE
    /// trigger, while the delete's statement trigger, which takes the delete's version,
    /// runs at the statement's end; the absence would outrank the live row in every tier.
    reinserted: HashSet<(String, String)>,
    truncated: Vec<String>,
    /// Resources whose triggers' announcements cannot be checked against the WAL: their key
    /// is outside the replica identity, so the WAL names neither deleted nor moved keys.
    unverifiable: HashSet<String>,
    /// Resources with a row the WAL does not key (an unchanged TOASTed key): flushed.
    unkeyed: HashSet<String>,
    /// Keys taken so far per resource (inserts, updates, deletes), up to
    /// [`FLUSH_ABOVE_KEYS`].
    keys: HashMap<String, usize>,
    /// Resources that passed [`FLUSH_ABOVE_KEYS`] keys in this transaction: flushed at its
    /// commit, none of their keys kept.
    overflowed: HashSet<String>,
    /// Whether a resource past [`FLUSH_ABOVE_KEYS`] keys is flushed instead (never while the
    /// relay may be a synchronous standby, see [`Transaction::begin`]; nor before a `Begin`).
    flush_for_size: bool,
    /// The syncar messages of the transaction: `{"resource", "deletes": [[key, version]]}`
    /// or `{"resource", "truncate": version}`.
    announced: Vec<serde_json::Value>,
}

/// The messages a committed transaction makes: what [`Transaction::receive`] made of its
/// inserts and updates, an absence per deleted key (at the version its trigger announced), a
/// flush per truncated resource.
///
/// Any database user may emit a logical message, so announcements are taken only where the
/// WAL agrees: a deleted key the WAL shows deleted in this transaction (or any, for a
/// resource whose key the WAL cannot name), a truncation the WAL shows, a version above 0.
/// What the triggers did not announce (they were disabled, or did not exist yet) takes a
/// fresh version: later than anything cached, so no older copy survives it, at the price of
/// a few misses.
///
/// # Errors
/// Taking a fresh version failed.
pub(super) async fn changes_of(
    txn: Transaction,
    catalog: &Catalog,
    client: &tokio_postgres::Client,
    sql: &Sql,
) -> Result<Vec<Message>, RelayError> {
    let mut announced = Announced::read(&txn.announced, catalog);
    announced.vouch(client, sql).await?;
    let mut out = Resolved {
        messages: Vec::new(),
        flushed: HashSet::new(),
        ts: txn.commit_time_us,
        client,
        sql,
    };
    // Flushes first: a resource flushed by this commit needs none of its keys' messages.
    // Only a truncation the WAL shows takes the version its trigger announced; the others
    // take fresh ones (an announced version could be anyone's).
    out.truncated(txn.truncated.into_iter(), &announced).await?;
    let fresh = txn
        .unkeyed
        .into_iter()
        .chain(txn.overflowed)
        .chain(announced.flushes.iter().cloned());
    out.fresh_flushes(fresh.collect()).await?;
    let flushed = std::mem::take(&mut out.flushed);
    out.messages.extend(
        txn.changes
            .into_iter()
            .filter(|m| !flushed.contains(&m.resource)),
    );
    out.flushed = flushed;
    out.unverifiable_deletes(&announced, &txn.unverifiable);
    out.deleted(txn.deleted, &announced, &txn.unverifiable, &txn.reinserted)
        .await?;
    Ok(out.messages)
}

/// A message of the relay's (no instance sent it) at `ts_us`.
pub(super) fn change(
    resource: &str,
    key: Option<String>,
    version: i64,
    op: Op,
    ts_us: Option<i64>,
) -> Message {
    Message {
        resource: resource.to_string(),
        key,
        version,
        op,
        ts_us,
        instance: None,
    }
}

/// What a transaction's syncar messages announce, as far as they are well-formed.
struct Announced {
    /// Deleted keys' versions, by resource and key (versions above 0 only).
    deletes: HashMap<(String, String), i64>,
    /// Truncations' versions, by resource (versions above 0 only).
    truncates: HashMap<String, i64>,
    /// Resources of the catalog to flush (a table changed under its trigger, or a new shape).
    flushes: Vec<String>,
}

/// The messages of one commit being resolved, with the flushes already made.
struct Resolved<'a> {
    messages: Vec<Message>,
    /// Resources flushed already: one flush each is enough.
    flushed: HashSet<String>,
    ts: Option<i64>,
    client: &'a tokio_postgres::Client,
    sql: &'a Sql,
}

impl Transaction {
    /// A transaction that commits at `commit_time_us` (microseconds since the Unix epoch).
    /// `synchronous`: the relay may be a synchronous standby. Then a bulk transaction keeps
    /// its keys: Postgres shows its commit only once every instance has applied it, and a
    /// flush, unlike a tombstone per key, would let a read in between fill the old rows
    /// under the new generation, where nothing would retire them.
    pub(super) fn begin(commit_time_us: i64, synchronous: bool) -> Self {
        Transaction {
            commit_time_us: Some(commit_time_us),
            flush_for_size: !synchronous,
            ..Transaction::default()
        }
    }

    /// Whether a key of `resource` is to be kept: false once the transaction changed more
    /// than [`FLUSH_ABOVE_KEYS`] of its keys (with `flush_for_size`), when the keys kept so
    /// far are dropped and the resource is flushed at the commit instead.
    fn keep_key(&mut self, resource: &str) -> bool {
        if !self.flush_for_size {
            return true;
        }
        if self.overflowed.contains(resource) {
            return false;
        }
        // Counted without allocating past a resource's first key: this runs for every row.
        let n = match self.keys.get_mut(resource) {
            Some(n) => n,
            None => self.keys.entry(resource.to_string()).or_default(),
        };
        *n += 1;
        if *n <= FLUSH_ABOVE_KEYS {
            return true;
        }
        self.keys.remove(resource);
        self.changes.retain(|m| m.resource != resource);
        self.deleted.retain(|(r, _)| r != resource);
        self.deleted_keys.retain(|(r, _)| r != resource);
        self.reinserted.retain(|(r, _)| r != resource);
        self.overflowed.insert(resource.to_string());
        false
    }

    /// Takes one of the transaction's syncar messages (see `announced`).
    pub(super) fn announce(&mut self, message: serde_json::Value) {
        self.announced.push(message);
    }

    /// Takes one row change: inserts and updates become messages at once (a tombstone at the
    /// row's version; a moved key also an absence at that version); deletes and truncations
    /// wait for the commit, where the triggers' announcements give their versions.
    pub(super) fn receive(&mut self, row: Change, relations: &Relations) {
        let ts = self.commit_time_us;
        let relation = match &row {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => Some(*relation),
            _ => None,
        };
        if let Some(m) = relation.and_then(|id| relations.get(id)) {
            if m.at.is_none() {
                // The stream cannot name this table's keys or versions: flush it.
                self.unkeyed.insert(m.resource.clone());
                return;
            }
            if !self.keep_key(&m.resource) {
                return; // flushed at the commit
            }
        }
        match row {
            Change::Insert { relation, new } => {
                if let Some(m) = relations.get(relation) {
                    match m.key_version(&new) {
                        Keyed::Row(key, version) => {
                            self.written_again(&m.resource, &key);
                            self.changes
                                .push(change(&m.resource, Some(key), version, Op::Put, ts))
                        }
                        Keyed::Unknown => {
                            self.unkeyed.insert(m.resource.clone());
                        }
                        Keyed::NullKey => {}
                    }
                }
            }
            Change::Update { relation, old, new } => {
                self.receive_update(relation, old, new, relations)
            }
            Change::Delete { relation, old } => {
                if let Some(m) = relations.get(relation) {
                    if !m.key_in_identity {
                        self.unverifiable.insert(m.resource.clone());
                    }
                    let key =
                        m.at.and_then(|(key, _)| old.get(key))
                            .and_then(Column::text)
                            .map(str::to_string);
                    if let Some(key) = &key {
                        let deleted = (m.resource.clone(), key.clone());
                        self.reinserted.remove(&deleted);
                        self.deleted_keys.insert(deleted);
                    }
                    self.deleted.push((m.resource.clone(), key));
                }
            }
            Change::Truncate { relations: ids } => {
                for id in ids {
                    if let Some(m) = relations.get(id) {
                        self.truncated.push(m.resource.clone());
                    }
                }
            }
            Change::Relation(_) | Change::Other(_) => {}
        }
    }

    /// Takes an UPDATE: a tombstone at the row's version, and an absence at that version
    /// where its key moved.
    fn receive_update(
        &mut self,
        relation: u32,
        old: Option<Vec<Column>>,
        new: Vec<Column>,
        relations: &Relations,
    ) {
        let ts = self.commit_time_us;
        let Some(m) = relations.get(relation) else {
            return;
        };
        if !m.key_in_identity {
            self.unverifiable.insert(m.resource.clone());
        }
        let (key, version) = match m.key_version(&new) {
            Keyed::Row(key, version) => (key, version),
            Keyed::Unknown => {
                self.unkeyed.insert(m.resource.clone());
                return;
            }
            Keyed::NullKey => return,
        };
        // The old identity comes only when it changed: a moved key is deleted, at
        // the version of the row that left it.
        let key_at = m.at.map_or(usize::MAX, |(key, _)| key);
        let moved_from = old
            .as_ref()
            .and_then(|old| old.get(key_at))
            .and_then(Column::text)
            .filter(|old_key| *old_key != key)
            .map(str::to_string);
        if let Some(old_key) = moved_from {
            self.changes
                .push(change(&m.resource, Some(old_key), version, Op::Delete, ts));
        }
        self.written_again(&m.resource, &key);
        self.changes
            .push(change(&m.resource, Some(key), version, Op::Put, ts));
    }

    /// Notes a put of `key`: after a delete of it in this transaction, it is `reinserted`.
    fn written_again(&mut self, resource: &str, key: &str) {
        if self.deleted_keys.is_empty() {
            return;
        }
        let written = (resource.to_string(), key.to_string());
        if self.deleted_keys.contains(&written) {
            self.reinserted.insert(written);
        }
    }
}

impl Announced {
    /// Reads the syncar messages of a transaction, skipping what is malformed.
    fn read(announced: &[serde_json::Value], catalog: &Catalog) -> Self {
        let mut out = Announced {
            deletes: HashMap::new(),
            truncates: HashMap::new(),
            flushes: Vec::new(),
        };
        for a in announced {
            let Some(resource) = a.get("resource").and_then(|r| r.as_str()) else {
                continue;
            };
            if let Some(deletes) = a.get("deletes").and_then(|d| d.as_array()) {
                for d in deletes {
                    if let (Some(key), Some(version)) = (
                        d.get(0).and_then(|k| k.as_str()),
                        d.get(1)
                            .and_then(|v| v.as_i64())
                            .filter(|v| *v > 0 && Version(*v).plausible()),
                    ) {
                        out.deletes
                            .insert((resource.to_string(), key.to_string()), version);
                    }
                }
            }
            if let Some(version) = a
                .get("truncate")
                .and_then(|v| v.as_i64())
                .filter(|v| *v > 0 && Version(*v).plausible())
            {
                out.truncates.insert(resource.to_string(), version);
            }
            // A trigger that found its table changed under it, or a table's new shape: a
            // flush at a version taken here (never one a message names: anyone may emit one,
            // and a generation raised to a forged, huge version would never rise again).
            if a.get("flush").and_then(|f| f.as_bool()) == Some(true) && catalog.knows(resource) {
                out.flushes.push(resource.to_string());
            }
        }
        out
    }
}

impl Announced {
    /// Forgets the announced versions the sequence never reached (see
    /// [`crate::model::SequenceBound`]):
    /// their deletes and truncations take fresh versions, as unannounced ones do. Reads the
    /// sequence only when one is beyond what it was last seen at plus the slack.
    ///
    /// # Errors
    /// Reading the sequence failed.
    async fn vouch(
        &mut self,
        client: &tokio_postgres::Client,
        sql: &Sql,
    ) -> Result<(), RelayError> {
        let Some(highest) = self
            .deletes
            .values()
            .chain(self.truncates.values())
            .copied()
            .max()
        else {
            return Ok(());
        };
        let Some(last) = sql.bound.reach(highest, sql.last_value(client)).await? else {
            return Ok(());
        };
        let vouched = |what: &str, v: &i64| {
            let ok = *v <= last;
            if !ok {
                tracing::warn!(
                    version = *v,
                    sequence = last,
                    announced = what,
                    "ignored an announced version the version sequence never reached (forged?)"
                );
            }
            ok
        };
        self.deletes.retain(|_, v| vouched("delete", v));
        self.truncates.retain(|_, v| vouched("truncate", v));
        Ok(())
    }
}

impl Resolved<'_> {
    fn push(&mut self, resource: &str, key: Option<String>, version: i64, op: Op) {
        self.messages
            .push(change(resource, key, version, op, self.ts));
    }

    /// Deletes and moved keys the WAL cannot name: the triggers' word is all there is.
    fn unverifiable_deletes(&mut self, announced: &Announced, unverifiable: &HashSet<String>) {
        for ((resource, key), version) in &announced.deletes {
            if unverifiable.contains(resource) && !self.flushed.contains(resource) {
                self.push(resource, Some(key.clone()), *version, Op::Delete);
            }
        }
    }

    /// The rows the WAL shows deleted: an absence at the announced version, else a
    /// tombstone at a fresh one; a flush where the WAL does not name the key. Nothing for a
    /// key `reinserted` later in the transaction: its put says what the commit left.
    async fn deleted(
        &mut self,
        deleted: Vec<(String, Option<String>)>,
        announced: &Announced,
        unverifiable: &HashSet<String>,
        reinserted: &HashSet<(String, String)>,
    ) -> Result<(), RelayError> {
        for (resource, key) in deleted {
            if unverifiable.contains(&resource) || self.flushed.contains(&resource) {
                continue; // announced above (or flushed); unannounced ones cannot be told apart
            }
            if let Some(k) = &key {
                if reinserted.contains(&(resource.clone(), k.clone())) {
                    continue;
                }
            }
            let version = key
                .as_ref()
                .and_then(|k| announced.deletes.get(&(resource.clone(), k.clone())));
            match (key, version) {
                (Some(key), Some(version)) => self.push(&resource, Some(key), *version, Op::Delete),
                (Some(key), None) => {
                    let version = self.sql.next_version(self.client).await?;
                    self.push(&resource, Some(key), version, Op::Put);
                }
                (None, _) => {
                    if self.flushed.insert(resource.clone()) {
                        let version = self.sql.next_version(self.client).await?;
                        self.push(&resource, None, version, Op::Flush);
                    }
                }
            }
        }
        Ok(())
    }

    /// The resources truncated (at the announced version, else a fresh one) or unkeyed (at
    /// a fresh one): a flush each.
    async fn truncated(
        &mut self,
        resources: impl Iterator<Item = String>,
        announced: &Announced,
    ) -> Result<(), RelayError> {
        for resource in resources {
            if !self.flushed.insert(resource.clone()) {
                continue;
            }
            let version = match announced.truncates.get(&resource) {
                Some(version) => *version,
                None => self.sql.next_version(self.client).await?,
            };
            self.push(&resource, None, version, Op::Flush);
        }
        Ok(())
    }

    /// Flushes at fresh versions: the ones the triggers asked for, the resources the WAL
    /// does not key, those past [`FLUSH_ABOVE_KEYS`].
    async fn fresh_flushes(&mut self, resources: Vec<String>) -> Result<(), RelayError> {
        for resource in resources {
            if self.flushed.insert(resource.clone()) {
                let version = self.sql.next_version(self.client).await?;
                self.push(&resource, None, version, Op::Flush);
            }
        }
        Ok(())
    }
}
