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
            last_value: crate::schema::last_value_sql(schema),
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
        self.sequence(client, &self.last_value, "reading the version sequence")
            .await
    }

    /// A version newer than any taken so far.
    ///
    /// # Errors
    /// Postgres failing.
    pub(super) async fn next_version(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<i64, RelayError> {
        self.sequence(client, &self.next_version, "taking a version")
            .await
    }

    /// Runs `sql`, which reads one value of the sequence (no version handed out so far is
    /// above it), and notes it in the bound.
    async fn sequence(
        &self,
        client: &tokio_postgres::Client,
        sql: &str,
        doing: &'static str,
    ) -> Result<i64, RelayError> {
        let value: i64 = client
            .query_typed_one(sql, &[])
            .await
            .map_err(|source| RelayError::Postgres { doing, source })?
            .get(0);
        self.bound.learn(value);
        Ok(value)
    }
}
