//! Resources: what a `/v1/{resource}/...` name maps to in Postgres, and the SQL that reads and
//! writes its documents. Identifiers come only from the configuration and the catalog and are
//! always quoted; keys and bodies are always bind parameters. Runs no query itself, and knows
//! nothing of caches.
//!
//! One room per concept: `definition` (what a resource is, the types its SQL is built from),
//! `sql` (that SQL, an `impl Resource` block), `etag` (its ETags, an `impl Resource` block),
//! `catalog` (the resources served, `CatalogCell`), `doc_ref` (one document, from routing to
//! the tiers), `quote` (identifiers and literals). This file only declares and re-exports.

mod catalog;
mod definition;
mod doc_ref;
mod etag;
mod quote;
mod sql;

pub use catalog::{Capture, Catalog, CatalogCell, NotReady, Shapes, TableShape};
pub use definition::{
    BodyError, Column, KeyError, KeyParam, KeyType, Param, Precondition, Resource, Shape, WriteSql,
};
pub use doc_ref::DocRef;
pub use quote::{quote_ident, quote_literal};
