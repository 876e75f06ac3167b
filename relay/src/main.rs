//! `outbox`: the operator's command for a transactional outbox.
//!
//! Exit status: 0 on success, 1 on failure, 2 on bad usage.

mod logging;
mod migrate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operate a transactional outbox: migrate its schema, relay its events to
/// RabbitMQ, inspect and retry what failed.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, propagate_version = true)]
struct Cli {
    /// Postgres URL of the service database that holds the outbox tables.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = outbox::DEFAULT_DATABASE_URL,
        global = true,
        hide_env_values = true
    )]
    database_url: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text, global = true)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the outbox tables (and the database, if missing).
    ///
    /// Runs the library's embedded migrations; safe to run again and from
    /// several processes at once.
    ///
    /// Example: outbox migrate --database-url postgres://postgres@127.0.0.1:5432/shop
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let outcome = match cli.command {
        Command::Migrate(args) => migrate::run(&cli.database_url, &args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
