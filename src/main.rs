//! The `syncar` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncar::app::{run_check, run_migration, run_plan, run_uninstall, Role};
use syncar::config::{Config, LogFormat};
use syncar::telemetry::{self, error_chain};
use syncar::App;

/// Cache-coherence sidecar: an in-process cache (L1), Redis (L2) and Postgres, kept coherent by versions.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (default: $SYNCAR_CONFIG, else built-in defaults).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log one JSON object per line instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (migrating first unless postgres.migrate_on_start = false).
    Serve,
    /// Run only the relay of the `wal` source (a Deployment of its own): stream the WAL into
    /// Redis for every instance. Serves only the admin listener, if configured.
    Relay,
    /// Install or repair the version sequence, version columns, triggers and kv table (and,
    /// for the wal source, the publication and the replication slot).
    Migrate {
        /// Print the SQL the migration would run on this database for this configuration,
        /// changing nothing (for Flyway, Liquibase, Alembic or sqitch; apply it with a role
        /// that owns the tables, then serve with postgres.migrate_on_start = false).
        #[arg(long)]
        print_sql: bool,
    },
    /// Remove the triggers, their functions, the publication and the replication slot;
    /// keep the data (version columns, sequence, kv table, changes log). Refused while
    /// syncar is connected to the database.
    Uninstall {
        /// Go on although connections named syncar are open (another deployment's, or a
        /// pooler's idle backends); a relay streaming the slot still refuses it.
        #[arg(long)]
        force: bool,
    },
    /// Print the OpenAPI document of the HTTP API (docs/openapi.json holds a copy).
    Openapi,
    /// Validate the configuration and exit; with --db, also check it against the database
    /// (tables, keys, version columns, what the wal source needs), changing nothing.
    CheckConfig {
        /// Connect to postgres.url and check every resource's table.
        #[arg(long)]
        db: bool,
    },
}

/// Reports a command that failed, passwords scrubbed from the error.
fn failed(config: &Config, what: &str, e: &dyn std::error::Error) -> ExitCode {
    let secrets = syncar::redact::Secrets::new(&config.postgres.url, &config.redis.url);
    eprintln!("syncar: {what}: {}", secrets.scrub(&error_chain(e)));
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        println!("{}", syncar::http::openapi::document());
        return ExitCode::SUCCESS;
    }
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    telemetry::init_logging(&config.log);
    telemetry::install_panic_hook();
    if let Command::CheckConfig { db: false } = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("syncar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config, Role::Sidecar).await,
            Command::Relay => serve(config, Role::Relay).await,
            Command::Uninstall { force } => uninstall(&config, force).await,
            Command::Migrate { print_sql: true } => print_migration(&config).await,
            Command::Migrate { print_sql: false } => migrate(&config).await,
            Command::Openapi => ExitCode::SUCCESS,
            Command::CheckConfig { .. } => check_against_database(&config).await,
        }
    })
}

/// The configuration (`--config`, else `SYNCAR_CONFIG`, else the defaults), with the
/// environment applied and `--log-json` taken into account.
///
/// # Errors
/// Exit code 2 once every problem was reported.
fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    let mut config = Config::load(cli.config.as_deref()).map_err(|e| {
        eprintln!("syncar: {}", error_chain(&e));
        ExitCode::from(2)
    })?;
    if cli.log_json {
        config.log.format = LogFormat::Json;
    }
    Ok(config)
}

/// The multi-threaded runtime, with `server.worker_threads` workers when set.
fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    builder.enable_all().build()
}

/// `syncar serve` and `syncar relay`: runs until a signal.
async fn serve(config: Config, role: Role) -> ExitCode {
    match App::start_as(config, role).await {
        Ok(app) => {
            app.run_until_signal().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "cannot start");
            ExitCode::FAILURE
        }
    }
}

/// `syncar uninstall`: prints what was removed.
async fn uninstall(config: &Config, force: bool) -> ExitCode {
    match run_uninstall(config, force).await {
        Ok(changes) if changes.is_empty() => {
            println!("nothing to remove");
            ExitCode::SUCCESS
        }
        Ok(changes) => {
            for change in changes {
                println!("{change}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => failed(config, "uninstall failed", &e),
    }
}

/// `syncar migrate --print-sql`: prints the SQL the migration would run, changing nothing.
async fn print_migration(config: &Config) -> ExitCode {
    match run_plan(config).await {
        Ok((planned, script)) => {
            if script.is_empty() {
                println!("-- schema is up to date: nothing to run");
            } else {
                println!(
                    "-- syncar migrate --print-sql: what `syncar migrate` would run on \
                     this database for this configuration."
                );
                for change in &planned.changes {
                    println!("--   {}", syncar::schema::one_line(change));
                }
                println!();
                print!("{}", script.to_sql());
            }
            for reason in &planned.unavailable {
                eprintln!("syncar: left out: {reason}");
            }
            for warning in &planned.warnings {
                eprintln!("syncar: warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => failed(config, "cannot plan the migration", &e),
    }
}

/// `syncar migrate`: prints what changed; fails when a resource was left out.
async fn migrate(config: &Config) -> ExitCode {
    match run_migration(config).await {
        Ok(done) => {
            if done.changes.is_empty() {
                println!("schema is up to date");
            }
            for change in done.changes {
                println!("{change}");
            }
            for reason in &done.unavailable {
                eprintln!("syncar: left out: {reason}");
            }
            for warning in &done.warnings {
                eprintln!("syncar: warning: {warning}");
            }
            if done.unavailable.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => failed(config, "migration failed", &e),
    }
}

/// `syncar check-config --db`: the configuration against the database, changing nothing.
async fn check_against_database(config: &Config) -> ExitCode {
    match run_check(config).await {
        Ok(report) => {
            println!("configuration is valid");
            for note in &report.notes {
                println!("{note}");
            }
            for problem in &report.problems {
                eprintln!("syncar: {problem}");
            }
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => failed(config, "cannot check against the database", &e),
    }
}
