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
    /// Whether its files are on the server: its control file (`pg_available_extensions`)
    /// and, once installed, its library, which the probe loads ([`unloadable`]).
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
        // Installed, but its library does not load on this server (a failover to a host
        // without the package): triggers calling it fail every write. Back to PL/pgSQL.
        Some(_) if wanted == Stamp::Extension => {
            return Err(SchemaError::Invalid(format!(
                "extension {STAMP_EXTENSION} is installed in this database but its library does \
                 not load on this server (a failover to a host without it?): install it (`make \
                 -C ext/syncar_stamp install`, README \"The C stamp\"), or set \
                 postgres.stamp = \"auto\", which goes back to the PL/pgSQL stamp meanwhile"
            )))
        }
        Some(_) => {
            tracing::warn!(
                "extension {STAMP_EXTENSION} is installed but its library does not load on this \
                 server: the PL/pgSQL stamp replaces it"
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
        (Some(schema), true) => {
            format!("extension {STAMP_EXTENSION} is installed in schema {schema}")
        }
        (Some(schema), false) => format!(
            "extension {STAMP_EXTENSION} is installed in schema {schema}, but its library does \
             not load on this server (README \"The C stamp\"): the next migration puts the \
             PL/pgSQL stamp on its tables"
        ),
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

/// Why the C stamp cannot run on this server, when a version stamp trigger of one of
/// `tables` (schema, name) calls it: its library does not load (a promoted standby without
/// the package, a library of another version). Every write to those tables fails meanwhile
/// (SQLSTATE 58P01 `undefined_file`), the customer's own included: the caller swaps the
/// PL/pgSQL stamp in. `None` when no such trigger exists or the library loads. Run it in a
/// transaction (the probe is rolled back to a savepoint).
///
/// # Errors
/// Postgres failing.
pub async fn broken_c_stamp(
    client: &impl GenericClient,
    tables: &[(String, String)],
) -> Result<Option<String>, SchemaError> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
    let row = client
        .query_opt(
            "SELECT fn.nspname::text FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace cn ON cn.oid = c.relnamespace \
             JOIN pg_proc p ON p.oid = t.tgfoid \
             JOIN pg_namespace fn ON fn.oid = p.pronamespace \
             JOIN pg_language l ON l.oid = p.prolang \
             WHERE t.tgname = $1 AND p.proname = $2 AND l.lanname = 'c' \
               AND (cn.nspname::text, c.relname::text) IN \
                   (SELECT * FROM unnest($3::text[], $4::text[])) \
             LIMIT 1",
            &[&STAMP_TRIGGER, &STAMP_EXTENSION, &schemas, &names],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the C version stamp's triggers",
            source,
        })?;
    match row {
        Some(row) => unloadable(client, &row.get::<_, String>(0)).await,
        None => Ok(None),
    }
}

/// Why the extension's function in `schema` cannot be loaded, or `None` when it can: it is
/// called outside a trigger, which makes Postgres load its library first; a library that
/// loads then refuses the call ("must be fired BEFORE INSERT OR UPDATE"), one that does not
/// fails with 58P01 (`undefined_file`: not on this server) or 42883 (`undefined_function`:
/// a library without the function). In a transaction: the probe runs under a savepoint.
async fn unloadable(
    client: &impl GenericClient,
    schema: &str,
) -> Result<Option<String>, SchemaError> {
    use tokio_postgres::error::SqlState;
    let pg = |doing| move |source| SchemaError::Postgres { doing, source };
    client
        .batch_execute("SAVEPOINT syncar_stamp_probe")
        .await
        .map_err(pg("probing the C version stamp"))?;
    let call = format!("SELECT {}.{STAMP_EXTENSION}()", quote_ident(schema));
    let missing = match client.query(&call, &[]).await {
        Err(e) => match e.as_db_error() {
            Some(db)
                if [SqlState::UNDEFINED_FILE, SqlState::UNDEFINED_FUNCTION].contains(db.code()) =>
            {
                Some(format!("{} [{}]", db.message(), db.code().code()))
            }
            Some(_) => None,
            None => return Err(pg("probing the C version stamp")(e)),
        },
        Ok(_) => None,
    };
    client
        .batch_execute(
            "ROLLBACK TO SAVEPOINT syncar_stamp_probe; RELEASE SAVEPOINT syncar_stamp_probe",
        )
        .await
        .map_err(pg("probing the C version stamp"))?;
    Ok(missing)
}

/// In a transaction ([`unloadable`]).
async fn find(client: &impl GenericClient) -> Result<Found, SchemaError> {
    let row = client
        .query_one(
            "SELECT (SELECT n.nspname::text FROM pg_extension e \
                     JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = $1), \
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1), \
                    pg_catalog.current_setting('is_superuser') = 'on' \
                    OR pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
            &[&STAMP_EXTENSION],
        )
        .await
        .map_err(|source| SchemaError::Postgres {
            doing: "looking up the syncar_stamp extension",
            source,
        })?;
    let installed: Option<String> = row.get(0);
    let mut available: bool = row.get(1);
    if let (Some(schema), true) = (&installed, available) {
        if let Some(why) = unloadable(client, schema).await? {
            tracing::debug!(why = %why, "the syncar_stamp extension's library does not load");
            available = false;
        }
    }
    Ok(Found {
        installed,
        available,
        creatable: row.get(2),
    })
}
