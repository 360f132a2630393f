//! What the benchmarks that talk to Postgres directly share: a connection, a database made
//! anew, and their one numeric option.

use tokio_postgres::NoTls;

/// A connection to `db` on the benchmark's Postgres at `port`, its driver spawned.
pub async fn connect(port: u16, db: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("postgres://postgres@127.0.0.1:{port}/{db}"), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the benchmark's Postgres: {e}"));
    tokio::spawn(connection);
    client
}

/// Drops `db` if it exists and creates it empty (each in a statement of its own: neither
/// runs in a transaction block).
pub async fn recreate_database(port: u16, db: &str) {
    let admin = connect(port, "postgres").await;
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
}

/// The value of the command line's `--{name} N`, or `default`; panics on any other option
/// (cargo's own `--bench` aside).
pub fn number_option<T: std::str::FromStr>(name: &str, default: T) -> T {
    let mut value = default;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--") {
            Some("bench") => {}
            Some(option) if option == name => {
                value = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("--{name} takes a number"))
            }
            _ => panic!("unknown option {arg:?} (options: --{name} N)"),
        }
    }
    value
}

/// A `[[resource]]` on `public.{table}` keyed by `id`, with the default TTLs.
pub fn resource(table: &str) -> syncar::config::ResourceConfig {
    syncar::config::ResourceConfig {
        name: table.into(),
        table: table.into(),
        schema: "public".into(),
        key: "id".into(),
        version_column: "version".into(),
        l1_ttl: None,
        l2_ttl: None,
        negative_ttl: None,
        tombstone_ttl: None,
    }
}
