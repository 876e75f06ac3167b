//! `outbox`: the operator's command for a transactional outbox.
//!
//! Exit status: 0 on success, 1 on failure, 2 on bad usage.

mod bench_cmd;
mod dashboard_cmd;
mod failed_cmd;
mod migrate;
mod pause;
mod projection_cmd;
mod relay_cmd;
mod replay_cmd;
mod schema_cmd;
mod status_cmd;
mod topology_cmd;
mod webhooks_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::{duration, logging};

/// Operate a transactional outbox: migrate its schema, relay its events to
/// RabbitMQ, inspect and retry what failed.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: outbox_relay::GlobalArgs,

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
    /// Publish committed events to RabbitMQ until SIGINT or SIGTERM.
    ///
    /// Any number of relays may run against one database; they share the
    /// work through row leases and keep each aggregate's events in order.
    ///
    /// Example: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f outbox relay --batch-size 1000
    Relay(Box<relay_cmd::RelayArgs>),
    /// Stop every relay on this database from claiming (rows in flight finish).
    ///
    /// Example: outbox pause --reason "incident 42"
    Pause(pause::PauseArgs),
    /// Measure the pipeline against this machine's own Postgres and RabbitMQ.
    ///
    /// Runs `outbox-bench` (beside this executable, else on PATH) with the
    /// same arguments; `outbox bench --help` is its help.
    ///
    /// Example: outbox bench drain --events 100000 --aggregates 1000
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Bench(bench_cmd::BenchArgs),
    /// Inspect, retry and delete the jobs queued listeners could not handle.
    ///
    /// Example: outbox failed list --since 2h
    #[command(subcommand)]
    Failed(failed_cmd::FailedCommand),
    /// Show the relay's backlog and, per listener, queue and failed-job counts.
    ///
    /// The database part is always shown; queue depths need --app and one
    /// --listener per listener (read over AMQP, no management plugin).
    ///
    /// Example: outbox status --app chom --listener record_audit_log --listener send_backup_notification
    Status(status_cmd::StatusArgs),
    /// Send stored events again to one listener's queue (within retention).
    ///
    /// Events go through the default exchange straight to `<app>.<listener>`,
    /// encoded as the relay encodes them; the listener's inbox skips what it
    /// already handled. Only published events still retained are replayed.
    ///
    /// Example: outbox replay --event-type site.created --since 2h --app chom --to-listener record_audit_log --dry-run
    Replay(Box<replay_cmd::ReplayArgs>),
    /// Declare, delete or empty an app's listener queues and the exchange.
    ///
    /// Works over AMQP without the app's code; queue names are the
    /// worker's (`<app>.<listener>`, `.retry.<delay>`, `.dead`).
    ///
    /// Example: outbox topology delete --app chom --listener record_audit_log --delete-exchange
    #[command(subcommand)]
    Topology(topology_cmd::TopologyCommand),
    /// Serve the operator's web dashboard (its own process; relays stay lean).
    ///
    /// Overview, listeners, failed jobs with bulk and edit-and-retry, and
    /// an aggregate's timeline. Changes need a token from
    /// OUTBOX_DASHBOARD_TOKEN or --token-file (never a flag); without one
    /// it is read-only and listens on loopback only.
    ///
    /// Example: OUTBOX_DASHBOARD_TOKEN=$(openssl rand -hex 24) outbox dashboard --bind 127.0.0.1:8090
    Dashboard(Box<dashboard_cmd::DashboardArgs>),
    /// Subscribe outside systems to events: endpoints, deliveries, retries, replays.
    ///
    /// Deliveries are made by workers running the webhook listeners
    /// (`chom work` does); these commands manage the endpoints.
    ///
    /// Example: outbox webhooks add --url https://hooks.example.com/chom --event-type 'site.*'
    #[command(subcommand)]
    Webhooks(webhooks_cmd::WebhooksCommand),
    /// Projections: their state and lag, and rebuilding one from the event log.
    ///
    /// A worker running the projection (its code is the service's) does
    /// the rebuild; these commands ask for it and follow it.
    ///
    /// Example: outbox projection rebuild update_tenant_metrics --wait
    #[command(subcommand)]
    Projection(projection_cmd::ProjectionCommand),
    /// Event contracts: check a service's exported payload schemas against a committed set.
    ///
    /// The service exports them (`chom schema export DIR`); a breaking
    /// change fails with exit status 1 and one line per type.
    ///
    /// Example: outbox schema check --against examples/chom/schemas --current target/schemas
    #[command(subcommand)]
    Schema(schema_cmd::SchemaCommand),
    /// Let relays claim again after `outbox pause`.
    ///
    /// Example: outbox resume
    Resume,
}

fn main() -> ExitCode {
    let Cli { global, command } = Cli::parse();
    let database_url = &global.database_url;
    let _telemetry = logging::init(global.log_format, "outbox-relay");
    // FAILPOINTS=relay::before_mark=return ... (feature `failpoints` only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let outcome = match command {
        Command::Migrate(args) => migrate::run(database_url, &args),
        Command::Relay(args) => relay_cmd::run(database_url, &args),
        Command::Pause(args) => pause::pause(database_url, &args),
        Command::Failed(command) => failed_cmd::run(database_url, &command),
        Command::Status(args) => status_cmd::run(database_url, &args),
        Command::Replay(args) => replay_cmd::run(database_url, &args),
        Command::Resume => pause::resume(database_url),
        Command::Dashboard(args) => dashboard_cmd::run(database_url, &args),
        Command::Webhooks(command) => webhooks_cmd::run(database_url, &command),
        Command::Projection(command) => projection_cmd::run(database_url, &command),
        Command::Topology(command) => topology_cmd::run(&command),
        Command::Schema(command) => schema_cmd::run(&command),
        Command::Bench(args) => bench_cmd::run(database_url, global.log_format, &args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
