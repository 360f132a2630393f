//! The relay's own statements on the plain Postgres connection that take versions. Knows
//! nothing of the replication stream.

use crate::schema::VERSION_SEQUENCE;

use super::error::RelayError;

/// The relay's own SQL, written once per term for the schema.
pub(super) struct Sql {
    next_version: String,
}

impl Sql {
    /// The statements for syncar's `schema`.
    pub(super) fn new(schema: &str) -> Self {
        Sql {
            next_version: format!(
                "SELECT pg_catalog.nextval({}::pg_catalog.regclass)",
                crate::resource::quote_literal(&format!("{schema}.{VERSION_SEQUENCE}"))
            ),
        }
    }

    /// A version newer than any taken so far.
    ///
    /// # Errors
    /// Postgres failing.
    pub(super) async fn next_version(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<i64, RelayError> {
        Ok(client
            .query_one(&self.next_version, &[])
            .await
            .map_err(|source| RelayError::Postgres {
                doing: "taking a version",
                source,
            })?
            .get(0))
    }
}
