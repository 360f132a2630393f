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

impl SchemaError {
    /// Whether Postgres gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, SchemaError::Postgres { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
    }

    /// What the failing step was doing, for the log.
    pub fn step(&self) -> &'static str {
        match self {
            SchemaError::Postgres { doing, .. } => doing,
            SchemaError::Invalid(_) => "checking the schema",
            SchemaError::NotMigrated(_) => "loading the catalog",
        }
    }
}
