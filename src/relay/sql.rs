//! The relay's own statements on the plain Postgres connection that take versions. Knows
//! nothing of the replication stream.

use crate::model::SequenceBound;
use crate::schema::VERSION_SEQUENCE;

use super::error::RelayError;

/// The relay's own SQL, written once per term for the schema.
pub(super) struct Sql {
    next_version: String,
    last_value: String,
    /// What the sequence was last seen at: vouches for the versions messages announce.
    pub(super) bound: SequenceBound,
}

impl Sql {
    /// The statements for syncar's `schema`.
    pub(super) fn new(schema: &str) -> Self {
        Sql {
            next_version: format!(
                "SELECT pg_catalog.nextval({}::pg_catalog.regclass)",
                crate::resource::quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"))
            ),
            last_value: format!(
                "SELECT last_value FROM {}.{}",
                crate::resource::quote_ident(schema),
                crate::resource::quote_ident(VERSION_SEQUENCE)
            ),
            bound: SequenceBound::default(),
        }
    }

    /// The sequence's `last_value`: no version handed out so far is above it.
    ///
    /// # Errors
    /// Postgres failing.
    pub(super) async fn last_value(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<i64, RelayError> {
        let last: i64 = client
            .query_typed_one(&self.last_value, &[])
            .await
            .map_err(|source| RelayError::Postgres {
                doing: "reading the version sequence",
                source,
            })?
            .get(0);
        self.bound.learn(last);
        Ok(last)
    }

    /// A version newer than any taken so far.
    ///
    /// # Errors
    /// Postgres failing.
    pub(super) async fn next_version(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<i64, RelayError> {
        let version: i64 = client
            .query_typed_one(&self.next_version, &[])
            .await
            .map_err(|source| RelayError::Postgres {
                doing: "taking a version",
                source,
            })?
            .get(0);
        self.bound.learn(version);
        Ok(version)
    }
}
