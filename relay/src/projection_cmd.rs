//! `outbox projection status | rebuild`: where each projection stands,
//! and asking for a rebuild.
//!
//! A projection's code lives in its service, so the rebuild itself is run
//! by a worker that runs the projection (it looks for requests every
//! second, see `outbox::projection`); `rebuild` records the request and,
//! with `--wait`, follows it until the projection is live again.
//!
//! `--json`: `status` prints `[{name, state, position, rebuilt_through,
//! rebuilt_events, rebuild_started_at, rebuild_finished_at, log_head,
//! rebuild_lag}]`; `rebuild --wait --json` prints the projection's row once
//! it is live again.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox::projection::{self, ProjectionStatus};
use serde::Serialize;

use crate::duration::parse_duration;

/// Subcommands of `outbox projection`.
#[derive(Debug, clap::Subcommand)]
pub enum ProjectionCommand {
    /// Each projection: state, the log position its rebuild reached, the
    /// log's head, how far behind a rebuild under way is, and the events
    /// not yet in the log (still in outbox_events, applied by a rebuild's
    /// hand-over after the log).
    ///
    /// Example: outbox projection status --json
    Status(StatusArgs),
    /// Empty a projection's read model and replay the event log into it,
    /// then hand over to live delivery (no gap, no event twice), while
    /// writers keep writing. A worker running the projection does the work.
    ///
    /// Example: outbox projection rebuild update_tenant_metrics --wait
    Rebuild(RebuildArgs),
}

/// Options of `outbox projection status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox projection rebuild`.
#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// The projection (its name in `outbox projection status`).
    name: String,
    /// Wait until the projection is live again, printing progress.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this long (the rebuild goes on).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StatusRow<'a> {
    #[serde(flatten)]
    status: &'a ProjectionStatus,
    rebuild_lag: i64,
}

/// Runs `outbox projection ...`.
pub fn run(database_url: &str, command: &ProjectionCommand) -> anyhow::Result<()> {
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    match command {
        ProjectionCommand::Status(args) => {
            let statuses = projection::statuses(&mut conn).context("cannot read the projections")?;
            if args.json {
                let rows: Vec<StatusRow<'_>> = statuses
                    .iter()
                    .map(|status| StatusRow {
                        status,
                        rebuild_lag: status.rebuild_lag(),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if statuses.is_empty() {
                println!("no projections (a worker records each projection it runs when it starts)");
            } else {
                println!(
                    "{:<24} {:<18} {:>12} {:>12} {:>12} {:>14} LAST REBUILD",
                    "PROJECTION", "STATE", "POSITION", "LOG HEAD", "LAG", "NOT YET LOGGED"
                );
                for s in &statuses {
                    println!(
                        "{:<24} {:<18} {:>12} {:>12} {:>12} {:>14} {}",
                        s.name,
                        s.state,
                        s.position,
                        s.log_head,
                        s.rebuild_lag(),
                        s.not_yet_logged,
                        s.rebuild_finished_at
                            .map(|at| format!("finished {}, {} events", at.to_rfc3339(), s.rebuilt_events))
                            .unwrap_or_else(|| "-".into())
                    );
                }
                if statuses.iter().any(|s| s.not_yet_logged > 0) {
                    println!(
                        "positions count the event log, which the relay fills with events past its retention (7 days by default); \
                         the events not yet logged are still in outbox_events, and a rebuild applies them after the log"
                    );
                }
            }
            Ok(())
        }
        ProjectionCommand::Rebuild(args) => {
            let under_way = projection::statuses(&mut conn)
                .context("cannot read the projections")?
                .iter()
                .any(|s| s.name == args.name && s.state != "live");
            if under_way && args.wait {
                // Already asked for: follow that one.
                eprintln!(
                    "a rebuild of {} is already requested or under way; following it",
                    args.name
                );
            } else {
                projection::request_rebuild(&mut conn, &args.name)
                    .with_context(|| format!("cannot rebuild {}", args.name))?;
            }
            if !args.wait {
                println!(
                    "rebuild of {} requested: a worker running it starts within a second (follow it with `outbox projection status`)",
                    args.name
                );
                return Ok(());
            }
            let deadline = Instant::now() + args.timeout;
            let mut last = None;
            loop {
                let status = projection::statuses(&mut conn)
                    .context("cannot read the projections")?
                    .into_iter()
                    .find(|s| s.name == args.name)
                    .with_context(|| format!("projection {} is gone", args.name))?;
                if status.state == "live" {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        println!(
                            "{} rebuilt: {} events, live again from log position {}",
                            status.name, status.rebuilt_events, status.rebuilt_through
                        );
                    }
                    return Ok(());
                }
                if !args.json && last != Some((status.state.clone(), status.position)) {
                    eprintln!(
                        "{}: {} at log position {} of {} (then {} events not yet logged)",
                        status.name, status.state, status.position, status.log_head, status.not_yet_logged
                    );
                    last = Some((status.state.clone(), status.position));
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} is still {} after {:?} (the rebuild goes on; is a worker running it?)",
                        args.name,
                        status.state,
                        args.timeout
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}
