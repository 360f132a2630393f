//! Which version stamp a migration installs ([`crate::config::Stamp`]): the PL/pgSQL one, or
//! the C function of the `syncar_stamp` extension (`ext/syncar_stamp`), created here where
//! Postgres has it and this role may. Decided once per migration, for every table.

use tokio_postgres::GenericClient;

use super::error::SchemaError;
use super::names::{STAMP_EXTENSION, STAMP_TRIGGER};
use super::script::Sink;
use crate::config::Stamp;
use crate::resource::quote_ident;

/// The stamp the migration puts on every table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum StampFunction {
    /// Each table's own PL/pgSQL function, `{schema}.syncar_stamp_{resource}()`.
    Plpgsql,
    /// `{schema}.syncar_stamp(column, attnum, sequence schema, sequence)` of the extension,
    /// which lives in `schema`.
    Extension { schema: String },
}

/// What Postgres says of the extension.
struct Found {
    /// The schema it is installed in.
    installed: Option<String>,
    /// Whether its files are on the server (`pg_available_extensions`).
    available: bool,
    /// Whether this role may create it: a superuser, or CREATE on the database (the extension
    /// is trusted).
    creatable: bool,
}

/// The stamp `wanted` resolves to on this database: the extension where it is installed (or,
/// with `auto` or `extension`, created in syncar's `schema`, through `sink`, where it is
/// available and this role may create it), else PL/pgSQL. Appends a line to `changes` when it
/// creates the extension.
///
/// # Errors
/// `extension` where Postgres lacks it or this role may not create it; Postgres failing.
pub(super) async fn choose_stamp(
    tx: &tokio_postgres::Transaction<'_>,
    sink: &mut Sink,
    schema: &str,
    wanted: Stamp,
    changes: &mut Vec<String>,
) -> Result<StampFunction, SchemaError> {
    if wanted == Stamp::Plpgsql {
        return Ok(StampFunction::Plpgsql);
    }
    let found = find(tx).await?;
    match found.installed {
        Some(schema) if found.available => return Ok(StampFunction::Extension { schema }),
        // Installed, but its files are not on this server (a failover to a host without
        // the package): triggers calling it would fail every write. Back to PL/pgSQL.
        Some(_) if wanted == Stamp::Extension => {
            return Err(SchemaError::Invalid(format!(
                "extension {STAMP_EXTENSION} is installed in this database but its files are \
                 not on this server (a failover to a host without them?): install them (`make \
                 -C ext/syncar_stamp install`, README \"The C stamp\"), or set \
                 postgres.stamp = \"auto\", which goes back to the PL/pgSQL stamp meanwhile"
            )))
        }
        Some(_) => {
            tracing::warn!(
                "extension {STAMP_EXTENSION} is installed but its files are not on this server: \
                 the PL/pgSQL stamp replaces it"
            );
            return Ok(StampFunction::Plpgsql);
        }
        None => {}
    }
    if found.available && found.creatable {
        sink.run(
            tx,
            format!(
                "CREATE EXTENSION IF NOT EXISTS {STAMP_EXTENSION} SCHEMA {}",
                quote_ident(schema)
            ),
            "creating the syncar_stamp extension",
        )
        .await?;
        changes.push(format!(
            "created extension {STAMP_EXTENSION} in schema {schema}"
        ));
        return Ok(StampFunction::Extension {
            schema: schema.to_string(),
        });
    }
    if wanted == Stamp::Extension {
        return Err(SchemaError::Invalid(if found.available {
            format!(
                "postgres.stamp = \"extension\", but this role may not create extension \
                 {STAMP_EXTENSION}: run `CREATE EXTENSION {STAMP_EXTENSION} SCHEMA {}` as a \
                 role with CREATE on the database, or set postgres.stamp = \"auto\"",
                quote_ident(schema)
            )
        } else {
            format!(
                "postgres.stamp = \"extension\", but this Postgres server does not have extension \
                 {STAMP_EXTENSION}: build and install it on the server (`make -C \
                 ext/syncar_stamp install`, which needs the server's headers, Debian's \
                 postgresql-server-dev-N; README \"The C stamp\"), or set postgres.stamp = \"auto\""
            )
        }));
    }
    if found.available {
        tracing::info!(
            "extension {STAMP_EXTENSION} is on the server but this role may not create it \
             (CREATE on the database): the PL/pgSQL stamp is used"
        );
    }
    Ok(StampFunction::Plpgsql)
}

/// A line for `check-config --db`: which stamp `wanted` asks for, which one the tables
/// (by OID) have, and what Postgres has of the extension.
///
/// # Errors
/// Postgres failing.
pub(super) async fn describe(
    client: &impl GenericClient,
    wanted: Stamp,
    tables: &[u32],
) -> Result<String, SchemaError> {
    let found = find(client).await?;
    let (c, plpgsql): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE p.proname = $1), \
                        count(*) FILTER (WHERE p.proname <> $1) \
                 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE t.tgrelid = ANY($2) AND t.tgname = $3",
                &[&STAMP_EXTENSION, &tables, &STAMP_TRIGGER],
            )
            .await
            .map_err(|source| SchemaError::Postgres {
                doing: "looking up the version stamps",
                source,
            })?;
        (row.get(0), row.get(1))
    };
    let extension = match (&found.installed, found.available) {
        (Some(schema), _) => format!("extension {STAMP_EXTENSION} is installed in schema {schema}"),
        (None, true) if wanted != Stamp::Plpgsql && found.creatable => format!(
            "extension {STAMP_EXTENSION} is on the server, not installed: the next migration \
             installs it"
        ),
        (None, true) => format!("extension {STAMP_EXTENSION} is on the server, not installed"),
        (None, false) => {
            format!("extension {STAMP_EXTENSION} is not on this server (README \"The C stamp\")")
        }
    };
    Ok(format!(
        "version stamp (postgres.stamp = {}): the C stamp on {c} table(s), the PL/pgSQL \
         stamp on {plpgsql}; {extension}",
        wanted.as_str()
    ))
}

async fn find(client: &impl GenericClient) -> Result<Found, SchemaError> {
    let row = client
        .query_one(
            "SELECT (SELECT n.nspname::text FROM pg_extension e \
                     JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = $1), \
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1), \
                    current_setting('is_superuser') = 'on' \
                    OR has_database_privilege(current_database(), 'CREATE')",
            &[&STAMP_EXTENSION],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the syncar_stamp extension",
            source,
        })?;
    Ok(Found {
        installed: row.get(0),
        available: row.get(1),
        creatable: row.get(2),
    })
}
