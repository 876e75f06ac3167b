//! `outbox-bench`, which `outbox bench` runs: the pipeline measured against
//! this machine's own Postgres and RabbitMQ, each scenario next to the raw
//! figure of the same machine in the same run. A binary of its own because
//! it links the CHOM example and the library's `testing` feature, which the
//! `outbox` people deploy must not contain; the relays it measures are
//! `outbox relay` processes of the `outbox` beside it (else on PATH).
//!
//! Every scenario works in a scratch database (`outbox_test_<id>`) and on a
//! private exchange and queue (`outbox_bench.<id>`), all removed at the end.
//!
//! Exit status: 0 on success, 1 on failure, 2 on bad usage.

mod broker;
mod consume;
mod dashboard;
mod drain;
mod hot;
mod latency;
mod pinned;
mod plot;
mod process;
mod projection;
mod seed;
mod stats;
mod takeover;
mod webhooks;
mod write;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use outbox_relay::{duration, logging};
use serde::Serialize;

/// Measure the pipeline against this machine's own Postgres and RabbitMQ.
///
/// Each scenario reports our figure next to the raw figure of the same
/// machine in the same run. Scratch databases, exchanges and queues are
/// removed afterwards.
///
/// Example: outbox bench drain --events 100000 --aggregates 1000
#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    version,
    propagate_version = true,
    mut_arg("database_url", |arg| arg.help(
        "Postgres server to measure against (scratch databases are created on it; the database name is ignored)"
    ))
)]
pub struct BenchArgs {
    #[command(flatten)]
    global: outbox_relay::GlobalArgs,
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
    /// Hot aggregates: a backlog on 1, 10 and 100 aggregates, one relay,
    /// next to a raw publisher held to the same order rule (at most one
    /// unconfirmed message per aggregate).
    ///
    /// Example: outbox bench hot --events 20000 --aggregates 1,10,100
    Hot(hot::HotArgs),
    /// Drain under a snapshot held open: rounds of backlog drained by one
    /// relay, first without, then with a REPEATABLE READ transaction open
    /// in its database (vacuum removes nothing meanwhile), each round's
    /// rate and the dead tuples left.
    ///
    /// Example: outbox bench pinned --events 20000 --rounds 10
    Pinned(pinned::PinnedArgs),
    /// Takeover: two relays drain a backlog, one is SIGKILLed while holding
    /// rows; the time until the other has published all of them.
    ///
    /// Example: outbox bench takeover --events 20000 --rounds 3
    Takeover(takeover::TakeoverArgs),
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
    /// The dashboard's failed-jobs pages at 100,000 rows: server time per
    /// page (first, deep by cursor, filtered, one job, the retry-all
    /// count), next to the bare SQL of the first page.
    ///
    /// Example: outbox bench dashboard --rows 100000 --requests 30
    Dashboard(dashboard::DashboardArgs),
    /// Webhook deliveries/s from a worker's webhook_delivery listener to a
    /// loopback receiver, next to a plain HTTP client posting the same
    /// bodies to it (target 0.7).
    ///
    /// Example: outbox bench webhooks --deliveries 5000 --concurrency 16
    Webhooks(webhooks::WebhooksArgs),
    /// A rebuild of CHOM's tenant_stats projection from 1,000,000 logged
    /// events, events/s, next to a plain scan of the same log (target 0.5).
    ///
    /// Example: outbox bench projection --events 1000000 --tenants 1000
    Projection(projection::ProjectionArgs),
    /// Every scenario with its default sizes (or tiny ones with --quick),
    /// every table; with --json one object holding all figures.
    ///
    /// Example: outbox bench all --quick --plot docs/bench
    All(AllArgs),
    /// The worker process `outbox bench consume` starts (internal).
    ///
    /// Example: outbox-bench worker-process --exchange x --app a --listener noop --messages 100 --concurrency 4 --prefetch 16
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
    /// `outbox bench drain` (100k events on 1,000 aggregates, 1, 2 and 4 relays).
    pub drain: drain::DrainReport,
    /// `outbox bench drain --events 1000000 --aggregates 10000 --relays 1`.
    pub drain_large: drain::DrainReport,
    /// `outbox bench hot`.
    pub hot: hot::HotReport,
    /// `outbox bench pinned`.
    pub pinned: pinned::PinnedReport,
    /// `outbox bench takeover`.
    pub takeover: takeover::TakeoverReport,
    /// `outbox bench latency` (1,000 events/s).
    pub latency: latency::LatencyReport,
    /// `outbox bench latency --rate 5000`.
    pub latency_high: latency::LatencyReport,
    /// `outbox bench latency --hold-snapshot --duration 10m`.
    pub latency_pinned: latency::LatencyReport,
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

/// The argument lines `outbox bench all` runs.
struct AllLines {
    write: Vec<&'static str>,
    drain: Vec<&'static str>,
    drain_large: Vec<&'static str>,
    hot: Vec<&'static str>,
    pinned: Vec<&'static str>,
    takeover: Vec<&'static str>,
    latency: Vec<&'static str>,
    latency_high: Vec<&'static str>,
    latency_pinned: Vec<&'static str>,
    consume: Vec<&'static str>,
    seed: Vec<&'static str>,
}

fn all_lines(quick: bool) -> AllLines {
    if quick {
        AllLines {
            write: vec!["write", "--writers", "2", "--duration", "1s", "--rounds", "1"],
            drain: vec![
                "drain",
                "--events",
                "300",
                "--aggregates",
                "10",
                "--relays",
                "1,2",
            ],
            drain_large: vec!["drain", "--events", "500", "--aggregates", "100", "--relays", "1"],
            hot: vec!["hot", "--events", "200", "--aggregates", "1,10"],
            pinned: vec![
                "pinned",
                "--events",
                "200",
                "--aggregates",
                "10",
                "--unpinned-rounds",
                "1",
                "--rounds",
                "2",
            ],
            takeover: vec![
                "takeover",
                "--events",
                "20000",
                "--aggregates",
                "1000",
                "--rounds",
                "1",
            ],
            latency: vec!["latency", "--rate", "200", "--duration", "1s", "--warmup", "0s"],
            latency_high: vec!["latency", "--rate", "500", "--duration", "1s", "--warmup", "0s"],
            latency_pinned: vec![
                "latency",
                "--rate",
                "200",
                "--duration",
                "1s",
                "--warmup",
                "0s",
                "--hold-snapshot",
            ],
            consume: vec!["consume", "--messages", "50"],
            seed: vec![
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
        }
    } else {
        AllLines {
            write: vec!["write"],
            drain: vec!["drain"],
            drain_large: vec![
                "drain",
                "--events",
                "1000000",
                "--aggregates",
                "10000",
                "--relays",
                "1",
            ],
            hot: vec!["hot"],
            pinned: vec!["pinned"],
            takeover: vec!["takeover"],
            latency: vec!["latency"],
            latency_high: vec!["latency", "--rate", "5000"],
            latency_pinned: vec!["latency", "--hold-snapshot", "--duration", "10m"],
            consume: vec!["consume"],
            seed: vec!["seed"],
        }
    }
}

macro_rules! scenario {
    ($line:expr, $variant:ident) => {{
        let Scenario::$variant(args) = scenario_args(&$line)? else {
            anyhow::bail!("built-in sizes {:?} parsed as another scenario", $line);
        };
        args
    }};
}

async fn run_all(
    target: &BenchTarget,
    args: &AllArgs,
    json: bool,
    plot: Option<&Path>,
) -> anyhow::Result<AllReport> {
    let lines = all_lines(args.quick);
    let show = |table: String| {
        if !json {
            println!("{table}");
        }
    };
    let write = write::run(target, &scenario!(lines.write, Write))
        .await
        .context("write")?;
    show(write.table());
    let drain = drain::run(target, &scenario!(lines.drain, Drain))
        .await
        .context("drain")?;
    show(drain.table());
    let drain_large = drain::run(target, &scenario!(lines.drain_large, Drain))
        .await
        .context("large drain")?;
    show(drain_large.table());
    let hot = hot::run(target, &scenario!(lines.hot, Hot))
        .await
        .context("hot")?;
    show(hot.table());
    let pinned = pinned::run(target, &scenario!(lines.pinned, Pinned))
        .await
        .context("pinned")?;
    show(pinned.table());
    let takeover = takeover::run(target, &scenario!(lines.takeover, Takeover))
        .await
        .context("takeover")?;
    show(takeover.table());
    let latency = latency::run(target, &scenario!(lines.latency, Latency))
        .await
        .context("latency")?;
    show(latency.table());
    let latency_high = latency::run(target, &scenario!(lines.latency_high, Latency))
        .await
        .context("latency at the higher rate")?;
    show(latency_high.table());
    let latency_pinned = latency::run(target, &scenario!(lines.latency_pinned, Latency))
        .await
        .context("latency with a snapshot held open")?;
    show(latency_pinned.table());
    let consume = consume::run(target, &scenario!(lines.consume, Consume))
        .await
        .context("consume")?;
    show(consume.table());
    let seed = seed::run(target, &scenario!(lines.seed, Seed))
        .await
        .context("seed")?;
    show(seed.table());
    if let Some(dir) = plot {
        written(plot::drain(dir, &drain)?);
        written(plot::latency(dir, &latency)?);
    }
    Ok(AllReport {
        write,
        drain,
        drain_large,
        hot,
        pinned,
        takeover,
        latency,
        latency_high,
        latency_pinned,
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

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let _telemetry = logging::init(args.global.log_format, "outbox-bench");
    match run(&args.global.database_url, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
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
        Scenario::Hot(hot) => print(args.json, &runtime.block_on(hot::run(&target, hot))?),
        Scenario::Pinned(pinned) => print(args.json, &runtime.block_on(pinned::run(&target, pinned))?),
        Scenario::Takeover(takeover) => {
            print(args.json, &runtime.block_on(takeover::run(&target, takeover))?)
        }
        Scenario::Consume(consume) => print(args.json, &runtime.block_on(consume::run(&target, consume))?),
        Scenario::Seed(seed) => print(args.json, &runtime.block_on(seed::run(&target, seed))?),
        Scenario::Webhooks(webhooks) => {
            print(args.json, &runtime.block_on(webhooks::run(&target, webhooks))?)
        }
        Scenario::Projection(projection) => print(
            args.json,
            &runtime.block_on(projection::run(&target, projection))?,
        ),
        Scenario::Dashboard(dashboard) => {
            print(args.json, &runtime.block_on(dashboard::run(&target, dashboard))?)
        }
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
            self.drain_large.table(),
            self.hot.table(),
            self.pinned.table(),
            self.takeover.table(),
            self.latency.table(),
            self.latency_high.table(),
            self.latency_pinned.table(),
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
