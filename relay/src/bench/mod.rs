//! `outbox bench`: the pipeline measured against this machine's own
//! Postgres and RabbitMQ, each scenario next to the raw figure of the same
//! machine in the same run.
//!
//! Every scenario works in a scratch database (`outbox_test_<id>`) and on a
//! private exchange and queue (`outbox_bench.<id>`), all removed at the end.

mod broker;
mod drain;
mod latency;
mod process;
mod stats;
mod write;

use anyhow::Context;
use serde::Serialize;

/// Options of `outbox bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// RabbitMQ to measure against.
    #[arg(long, env = "AMQP_URL", default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true, global = true)]
    amqp_url: String,
    /// Print the figures as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, clap::Subcommand)]
enum Scenario {
    /// Backlog drain: N events on M aggregates from the table to
    /// broker-confirmed, with 1 and 2 relay processes, next to a raw lapin
    /// publish-with-confirms of the same bodies to the same queue type.
    ///
    /// Example: outbox bench drain --events 100000 --aggregates 1000
    Drain(drain::DrainArgs),
    /// Steady load, one event per transaction: commit -> delivered to a
    /// consumer through a relay process, p50/p99/p999/max.
    ///
    /// Example: outbox bench latency --rate 1000 --duration 10s
    Latency(latency::LatencyArgs),
    /// Writer cost: concurrent writers committing one domain row with and
    /// without `record`, transactions/s and the ratio.
    ///
    /// Example: outbox bench write --writers 16 --duration 5s
    Write(write::WriteArgs),
}

/// Where the scenarios connect.
#[derive(Debug, Clone)]
pub struct BenchTarget {
    /// Postgres server (its database name is ignored).
    pub database_url: String,
    /// RabbitMQ.
    pub amqp_url: String,
}

/// Runs the chosen scenario and prints its figures.
pub fn run(database_url: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let target = BenchTarget {
        database_url: database_url.to_owned(),
        amqp_url: args.amqp_url.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match &args.scenario {
        Scenario::Drain(drain) => print(args.json, &runtime.block_on(drain::run(&target, drain))?),
        Scenario::Latency(latency) => print(args.json, &runtime.block_on(latency::run(&target, latency))?),
        Scenario::Write(write) => print(args.json, &runtime.block_on(write::run(&target, write))?),
    }
}

/// A scenario's figures: a table for people, JSON for scripts.
pub trait Report: Serialize {
    /// The human-readable table.
    fn table(&self) -> String;
}

fn print<R: Report>(json: bool, report: &R) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).context("cannot serialize the figures")?
        );
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
