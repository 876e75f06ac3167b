//! `chom`: the CHOM platform's command line. Every write goes through the
//! services in the `chom` library, so each change and its domain event
//! commit together in `outbox_events`.
//!
//! Commands that create something print the new id alone on stdout;
//! commands that change something print the recorded event's id; `--json`
//! prints JSON instead. Errors go to stderr with exit status 1 (usage
//! errors: 2).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chom::services::{backups, sites, tenants};
use chom::simulate::{SimulateConfig, SimulateReport};
use chom::{ChomError, Recorded, Site};
use clap::{Args, Parser, Subcommand};
use diesel::prelude::*;
use outbox::{Metadata, Outbox, redact_url};
use serde::Serialize;

/// CHOM's database when `DATABASE_URL` is not set.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/chom";

/// The CHOM hosting platform: tenants, sites and backups, with every change
/// recorded as a domain event in the transactional outbox.
#[derive(Debug, Parser)]
#[command(name = "chom", version)]
struct Cli {
    /// Postgres URL of CHOM's database.
    // hide_env_values: --help must not print a password taken from the
    // environment.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true,
        global = true
    )]
    database_url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if it is missing, then run the outbox's and
    /// CHOM's migrations.
    Migrate(MigrateArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage users (the recipients of notifications).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Manage backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Drive whole site lifecycles from concurrent writers and check that
    /// the outbox holds every event the services recorded.
    Simulate(SimulateArgs),
    /// Run the worker: CHOM's queued listeners (UpdateTenantMetrics,
    /// RecordAuditLog, SendNotification) from their queues, until SIGINT or
    /// SIGTERM.
    Work(WorkArgs),
    /// The whole platform in one process: create and migrate the database,
    /// run a relay and a worker, drive site and backup lifecycles (with
    /// failures and a notifier outage), then report what happened.
    Demo(DemoArgs),
    /// Declare the exchange and every listener's queues, retry queues and
    /// dead-letter queue ahead of a deploy (the worker also does it on
    /// start), and print them.
    Topology(TopologyArgs),
}

/// Where the broker is and how CHOM's queues are named.
#[derive(Debug, Args)]
struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// The topic exchange the relay publishes to.
    #[arg(long, env = "OUTBOX_EXCHANGE", default_value = outbox::DEFAULT_EXCHANGE)]
    exchange: String,
    /// Queue name prefix (`<app>.<listener>`).
    #[arg(long, default_value = chom::listeners::APP)]
    app: String,
}

/// Retry settings of the queued listeners.
#[derive(Debug, Args)]
struct RetryArgs {
    /// Tries per message, the first included (default: the seed's 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    tries: Option<u32>,
    /// Delays between tries, comma-separated (default: 30s,60s,120s).
    #[arg(long, value_delimiter = ',', value_parser = parse_duration)]
    backoff: Vec<Duration>,
    /// Handlers of each listener at once (default 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: Option<u32>,
}

impl RetryArgs {
    fn listener_config(&self) -> chom::listeners::ListenerConfig {
        let default = chom::listeners::ListenerConfig::default();
        let retries = if self.tries.is_none() && self.backoff.is_empty() {
            None
        } else {
            let base = outbox::ListenerOptions::default();
            Some((
                self.tries.unwrap_or(base.tries),
                if self.backoff.is_empty() {
                    base.backoff
                } else {
                    self.backoff.clone()
                },
            ))
        };
        chom::listeners::ListenerConfig {
            retries,
            concurrency: self.concurrency.map(|c| c as usize),
            ..default
        }
    }
}

#[derive(Debug, Args)]
struct WorkArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    retry: RetryArgs,
    /// Run only this queued listener (repeatable; default all).
    #[arg(long = "listener", value_name = "NAME")]
    listeners: Vec<String>,
    /// Serve /metrics and /health here; `off` to disable.
    #[arg(long, env = "CHOM_METRICS_ADDR", default_value = "127.0.0.1:9188")]
    metrics_addr: String,
    /// How long shutdown waits for handlers in flight.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

#[derive(Debug, Args)]
struct DemoArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Tenants of the normal traffic.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    tenants: u32,
    /// Site lifecycles of the normal traffic.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sites: u64,
    /// Site lifecycles during the notifier outage.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    outage_sites: u64,
    /// Probability that a provisioning or a backup fails.
    #[arg(long, default_value_t = 0.2, value_parser = parse_probability)]
    failure_rate: f64,
    /// Seed of the lifecycle mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[command(flatten)]
    output: Output,
}

#[derive(Debug, Args)]
struct TopologyArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    retry: RetryArgs,
    /// Only print what would be declared.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: Output,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// Fail instead of creating the database when it does not exist.
    #[arg(long)]
    no_create_database: bool,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        /// The tenant's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user of a tenant; prints its id.
    Create {
        /// The tenant's id.
        #[arg(long)]
        tenant: i64,
        /// Email address (unique).
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Create a site (site.created); prints its id.
    Create {
        /// The owning tenant's id.
        #[arg(long)]
        tenant: i64,
        /// The site's domain name.
        #[arg(long)]
        domain: String,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Finish provisioning a site (simulated): site.provisioned, or
    /// site.provisioning_failed with --fail; prints the event id.
    Provision {
        /// The site's id.
        id: i64,
        /// Fail the provisioning with this error text.
        #[arg(long, value_name = "ERROR")]
        fail: Option<String>,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Soft-delete a site (site.deleted); prints the event id.
    Delete {
        /// The site's id.
        id: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// List live sites.
    List {
        /// Only this tenant's sites.
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Start a backup of an active site (backup.created); prints its id.
    Create {
        /// The site's id.
        #[arg(long)]
        site: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Complete a running backup (backup.completed); prints the event id.
    Complete {
        /// The backup's id.
        id: i64,
        /// Size of the backup in bytes.
        #[arg(long)]
        size_bytes: i64,
        /// How long the backup took, in milliseconds.
        #[arg(long)]
        duration_ms: i64,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
    /// Fail a running backup (backup.failed); prints the event id.
    Fail {
        /// The backup's id.
        id: i64,
        /// What went wrong.
        #[arg(long)]
        error: String,
        #[command(flatten)]
        actor: Actor,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Tenants to create, each with one user.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    tenants: u32,
    /// Site lifecycles to run.
    #[arg(long)]
    sites: u64,
    /// Cap on transactions per second over all writers (0: no cap).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Concurrent writers, each with its own connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    writers: u32,
    /// Probability that a provisioning or a backup fails.
    #[arg(long, default_value_t = 0.1, value_parser = parse_probability)]
    failure_rate: f64,
    /// Seed of the lifecycle mix, for a reproducible run (default: random).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    output: Output,
}

/// Who performs an action.
#[derive(Debug, Args)]
struct Actor {
    /// Who performs the action (`user:42`); without it, a system action.
    #[arg(long, value_parser = parse_actor)]
    actor: Option<String>,
}

impl Actor {
    fn metadata(&self) -> Metadata {
        match &self.actor {
            Some(actor) => Metadata::by(actor.clone()),
            None => Metadata::system(),
        }
    }
}

#[derive(Debug, Args)]
struct Output {
    /// Print JSON instead of plain text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim()).map_err(|e| format!("{e} (try 30s, 500ms, 2m)"))
}

fn parse_metrics_addr(value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value.eq_ignore_ascii_case("off") || value.is_empty() {
        return Ok(None);
    }
    Ok(Some(value.parse().with_context(|| {
        format!("--metrics-addr {value:?} is not host:port or off")
    })?))
}

fn parse_actor(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || value.len() > 255 {
        return Err("must be 1 to 255 bytes, such as user:42".into());
    }
    Ok(value.to_owned())
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err("must be a non-negative number of transactions per second".into()),
    }
}

fn parse_probability(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("must be a number between 0 and 1".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Work(_) => "info,lapin=warn",
        // The demo prints its own progress and report.
        Command::Demo(_) => "off",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if let Some(hint) = hint(&error) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let url = cli.database_url.as_str();
    // The write path runs RecordMetrics after each commit.
    let registry = chom::listeners::registry(&chom::listeners::ListenerConfig::default())?;
    // Commits wake the relays (`outbox relay` LISTENs) instead of waiting
    // for their next poll.
    let outbox = Outbox::builder().registry(registry).wake_relays(url).build()?;
    match cli.command {
        Command::Migrate(args) => migrate(url, &args),
        Command::Tenant(TenantCommand::Create { name, output }) => {
            let tenant = tenants::create_tenant(&mut connect(url)?, &name).context("creating tenant")?;
            print_id(&output, tenant.id, &tenant)
        }
        Command::User(UserCommand::Create {
            tenant,
            email,
            name,
            output,
        }) => {
            let user =
                tenants::create_user(&mut connect(url)?, tenant, &email, &name).context("creating user")?;
            print_id(&output, user.id, &user)
        }
        Command::Site(command) => site(url, &outbox, command),
        Command::Backup(command) => backup(url, &outbox, command),
        Command::Simulate(args) => simulate(url, &outbox, args),
        Command::Work(args) => work(url, args),
        Command::Topology(args) => topology(args),
        Command::Demo(args) => demo(url, args),
    }
}

fn site(url: &str, outbox: &Outbox, command: SiteCommand) -> Result<()> {
    match command {
        SiteCommand::Create {
            tenant,
            domain,
            actor,
            output,
        } => {
            let created = sites::create_site(outbox, &mut connect(url)?, actor.metadata(), tenant, &domain)
                .context("creating site")?;
            print_id(&output, created.value.id, &created)
        }
        SiteCommand::Provision {
            id,
            fail,
            actor,
            output,
        } => {
            let outcome = fail.map_or(Ok(()), Err);
            let recorded = sites::provision_site(outbox, &mut connect(url)?, actor.metadata(), id, outcome)
                .with_context(|| format!("provisioning site {id}"))?;
            print_event(&output, &recorded)
        }
        SiteCommand::Delete { id, actor, output } => {
            let recorded = sites::delete_site(outbox, &mut connect(url)?, actor.metadata(), id)
                .with_context(|| format!("deleting site {id}"))?;
            print_event(&output, &recorded)
        }
        SiteCommand::List { tenant, output } => {
            let list = sites::list_sites(&mut connect(url)?, tenant).context("listing sites")?;
            if output.json {
                print_json(&list)
            } else {
                print_site_table(&list)
            }
        }
    }
}

fn backup(url: &str, outbox: &Outbox, command: BackupCommand) -> Result<()> {
    match command {
        BackupCommand::Create { site, actor, output } => {
            let created = backups::create_backup(outbox, &mut connect(url)?, actor.metadata(), site)
                .with_context(|| format!("starting a backup of site {site}"))?;
            print_id(&output, created.value.id, &created)
        }
        BackupCommand::Complete {
            id,
            size_bytes,
            duration_ms,
            actor,
            output,
        } => {
            let recorded = backups::complete_backup(
                outbox,
                &mut connect(url)?,
                actor.metadata(),
                id,
                size_bytes,
                duration_ms,
            )
            .with_context(|| format!("completing backup {id}"))?;
            print_event(&output, &recorded)
        }
        BackupCommand::Fail {
            id,
            error,
            actor,
            output,
        } => {
            let recorded = backups::fail_backup(outbox, &mut connect(url)?, actor.metadata(), id, &error)
                .with_context(|| format!("failing backup {id}"))?;
            print_event(&output, &recorded)
        }
    }
}

fn simulate(url: &str, outbox: &Outbox, args: SimulateArgs) -> Result<()> {
    let config = SimulateConfig {
        tenants: args.tenants,
        sites: args.sites,
        writers: args.writers,
        rate: args.rate,
        failure_rate: args.failure_rate,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let pool = outbox::pool(url, config.writers, Duration::from_secs(30))?;
    let report = chom::simulate::run(&pool, outbox, &config).context("simulation failed")?;
    if args.output.json {
        print_json(&report)?;
    } else {
        print_report(&report)?;
    }
    if !report.verified {
        bail!(
            "outbox_events does not match what the services recorded ({} event(s) missing)",
            report.missing_events
        );
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = interrupt.await;
}

fn work(url: &str, args: WorkArgs) -> Result<()> {
    let config = chom::work::WorkConfig {
        database_url: url.to_owned(),
        amqp_url: args.broker.amqp_url,
        exchange: args.broker.exchange,
        app: args.broker.app,
        listeners: args.retry.listener_config(),
        only: args.listeners,
        metrics_addr: parse_metrics_addr(&args.metrics_addr)?,
        shutdown_timeout: args.shutdown_timeout,
    };
    tracing::info!(database = %redact_url(url), amqp = %redact_url(&config.amqp_url), exchange = %config.exchange, "chom work starting");
    let runtime = runtime()?;
    let result = runtime.block_on(chom::work::run(config, shutdown_signal(), |bound| {
        if let Some(addr) = bound {
            tracing::info!("serving /metrics and /health on http://{addr}");
        }
    }));
    // Handlers still running on blocking threads past the shutdown timeout
    // are abandoned; their messages are back in their queues.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result.context("worker failed")
}

fn demo(url: &str, args: DemoArgs) -> Result<()> {
    let config = chom::demo::DemoConfig {
        database_url: url.to_owned(),
        amqp_url: args.broker.amqp_url,
        exchange: args.broker.exchange,
        app: args.broker.app,
        tenants: args.tenants,
        sites: args.sites,
        outage_sites: args.outage_sites,
        failure_rate: args.failure_rate,
        seed: args.seed,
        ..chom::demo::DemoConfig::default()
    };
    let json = args.output.json;
    let runtime = runtime()?;
    let report = runtime.block_on(chom::demo::run(config, |line| {
        if !json {
            eprintln!("[demo] {line}");
        }
    }));
    runtime.shutdown_timeout(Duration::from_secs(2));
    let report = report.context("demo failed")?;
    if json {
        print_json(&report)?;
    } else {
        print_demo(&report)?;
    }
    if !report.settled {
        bail!("the listeners did not finish every event within the time limit");
    }
    Ok(())
}

fn print_demo(report: &chom::demo::DemoReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n== events (this run) ==")?;
    writeln!(out, "{:<26} {:>9} {:>10}", "event type", "recorded", "published")?;
    for (event_type, count) in &report.events {
        writeln!(
            out,
            "{event_type:<26} {:>9} {:>10}",
            count.recorded, count.published
        )?;
    }
    let recorded: u64 = report.events.values().map(|c| c.recorded).sum();
    let published: u64 = report.events.values().map(|c| c.published).sum();
    writeln!(out, "{:<26} {recorded:>9} {published:>10}", "total")?;

    writeln!(out, "\n== listener outcomes ==  ({})", report.retry_policy)?;
    writeln!(
        out,
        "{:<22} {:<7} {:>8} {:>10} {:>8} {:>7}",
        "listener", "kind", "success", "duplicate", "retried", "failed"
    )?;
    for l in &report.listeners {
        writeln!(
            out,
            "{:<22} {:<7} {:>8} {:>10} {:>8} {:>7}",
            l.listener, l.kind, l.success, l.duplicate, l.retried, l.failed
        )?;
    }

    writeln!(out, "\n== audit log ==")?;
    writeln!(
        out,
        "{} rows for {} events ({} system actions without an actor)",
        report.audit_rows, recorded, report.audit_system_actions
    )?;
    writeln!(out, "{} notifications stored", report.notifications)?;

    writeln!(out, "\n== tenant stats (UpdateTenantMetrics) ==")?;
    writeln!(
        out,
        "{:>6}  {:<40} {:>6} {:>7} {:>14} {:>8} {:>7}",
        "tenant", "name", "sites", "active", "storage_bytes", "backups", "failed"
    )?;
    for t in &report.tenants {
        writeln!(
            out,
            "{:>6}  {:<40} {:>6} {:>7} {:>14} {:>8} {:>7}",
            t.tenant_id, t.name, t.sites, t.active_sites, t.storage_bytes, t.backups, t.failed_backups
        )?;
    }

    writeln!(out, "\n== failed jobs ==")?;
    if report.failed_jobs.is_empty() {
        writeln!(out, "none")?;
    }
    for job in &report.failed_jobs {
        writeln!(
            out,
            "#{:<5} {:<20} {:<26} {} tries  {}",
            job.id,
            job.listener,
            job.event_type.as_deref().unwrap_or("-"),
            job.attempts,
            job.exception
        )?;
    }
    for (queue, depth) in &report.dead_lettered {
        writeln!(out, "dead-letter queue {queue}: {depth} message(s)")?;
    }

    writeln!(out, "\n== RecordMetrics counters ==")?;
    for (name, value) in &report.metrics {
        writeln!(out, "{name} {value}")?;
    }
    writeln!(
        out,
        "\nfinished in {:.1} s{}",
        report.elapsed_seconds,
        if report.settled {
            ""
        } else {
            " (NOT settled: some events were still being handled)"
        }
    )?;
    Ok(())
}

fn topology(args: TopologyArgs) -> Result<()> {
    let registry = chom::listeners::registry(&args.retry.listener_config())?;
    let plan = outbox::consumer::topology::plan(&args.broker.app, &registry)?;
    if !args.dry_run {
        let runtime = runtime()?;
        runtime.block_on(async {
            let connection = outbox::amqp::connect(&args.broker.amqp_url, "chom topology").await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|source| outbox::Error::Broker {
                    context: "cannot open a channel".into(),
                    source,
                })?;
            outbox::consumer::topology::declare(&channel, &args.broker.exchange, &args.broker.app, &registry)
                .await?;
            let _ = connection.close(200, "declared".into()).await;
            Ok::<_, outbox::Error>(())
        })?;
    }
    if args.output.json {
        let listed: Vec<serde_json::Value> = plan
            .iter()
            .map(|q| {
                serde_json::json!({
                    "listener": q.listener,
                    "queue": q.queue,
                    "event_types": q.event_types,
                    "retry_queues": q.retries.iter().map(|(d, name)| serde_json::json!({"queue": name, "delay_ms": d.as_millis() as u64})).collect::<Vec<_>>(),
                    "dead_letter_queue": q.dead,
                    "delivery_limit": q.delivery_limit,
                })
            })
            .collect();
        return print_json(
            &serde_json::json!({"exchange": args.broker.exchange, "declared": !args.dry_run, "listeners": listed}),
        );
    }
    let mut out = std::io::stdout().lock();
    let verb = if args.dry_run { "would declare" } else { "declared" };
    writeln!(out, "{verb} on exchange {}:", args.broker.exchange)?;
    for q in &plan {
        writeln!(out, "  {}  <- {}", q.queue, q.event_types.join(", "))?;
        for (delay, name) in &q.retries {
            writeln!(
                out,
                "    retry  {name}  (waits {delay:?}, then back to {})",
                q.queue
            )?;
        }
        writeln!(out, "    dead   {}", q.dead)?;
    }
    writeln!(
        out,
        "sync (in-process after commit): {}",
        chom::listeners::RECORD_METRICS
    )?;
    Ok(())
}

/// Creates the database if it is missing (unless told not to), then runs
/// the outbox's and CHOM's migrations.
fn migrate(url: &str, args: &MigrateArgs) -> Result<()> {
    let shown = redact_url(url);
    let mut stdout = std::io::stdout().lock();
    if !args.no_create_database
        && outbox::create_database_if_missing(url)
            .with_context(|| format!("cannot create the database of {shown}"))?
    {
        writeln!(stdout, "created the database of {shown}")?;
    }
    let mut conn = connect(url)?;
    let applied = chom::migrate(&mut conn).with_context(|| format!("cannot migrate {shown}"))?;
    if applied.is_empty() {
        writeln!(stdout, "schema of {shown} is up to date")?;
    }
    for version in applied {
        writeln!(stdout, "applied {version}")?;
    }
    Ok(())
}

fn connect(url: &str) -> Result<PgConnection> {
    Ok(outbox::connect(url)?)
}

/// A next step for errors users commonly hit.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    error.chain().find_map(|cause| {
        let text = cause.to_string();
        if text.contains("relation") && text.contains("does not exist") {
            Some("run `chom migrate` to create CHOM's tables")
        } else if let Some(ChomError::NotFound { what: "site", .. }) = cause.downcast_ref::<ChomError>() {
            Some("`chom site list` shows the live sites; deleted sites are not found")
        } else {
            None
        }
    })
}

fn print_id<T: Serialize>(output: &Output, id: i64, value: &T) -> Result<()> {
    if output.json {
        print_json(value)
    } else {
        writeln!(std::io::stdout(), "{id}")?;
        Ok(())
    }
}

fn print_event<T: Serialize>(output: &Output, recorded: &Recorded<T>) -> Result<()> {
    if output.json {
        print_json(recorded)
    } else {
        writeln!(std::io::stdout(), "{}", recorded.event_id)?;
        Ok(())
    }
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value).context("writing JSON")?;
    writeln!(stdout)?;
    Ok(())
}

fn print_site_table(list: &[Site]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>8}  {:>8}  {:<40}  {:<12}  {:>14}  created",
        "id", "tenant", "domain", "status", "storage_bytes"
    )?;
    for site in list {
        writeln!(
            out,
            "{:>8}  {:>8}  {:<40}  {:<12}  {:>14}  {}",
            site.id,
            site.tenant_id,
            site.domain,
            site.status,
            site.storage_bytes,
            site.created_at.format("%Y-%m-%d %H:%M:%S")
        )?;
    }
    Ok(())
}

fn print_report(report: &SimulateReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<26} {:>10} {:>10}", "event type", "recorded", "in outbox")?;
    for event_type in chom::events::EVENT_TYPES {
        let recorded = report.events.get(event_type).copied().unwrap_or(0);
        let stored = report.database_events.get(event_type).copied().unwrap_or(0);
        writeln!(out, "{event_type:<26} {recorded:>10} {stored:>10}")?;
    }
    writeln!(
        out,
        "{:<26} {:>10} {:>10}",
        "total",
        report.events.values().sum::<u64>(),
        report.database_events.values().sum::<u64>()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{} transactions in {:.2} s: {:.1} transactions/s ({} writers, {} tenants, {} sites, seed {})",
        report.transactions,
        report.elapsed_seconds,
        report.transactions_per_second,
        report.writers,
        report.tenants,
        report.sites,
        report.seed
    )?;
    if report.verified {
        writeln!(
            out,
            "verified: every recorded event is in outbox_events exactly once"
        )?;
    }
    Ok(())
}
