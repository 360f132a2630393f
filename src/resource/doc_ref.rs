//! `DocRef`: one document of one resource as a request names it, resolved once by routing
//! and used by every tier. Does not check that the document exists.

use std::sync::Arc;

use super::definition::{KeyError, KeyParam, Resource};
use crate::model::CacheKey;

/// One document of one resource, as a request names it: what routing resolves once and every
/// tier uses (the SQL binds `key`, the caches use `ck`).
#[derive(Clone, Debug)]
pub struct DocRef {
    /// The resource the document belongs to.
    pub resource: Arc<Resource>,
    /// The key as the bind parameter of the key column's type.
    pub key: KeyParam,
    /// `resource:key`, from the parsed key: `07` and `7` name one row, so one cache entry.
    pub ck: CacheKey,
}

impl DocRef {
    /// The document `key` (already percent-decoded) of `resource`.
    ///
    /// # Errors
    /// [`KeyError`] (for the client) when the key does not fit the key column (an integer
    /// key that is not an integer).
    pub fn new(resource: &Arc<Resource>, key: &str) -> Result<DocRef, KeyError> {
        let param = resource.parse_key(key)?;
        let ck = match &param {
            KeyParam::Text(text) => CacheKey::new(&resource.name, text),
            KeyParam::Int(_) => CacheKey::new(&resource.name, &param.to_string()),
        };
        Ok(DocRef {
            resource: resource.clone(),
            key: param,
            ck,
        })
    }
}
