//! `outbox bench`: the pipeline measured against this machine's own
//! Postgres and RabbitMQ, each scenario next to the raw figure of the same
//! machine in the same run.
//!
//! Every scenario works in a scratch database (`outbox_test_<id>`) and on a
//! private exchange and queue (`outbox_bench.<id>`), all removed at the end.

mod broker;
mod consume;
mod drain;
mod latency;
mod plot;
mod process;
mod seed;
mod stats;
mod write;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
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
    /// Write SVG charts into this directory (latency distribution, drain
    /// throughput over time) for the scenarios that have them.
    #[arg(long, global = true, value_name = "DIR")]
    plot: Option<PathBuf>,
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
    /// Consumer throughput: an `outbox::Worker` process running a no-op
    /// listener, a no-op listener with the inbox and CHOM's RecordAuditLog,
    /// next to a raw lapin consume-and-ack of the same queue.
    ///
    /// Example: outbox bench consume --messages 5000 --concurrency 4
    Consume(consume::ConsumeArgs),
    /// The seed summary's five benchmarks with the CHOM services (dispatch
    /// overhead, site creation, full lifecycle, 100 creations, memory for
    /// 1,000 events), next to the seed's figures and 10x targets.
    ///
    /// Example: outbox bench seed --creates 500 --lifecycles 100
    Seed(seed::SeedArgs),
    /// Every scenario with its default sizes (or tiny ones with --quick),
    /// every table; with --json one object holding all figures.
    ///
    /// Example: outbox bench all --quick --plot docs/bench
    All(AllArgs),
    /// The worker process `outbox bench consume` starts (internal).
    ///
    /// Example: outbox bench worker-process --exchange x --app a --listener noop --messages 100 --concurrency 4 --prefetch 16
    #[command(hide = true)]
    WorkerProcess(consume::WorkerProcessArgs),
}

/// Options of `outbox bench all`.
#[derive(Debug, clap::Args)]
pub struct AllArgs {
    /// Tiny sizes (seconds in total): checks that everything runs, the
    /// figures mean little.
    #[arg(long)]
    quick: bool,
}

/// Every scenario's figures, as `outbox bench all --json` prints them.
#[derive(Debug, Serialize)]
pub struct AllReport {
    /// `outbox bench write`.
    pub write: write::WriteReport,
    /// `outbox bench drain`.
    pub drain: drain::DrainReport,
    /// `outbox bench latency`.
    pub latency: latency::LatencyReport,
    /// `outbox bench consume`.
    pub consume: consume::ConsumeReport,
    /// `outbox bench seed`.
    pub seed: seed::SeedReport,
}

/// Parses one scenario's arguments (defaults filled in by clap).
#[derive(Debug, Parser)]
#[command(name = "outbox bench")]
struct ScenarioLine {
    #[command(subcommand)]
    scenario: Scenario,
}

fn scenario_args(line: &[&str]) -> anyhow::Result<Scenario> {
    Ok(
        ScenarioLine::try_parse_from(std::iter::once("bench").chain(line.iter().copied()))
            .with_context(|| format!("bad built-in sizes {line:?}"))?
            .scenario,
    )
}

/// The argument lines `outbox bench all` runs, in order.
fn all_lines(quick: bool) -> [Vec<&'static str>; 5] {
    if quick {
        [
            vec!["write", "--writers", "2", "--duration", "1s", "--rounds", "1"],
            vec!["drain", "--events", "300", "--aggregates", "10", "--relays", "1"],
            vec!["latency", "--rate", "200", "--duration", "1s", "--warmup", "0s"],
            vec!["consume", "--messages", "50"],
            vec![
                "seed",
                "--creates",
                "20",
                "--lifecycles",
                "5",
                "--burst",
                "20",
                "--events",
                "50",
            ],
        ]
    } else {
        [
            vec!["write"],
            vec!["drain"],
            vec!["latency"],
            vec!["consume"],
            vec!["seed"],
        ]
    }
}

async fn run_all(
    target: &BenchTarget,
    args: &AllArgs,
    json: bool,
    plot: Option<&Path>,
) -> anyhow::Result<AllReport> {
    let [write_line, drain_line, latency_line, consume_line, seed_line] = all_lines(args.quick);
    let show = |table: String| {
        if !json {
            println!("{table}");
        }
    };
    let Scenario::Write(write_args) = scenario_args(&write_line)? else {
        anyhow::bail!("write sizes parsed as another scenario");
    };
    let write = write::run(target, &write_args).await.context("write")?;
    show(write.table());
    let Scenario::Drain(drain_args) = scenario_args(&drain_line)? else {
        anyhow::bail!("drain sizes parsed as another scenario");
    };
    let drain = drain::run(target, &drain_args).await.context("drain")?;
    show(drain.table());
    let Scenario::Latency(latency_args) = scenario_args(&latency_line)? else {
        anyhow::bail!("latency sizes parsed as another scenario");
    };
    let latency = latency::run(target, &latency_args).await.context("latency")?;
    show(latency.table());
    let Scenario::Consume(consume_args) = scenario_args(&consume_line)? else {
        anyhow::bail!("consume sizes parsed as another scenario");
    };
    let consume = consume::run(target, &consume_args).await.context("consume")?;
    show(consume.table());
    let Scenario::Seed(seed_args) = scenario_args(&seed_line)? else {
        anyhow::bail!("seed sizes parsed as another scenario");
    };
    let seed = seed::run(target, &seed_args).await.context("seed")?;
    show(seed.table());
    if let Some(dir) = plot {
        written(plot::drain(dir, &drain)?);
        written(plot::latency(dir, &latency)?);
    }
    Ok(AllReport {
        write,
        drain,
        latency,
        consume,
        seed,
    })
}

/// Creates a scratch database with the outbox tables (and CHOM's, with
/// `with_chom`), on the blocking pool.
async fn scratch_database(server: &str, with_chom: bool) -> anyhow::Result<outbox::testing::TestDatabase> {
    let server = server.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let db = outbox::testing::TestDatabase::create_on(&server)?;
        let mut conn = db.connect()?;
        if with_chom {
            chom::migrate(&mut conn)?;
        } else {
            outbox::migrate(&mut conn)?;
        }
        Ok(db)
    })
    .await
    .context("the set-up task failed")?
    .context("cannot create the scratch database")
}

/// Drops a scratch database, on the blocking pool.
async fn drop_database(db: outbox::testing::TestDatabase) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || drop(db))
        .await
        .context("the clean-up task failed")
}

fn written(path: PathBuf) {
    eprintln!("wrote {}", path.display());
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
    let plot = args.plot.as_deref();
    match &args.scenario {
        Scenario::Drain(drain) => {
            let report = runtime.block_on(drain::run(&target, drain))?;
            if let Some(dir) = plot {
                written(plot::drain(dir, &report)?);
            }
            print(args.json, &report)
        }
        Scenario::Latency(latency) => {
            let report = runtime.block_on(latency::run(&target, latency))?;
            if let Some(dir) = plot {
                written(plot::latency(dir, &report)?);
            }
            print(args.json, &report)
        }
        Scenario::Write(write) => print(args.json, &runtime.block_on(write::run(&target, write))?),
        Scenario::Consume(consume) => print(args.json, &runtime.block_on(consume::run(&target, consume))?),
        Scenario::Seed(seed) => print(args.json, &runtime.block_on(seed::run(&target, seed))?),
        Scenario::All(all) => {
            let report = runtime.block_on(run_all(&target, all, args.json, plot))?;
            if args.json {
                print(true, &report)?;
            }
            Ok(())
        }
        Scenario::WorkerProcess(worker) => {
            runtime.block_on(consume::worker_process(database_url, &args.amqp_url, worker))
        }
    }
}

impl Report for AllReport {
    fn table(&self) -> String {
        [
            self.write.table(),
            self.drain.table(),
            self.latency.table(),
            self.consume.table(),
            self.seed.table(),
        ]
        .join("\n")
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
