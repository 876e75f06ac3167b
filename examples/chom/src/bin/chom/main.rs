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
use chom::models::Role;
use chom::services::{backups, sites, tenants};
use chom::simulate::{SimulateConfig, SimulateReport};
use chom::{ChomError, Recorded, Site};
use clap::{Args, Parser, Subcommand};
use diesel::prelude::*;
use outbox::{Metadata, Outbox, redact_url};
use serde::Serialize;

mod accounts;
mod cli;
mod contract;
mod output;

use accounts::*;
use cli::*;
use contract::*;
use output::*;

/// CHOM's database when `DATABASE_URL` is not set.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/chom";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Work(_) => "info,lapin=warn",
        // The demo prints its own progress and report.
        Command::Demo(_) => "off",
        _ => "warn",
    };
    let _telemetry = init_logging(default_filter);
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

/// Log lines on stderr, and spans over OTLP/HTTP when the standard
/// `OTEL_*` variables name a collector (as service `chom` unless
/// `OTEL_SERVICE_NAME` says otherwise). The guard flushes spans on drop.
fn init_logging(default_filter: &str) -> Option<outbox::telemetry::Telemetry> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let (telemetry, failed) = match outbox::telemetry::Telemetry::from_env("chom") {
        Ok(telemetry) => (telemetry, None),
        Err(error) => (None, Some(error)),
    };
    tracing_subscriber::registry()
        .with(
            telemetry
                .as_ref()
                .map(|telemetry| telemetry.layer().with_filter(outbox::telemetry::span_filter())),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .init();
    if let Some(error) = failed {
        tracing::warn!(%error, "OpenTelemetry is configured but its exporter could not be built; no spans are exported");
    }
    telemetry
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
        // A write command is one span: the events it records carry its
        // trace context (while exporting traces).
        Command::Site(command) => tracing::info_span!("chom site").in_scope(|| site(url, &outbox, command)),
        Command::Backup(command) => {
            tracing::info_span!("chom backup").in_scope(|| backup(url, &outbox, command))
        }
        Command::Team(command) => {
            tracing::info_span!("chom team").in_scope(|| team_command(url, &outbox, command))
        }
        Command::Ssl(command) => {
            tracing::info_span!("chom ssl").in_scope(|| ssl_command(url, &outbox, command))
        }
        Command::Security(command) => {
            tracing::info_span!("chom security").in_scope(|| security_command(url, &outbox, command))
        }
        Command::Quota(command) => {
            tracing::info_span!("chom quota").in_scope(|| quota_command(url, &outbox, command))
        }
        Command::Simulate(args) => simulate(url, &outbox, args),
        Command::Work(args) => work(url, args),
        Command::Topology(args) => topology(args),
        Command::Schema(command) => schema_command(command),
        Command::Asyncapi(args) => asyncapi(args),
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
        account_events: !args.no_account_events,
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
            "the outbox (outbox_events and the event log) does not match what the services recorded ({} event(s) missing)",
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
        accept_sources: args.accept_sources,
        quorum_initial_group_size: args.cluster.quorum_initial_group_size,
        webhooks: args.webhooks.config().context("webhook settings")?,
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

fn topology(args: TopologyArgs) -> Result<()> {
    let registry = chom::work::registry(&chom::work::WorkConfig {
        listeners: args.retry.listener_config(),
        webhooks: args.webhooks.config().context("webhook settings")?,
        ..chom::work::WorkConfig::default()
    })?;
    let plan: Vec<outbox::consumer::ListenerQueues> =
        outbox::consumer::topology::plan(&args.broker.app, &registry)?
            .into_iter()
            .map(|queues| queues.with_quorum_initial_group_size(args.cluster.quorum_initial_group_size))
            .collect();
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
            outbox::amqp::declare_exchange(&channel, &args.broker.exchange).await?;
            for queues in &plan {
                outbox::consumer::topology::declare_listener(&channel, &args.broker.exchange, queues).await?;
            }
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
        } else if let Some(ChomError::QuotaExceeded { .. }) = cause.downcast_ref::<ChomError>() {
            Some("the refusal was recorded (quota.site_quota_exceeded); `chom quota show --tenant ID` shows the usage, `chom quota set` changes the plan")
        } else if let Some(ChomError::NotFound { what: "team member", .. }) = cause.downcast_ref::<ChomError>() {
            Some("`chom team list --tenant ID` shows the team; removed members are not found")
        } else if let Some(ChomError::InvalidState { what: "team member", status, .. }) = cause.downcast_ref::<ChomError>()
            && status == "owner"
        {
            Some("the owner changes only by `chom team transfer --tenant ID --to USER`")
        } else {
            None
        }
    })
}
