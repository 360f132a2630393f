//! The catalog: the resources this instance serves as the live schema has them (with each
//! table's shape and how changes are captured), and `CatalogCell`, the catalog as the
//! schema task publishes it (loaded yet? replaced when a table changes; rechecks on request).
//! Runs no query: the schema task reads the tables and hands the result here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::definition::Resource;
use crate::config::PostgresSource;
use crate::locks::{MutexExt, RwLockExt};

/// The resources this instance serves, resolved against the live schema.
#[derive(Debug, Default)]
pub struct Catalog {
    resources: HashMap<String, Arc<Resource>>,
    /// How changes are captured, as the schema was migrated for.
    pub capture: Capture,
    /// Configured resources left out, by name, with why (their table does not exist or does
    /// not fit): requests to them answer 503 `resource_unavailable` with the reason.
    unavailable: HashMap<String, String>,
    /// Resources left out only because their table is not in the `wal` source's publication
    /// (taken out while it had no replica identity): the schema task publishes them again.
    unpublished: Vec<String>,
    /// Resources left out only because a trigger of syncar's on their table is enabled but
    /// not `ALWAYS` (`ALTER TABLE ... ENABLE TRIGGER ALL` after a bulk load leaves it so):
    /// the schema task enables them always again.
    disarmed: Vec<String>,
    /// Resources left out because their table, which fits, carries none of syncar's
    /// triggers: created or made to fit after the migration ran (see
    /// [`Catalog::uninstalled`]).
    uninstalled: Vec<String>,
    /// Each configured resource's table fingerprint when this catalog was read (see
    /// `schema::shape`): a live one that differs means the table changed since.
    pub shapes: Shapes,
}

/// A table's shape as syncar knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    /// The live fingerprint, an md5 in hex; `None` when the table does not exist.
    pub fingerprint: Option<String>,
    /// The version at which the shape documents are now rendered in was announced (the state
    /// table's `shape_epoch:{resource}`); 0 for the shape syncar was installed on. It tells
    /// two renderings of one row version apart in ETags.
    pub epoch: i64,
}

/// Each configured resource's [`TableShape`], by resource name.
pub type Shapes = HashMap<String, TableShape>;

/// The Postgres source the schema serves, resolved from `feeds.postgres_source` against the
/// server (`auto` becomes `wal` or `changes_log`), and the names the `wal` source uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// Never [`PostgresSource::Auto`].
    pub source: PostgresSource,
    /// Why this source, for the log and `/readyz`.
    pub reason: String,
    /// The replication slot (`wal` only).
    pub slot: String,
    /// The publication (`wal` only).
    pub publication: String,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            source: PostgresSource::ChangesLog,
            reason: "configured".into(),
            slot: String::new(),
            publication: String::new(),
        }
    }
}

impl Catalog {
    /// A catalog serving `resources`, captured as configured, every table of the shape
    /// syncar was installed on.
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Self {
        Catalog {
            resources: resources
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect(),
            capture: Capture::default(),
            unavailable: HashMap::new(),
            unpublished: Vec::new(),
            disarmed: Vec::new(),
            uninstalled: Vec::new(),
            shapes: HashMap::new(),
        }
    }

    /// The same catalog, read when the tables had `shapes`.
    pub fn with_shapes(mut self, shapes: Shapes) -> Self {
        self.shapes = shapes;
        self
    }

    /// Whether `name` is a configured resource, served or left out.
    pub fn knows(&self, name: &str) -> bool {
        self.resources.contains_key(name) || self.unavailable.contains_key(name)
    }

    /// The same catalog, with `unavailable` (name, reason) left out.
    pub fn with_unavailable(mut self, unavailable: Vec<(String, String)>) -> Self {
        self.unavailable.extend(unavailable);
        self
    }

    /// The same catalog, noting the left-out resources whose tables fit but are not
    /// published (see [`Catalog::unpublished`]).
    pub fn with_unpublished(mut self, unpublished: Vec<String>) -> Self {
        self.unpublished = unpublished;
        self
    }

    /// The same catalog, noting the left-out resources whose only fault is a trigger of
    /// syncar's enabled but not always (see [`Catalog::disarmed`]).
    pub fn with_disarmed(mut self, disarmed: Vec<String>) -> Self {
        self.disarmed = disarmed;
        self
    }

    /// The same catalog, noting the left-out resources whose tables fit but carry none of
    /// syncar's triggers (see [`Catalog::uninstalled`]).
    pub fn with_uninstalled(mut self, uninstalled: Vec<String>) -> Self {
        self.uninstalled = uninstalled;
        self
    }

    /// Resources whose tables fit but carry none of syncar's triggers: the table was
    /// created, or made to fit (a unique index on the key added, `SET LOGGED`), after the
    /// migration ran, or dropped and created again. A migration installs them, as it would
    /// at the next start.
    pub fn uninstalled(&self) -> &[String] {
        &self.uninstalled
    }

    /// Resources whose tables fit in every way but one: a trigger of syncar's on them is
    /// enabled for ordinary sessions only (`tgenabled` `O`) or for replicas only (`R`), so
    /// some writers would change rows unversioned and unannounced. A migration enables it
    /// `ALWAYS` again, as syncar installed it.
    pub fn disarmed(&self) -> &[String] {
        &self.disarmed
    }

    /// Resources whose tables fit in every way but one: they are not in the `wal` source's
    /// publication (syncar took them out while they had no replica identity, see
    /// `schema::republish`). Empty for the other sources.
    pub fn unpublished(&self) -> &[String] {
        &self.unpublished
    }

    /// Why the configured resource `name` is left out, if it is.
    pub fn unavailable(&self, name: &str) -> Option<&str> {
        self.unavailable.get(name).map(String::as_str)
    }

    /// Every resource's name, left-out ones included: what a reset of every generation must
    /// cover (a left-out resource's Redis entries outlive its absence).
    pub fn all_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .resources
            .keys()
            .chain(self.unavailable.keys())
            .cloned()
            .collect();
        names.sort_unstable();
        names
    }

    /// Every configured resource left out, with why, sorted by name.
    pub fn all_unavailable(&self) -> Vec<(&str, &str)> {
        let mut all: Vec<_> = self
            .unavailable
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        all.sort_unstable();
        all
    }

    /// The same catalog, captured as `capture` says.
    pub fn with_capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    /// The served resource `name`, if it is one.
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    /// Every resource.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.values()
    }

    /// The resource stored in `schema.table`, if any.
    pub fn by_table(&self, schema: &str, table: &str) -> Option<&Arc<Resource>> {
        self.resources
            .values()
            .find(|r| r.schema_name == schema && r.table_name == table)
    }
}

/// The catalog once the schema task has migrated and loaded it; until then, why not. A
/// table whose shape changed makes the schema task load it again and [`CatalogCell::replace`]
/// it; requests that began before keep the one they took.
///
/// # Concurrency
/// Read on every request under a read lock held for one `Arc` clone; replaced rarely.
#[derive(Debug)]
pub struct CatalogCell {
    catalog: RwLock<Option<Arc<Catalog>>>,
    /// Why the catalog is not loaded yet, for `/readyz` and 503s.
    not_ready: Mutex<String>,
    /// Wakes the schema task to compare the tables' live shapes with the catalog's.
    recheck: tokio::sync::Notify,
    /// Recheck requests made so far, and the last one a finished check covered.
    requested: AtomicU64,
    rechecked: tokio::sync::watch::Sender<u64>,
    /// Whether the next recheck also checks that the C version stamp loads (see
    /// [`CatalogCell::suspect_stamp`]).
    stamp_suspect: std::sync::atomic::AtomicBool,
}

/// The catalog is not loaded yet: Postgres is unreachable, the schema is not migrated, or a
/// configured table does not fit. Callers answer 503 `starting` with the reason.
#[derive(Clone, Debug, thiserror::Error)]
#[error("not ready: {0}")]
pub struct NotReady(pub String);

impl CatalogCell {
    /// Empty, not ready for `reason`.
    pub fn new(reason: &str) -> Self {
        CatalogCell {
            catalog: RwLock::new(None),
            not_ready: Mutex::new(reason.to_string()),
            recheck: tokio::sync::Notify::new(),
            requested: AtomicU64::new(0),
            rechecked: tokio::sync::watch::channel(0).0,
            stamp_suspect: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Asks the schema task to check, at its next recheck (requested here), that the C
    /// version stamp's library loads: another server answers (a new timeline), or a statement
    /// failed as on a changed table (58P01 among them). Only then, since the check calls the
    /// function outside a trigger, which Postgres logs as an error.
    pub fn suspect_stamp(&self) {
        self.stamp_suspect.store(true, Ordering::SeqCst);
        self.request_recheck();
    }

    /// Whether the stamp was suspected since the last call (the schema task).
    pub fn take_stamp_suspect(&self) -> bool {
        self.stamp_suspect.swap(false, Ordering::SeqCst)
    }

    /// The resources, once loaded.
    ///
    /// # Errors
    /// [`NotReady`] with the last reason they are not.
    pub fn get(&self) -> Result<Arc<Catalog>, NotReady> {
        match &*self.catalog.read_locked() {
            Some(c) => Ok(c.clone()),
            None => Err(NotReady(self.not_ready.locked().clone())),
        }
    }

    /// Whether the catalog is loaded.
    pub fn is_loaded(&self) -> bool {
        self.catalog.read_locked().is_some()
    }

    /// Publishes the first loaded catalog; later calls change nothing (see
    /// [`CatalogCell::replace`]).
    pub fn set(&self, catalog: Catalog) {
        let mut slot = self.catalog.write_locked();
        if slot.is_none() {
            *slot = Some(Arc::new(catalog));
        }
    }

    /// Publishes a catalog read again after a table changed.
    pub fn replace(&self, catalog: Catalog) {
        *self.catalog.write_locked() = Some(Arc::new(catalog));
    }

    /// Records why the catalog could not be loaded yet.
    pub fn not_ready(&self, reason: String) {
        *self.not_ready.locked() = reason;
    }

    /// Asks the schema task to compare the tables' shapes with the catalog's (a flush was
    /// heard, or a statement found a column missing). Requests made while one check runs are
    /// folded into the next. Returns the request's number.
    pub fn request_recheck(&self) -> u64 {
        let n = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.recheck.notify_one();
        n
    }

    /// Waits for a recheck request (the schema task).
    pub async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// The number of the last recheck request made so far: what a check that reads the
    /// tables from now on covers.
    pub fn requests_made(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// Records that the check covering requests up to `covered` ran (the schema task),
    /// waking [`CatalogCell::recheck_and_wait`].
    pub fn rechecked(&self, covered: u64) {
        self.rechecked.send_modify(|n| *n = (*n).max(covered));
    }

    /// Requests a recheck and waits, at most `limit`, until a check that read the tables
    /// after this call has run. Returns whether one did.
    pub async fn recheck_and_wait(&self, limit: std::time::Duration) -> bool {
        let mut done = self.rechecked.subscribe();
        self.stamp_suspect.store(true, Ordering::SeqCst);
        let wanted = self.request_recheck();
        tokio::time::timeout(limit, done.wait_for(|n| *n >= wanted))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
