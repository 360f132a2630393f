//! Document reads: one key (retried once on a connection of its own when the backend died
//! under it), or many keys in one query. Never writes.

use std::collections::HashMap;

use bytes::Bytes;
use tokio_postgres::types::ToSql;

use crate::model::Version;
use crate::resource::{KeyParam, Resource};

use super::connect::connect_dedicated;
use super::error::{classify, connection_lost, DbError};
use super::{key_param, typed_key, versioned_doc, Db};

impl Db {
    /// Reads one document: its version and canonical JSON, or `None` when absent.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn get(
        &self,
        resource: &Resource,
        key: &KeyParam,
    ) -> Result<Option<(Version, Bytes)>, DbError> {
        let client = self.client_for(&resource.name).await?;
        match get_on(&client, resource, key).await {
            // The backend died under the read (terminated, restarted, failed over): a read is
            // idempotent, so it is tried once more, on a connection opened for it (the pool's
            // others may have died with this one and not know it yet). Writes never are.
            // At most a few at once, outside the pool: a failover must not turn every read
            // in flight into a connection of its own.
            Err(e) if connection_lost(&e) && self.retries.available_permits() > 0 => {
                let Ok(_permit) = self.retries.try_acquire() else {
                    return Err(classify(e));
                };
                drop(client);
                metrics::counter!(crate::telemetry::POSTGRES_READ_RETRIES).increment(1);
                tracing::debug!(error = %e, "a read lost its connection; retrying once on a new one");
                let (fresh, connection) = connect_dedicated(&self.config, None, "syncar").await?;
                // Ends once `fresh` is dropped, below.
                tokio::spawn(connection);
                let row = fresh
                    .query_typed_opt(resource.get_sql(), &[typed_key(key)])
                    .await
                    .map_err(classify)?;
                Ok(row.as_ref().map(versioned_doc))
            }
            other => other.map_err(classify),
        }
    }

    /// Reads the documents `keys` of `resource` in one query: each found one's canonical key
    /// text (see [`KeyParam`]'s `Display`) with its version and canonical JSON; absent keys
    /// are not in the map.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn get_many(
        &self,
        resource: &Resource,
        keys: &[&KeyParam],
    ) -> Result<HashMap<String, (Version, Bytes)>, DbError> {
        let client = self.client_for(&resource.name).await?;
        let ints: Vec<i64>;
        let texts: Vec<&str>;
        let param: &(dyn ToSql + Sync) = if keys.iter().all(|k| matches!(k, KeyParam::Int(_))) {
            ints = keys
                .iter()
                .filter_map(|k| match k {
                    KeyParam::Int(i) => Some(*i),
                    KeyParam::Text(_) => None,
                })
                .collect();
            &ints
        } else {
            texts = keys
                .iter()
                .filter_map(|k| match k {
                    KeyParam::Text(s) => Some(s.as_str()),
                    KeyParam::Int(_) => None,
                })
                .collect();
            &texts
        };
        let stmt = client
            .prepare_cached(&resource.get_many_sql())
            .await
            .map_err(classify)?;
        let rows = client.query(&stmt, &[param]).await.map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let doc: String = row.get(2);
                (row.get(0), (Version(row.get(1)), Bytes::from(doc)))
            })
            .collect())
    }
}

/// One read of `resource`'s document `key`, on `client`.
async fn get_on(
    client: &deadpool_postgres::ClientWrapper,
    resource: &Resource,
    key: &KeyParam,
) -> Result<Option<(Version, Bytes)>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(resource.get_sql()).await?;
    let row = client.query_opt(&stmt, &[key_param(key)]).await?;
    Ok(row.as_ref().map(versioned_doc))
}
