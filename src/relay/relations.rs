//! The stream's relations as resources: which table of the stream is which resource, and
//! where its key and version are in a tuple, kept across catalog replacements. Knows nothing
//! of transactions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::Config;
use crate::resource::Catalog;

use super::pgoutput::{Column, Relation};

/// A relation of the stream that is a resource: where its key and version are in a tuple.
pub(super) struct Mapped {
    /// The resource's name.
    pub(super) resource: String,
    /// Where the key and the version are in a tuple; `None` when the stream's columns lack
    /// either (the table was changed under its resource: a key or version column renamed
    /// or dropped) or the resource is left out of the catalog (its table does not fit).
    /// Every change of such a table is then a flush of its resource, so the relay goes on
    /// streaming, and acknowledging, for every table.
    pub(super) at: Option<(usize, usize)>,
    /// Whether the key is part of the replica identity: then a DELETE in the WAL names it.
    pub(super) key_in_identity: bool,
}

/// What a tuple says of its row's key and version.
pub(super) enum Keyed {
    /// The key (canonical text) and version.
    Row(String, i64),
    /// A NULL key names no document.
    NullKey,
    /// The WAL does not carry the key or version (an unchanged TOASTed value).
    Unknown,
}

/// Every relation of one term's stream, mapped to resources by the catalog of the moment.
#[derive(Default)]
pub(super) struct Relations {
    /// The resources' relations, by relation id.
    mapped: HashMap<u32, Mapped>,
    /// Every `Relation` message of this term, as sent: mapped again whenever the catalog is
    /// replaced (pgoutput sends a table's `Relation` once after each change of its shape,
    /// often before this relay's catalog follows the change).
    sent: HashMap<u32, Relation>,
    /// The catalog `mapped` was made with (held, so that its address is never another
    /// catalog's).
    mapped_with: Option<Arc<Catalog>>,
    /// Published tables this relay's configuration has no resource for, warned about once.
    unknown: HashSet<String>,
    /// A `Relation` message arrived since the last shape check.
    pub(super) seen: bool,
}

impl Relations {
    /// The resource relation `id` is, if any.
    pub(super) fn get(&self, id: u32) -> Option<&Mapped> {
        self.mapped.get(&id)
    }

    /// Takes a `Relation` message: maps it by `catalog`, and keeps it for later catalogs.
    pub(super) fn learn(&mut self, r: Relation, catalog: &Catalog, config: &Config) {
        self.seen = true;
        match self.map(&r, catalog, config) {
            Some(mapped) => self.mapped.insert(r.id, mapped),
            None => self.mapped.remove(&r.id),
        };
        self.sent.insert(r.id, r);
    }

    /// Maps every relation sent in this term again, if `catalog` is not the one they were
    /// mapped with: a resource that fits again is keyed again at once.
    pub(super) fn remap(&mut self, catalog: &Arc<Catalog>, config: &Config) {
        if self
            .mapped_with
            .as_ref()
            .is_some_and(|mapped| Arc::ptr_eq(mapped, catalog))
        {
            return;
        }
        self.mapped_with = Some(catalog.clone());
        let sent = std::mem::take(&mut self.sent);
        for r in sent.values() {
            match self.map(r, catalog, config) {
                Some(mapped) => self.mapped.insert(r.id, mapped),
                None => self.mapped.remove(&r.id),
            };
        }
        self.sent = sent;
    }

    /// What `r` is for `catalog`: a resource keyed by its columns, a resource flushed at
    /// each change (its columns lack the key or version, or it is left out), or nothing
    /// (no resource of this relay's configuration).
    fn map(&mut self, r: &Relation, catalog: &Catalog, config: &Config) -> Option<Mapped> {
        let table = format!("{}.{}", r.schema, r.name);
        let Some(resource) = catalog.by_table(&r.schema, &r.name) else {
            return self.map_left_out(r, &table, catalog, config);
        };
        let position = |name: &str| r.columns.iter().position(|(c, _)| c == name);
        let at = match (
            position(resource.key_column()),
            position(resource.version_column()),
        ) {
            (Some(key), Some(version)) => Some((key, version)),
            _ => {
                tracing::warn!(
                    table = %table,
                    resource = %resource.name,
                    key = %resource.key_column(),
                    version = %resource.version_column(),
                    "the stream's columns of a resource's table lack its key or version column \
                     (renamed or dropped?): each change of it flushes the resource until it \
                     fits again"
                );
                None
            }
        };
        Some(Mapped {
            resource: resource.name.clone(),
            at,
            key_in_identity: at.is_some_and(|(key, _)| r.columns[key].1),
        })
    }

    /// What `r`, a table the catalog serves no resource for, is: a configured resource left
    /// out (flushed at each change), or nothing (warned about once).
    fn map_left_out(
        &mut self,
        r: &Relation,
        table: &str,
        catalog: &Catalog,
        config: &Config,
    ) -> Option<Mapped> {
        let configured = config
            .resources
            .iter()
            .find(|c| c.schema == r.schema && c.table == r.name)
            .filter(|c| catalog.knows(&c.name));
        if let Some(c) = configured {
            // Left out (its table does not fit now): its copies are retired at each
            // change, and it is keyed again once the catalog serves it.
            return Some(Mapped {
                resource: c.name.clone(),
                at: None,
                key_in_identity: false,
            });
        }
        // Another instance's configuration (or migration) published it: its changes
        // reach no cache through this relay.
        if self.unknown.insert(table.to_string()) {
            tracing::warn!(
                table = %table,
                "a published table is not a resource of this relay's configuration: its \
                 changes are not relayed; give every instance the same resources"
            );
        }
        None
    }
}

impl Mapped {
    /// The key and version `tuple` carries for this resource.
    pub(super) fn key_version(&self, tuple: &[Column]) -> Keyed {
        let Some((key, version)) = self.at else {
            return Keyed::Unknown;
        };
        let (Some(key), Some(version)) = (tuple.get(key), tuple.get(version)) else {
            return Keyed::Unknown;
        };
        if *key == Column::Null {
            return Keyed::NullKey;
        }
        match (
            key.text(),
            version.text().and_then(|v| v.parse::<i64>().ok()),
        ) {
            (Some(key), Some(version)) => Keyed::Row(key.to_string(), version),
            _ => Keyed::Unknown,
        }
    }
}
