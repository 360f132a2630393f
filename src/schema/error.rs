//! Why the schema cannot serve the configuration.

/// A schema that cannot serve the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("postgres error while {doing}")]
    Postgres {
        doing: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the schema is not migrated ({0}); run `syncar migrate` or set postgres.migrate_on_start"
    )]
    NotMigrated(String),
}
