//! The `syncar` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncar::app::run_migration;
use syncar::config::{Config, LogFormat};
use syncar::telemetry::{self, error_chain};
use syncar::App;

/// Cache-coherence sidecar: moka (L1), Redis (L2) and Postgres, kept coherent by versions.
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
    /// Install or repair the version sequence, version columns, triggers and kv table.
    Migrate,
    /// Validate the configuration and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("syncar: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if cli.log_json {
        config.log.format = LogFormat::Json;
    }
    telemetry::init_logging(&config.log);
    if let Command::CheckConfig = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("syncar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => match App::start(config).await {
                Ok(app) => {
                    app.run_until_signal().await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "cannot start");
                    ExitCode::FAILURE
                }
            },
            Command::Migrate => match run_migration(&config).await {
                Ok(changes) if changes.is_empty() => {
                    println!("schema is up to date");
                    ExitCode::SUCCESS
                }
                Ok(changes) => {
                    for change in changes {
                        println!("{change}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let secrets =
                        syncar::redact::Secrets::new(&config.postgres.url, &config.redis.url);
                    eprintln!(
                        "syncar: migration failed: {}",
                        secrets.scrub(&error_chain(&e))
                    );
                    ExitCode::FAILURE
                }
            },
            Command::CheckConfig => ExitCode::SUCCESS,
        }
    })
}
