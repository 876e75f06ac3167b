//! `outbox status`: the relay's backlog from the database and, for the
//! listeners named on the command line (else those workers registered in
//! `outbox_listeners` when they started), their queue depths from RabbitMQ
//! (read with passive `queue.declare`, no management plugin needed).
//!
//! `--json` prints one object: `database` (`backlog`,
//! `oldest_unpublished_age_seconds`, `in_flight`, `failed`, `retrying`,
//! `paused`, `paused_by`, `unroutable`, `by_event_type: [{event_type,
//! backlog, oldest_unpublished_age_seconds, failed}]`,
//! `unroutable_by_event_type: [{event_type, count, last_at}]`), `failed_jobs: [{listener,
//! queue, count}]`, and `listeners`: `null` without `--app`/`--listener`
//! and with no registered listener, else `[{app, listener, queue, depth, retry_depth, retry_queues: [{queue,
//! depth}], dead_queue, dead_depth, failed_jobs}]` where a depth is `null`
//! when that queue does not exist.
//!
//! `dead_depth` (DEAD) counts the copies a dead-letter queue keeps for
//! inspection, one per message that failed for good (and any the broker
//! dead-lettered past the delivery limit). `failed_jobs` (FAILED JOBS)
//! counts the rows operators act on; `outbox failed retry` and `forget`
//! delete rows and leave the copies, so DEAD may exceed FAILED JOBS.
//! `outbox topology purge-dead` empties the copies.

use std::time::Duration;

use anyhow::{Context, bail};
use outbox::consumer::topology;
use serde::Serialize;

use crate::duration::parse_duration;
use crate::failed_cmd::table;

/// Options of `outbox status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The application prefix of the listeners' queues (`<app>.<listener>`);
    /// without it and --listener, the listeners workers registered.
    #[arg(long, requires = "listener")]
    app: Option<String>,
    /// A listener whose queues to measure; repeat for each (needs --app).
    #[arg(long, requires = "app")]
    listener: Vec<String>,
    /// The listeners' retry delays, naming their retry queues (`<queue>.retry.30s`).
    #[arg(long, value_delimiter = ',', default_value = "30s,1m", value_parser = parse_duration)]
    retry_delays: Vec<Duration>,
    /// RabbitMQ URL (amqp:// or amqps://), used with --listener; several, comma separated, for the nodes of a cluster.
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DatabaseStatus {
    #[serde(flatten)]
    stats: outbox::relay::BacklogStats,
    paused_by: Option<String>,
    by_event_type: Vec<outbox::relay::EventTypeBacklog>,
    unroutable_by_event_type: Vec<outbox::relay::UnroutableEvents>,
}

#[derive(Debug, Serialize)]
struct FailedCount {
    listener: String,
    queue: String,
    count: i64,
}

#[derive(Debug, Serialize)]
struct QueueDepth {
    queue: String,
    depth: Option<u32>,
}

#[derive(Debug, Serialize)]
struct ListenerStatus {
    app: String,
    listener: String,
    queue: String,
    depth: Option<u32>,
    retry_depth: u32,
    retry_queues: Vec<QueueDepth>,
    dead_queue: String,
    dead_depth: Option<u32>,
    failed_jobs: i64,
}

#[derive(Debug, Serialize)]
struct Status {
    database: DatabaseStatus,
    failed_jobs: Vec<FailedCount>,
    listeners: Option<Vec<ListenerStatus>>,
}

/// Prints the outbox's status.
pub fn run(database_url: &str, args: &StatusArgs) -> anyhow::Result<()> {
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    let stats = outbox::relay::backlog_stats(&mut conn).context("cannot read the backlog")?;
    let by_event_type = outbox::relay::backlog_by_event_type(&mut conn).context("cannot read the backlog")?;
    let unroutable_by_event_type =
        outbox::relay::unroutable_by_event_type(&mut conn).context("cannot read unroutable events")?;
    let paused_by = outbox::control::paused_by(&mut conn).context("cannot read the pause switch")?;
    let failed: Vec<FailedCount> = outbox::failed_jobs::count_by_listener(&mut conn)
        .context("cannot count failed jobs")?
        .into_iter()
        .map(|(listener, queue, count)| FailedCount {
            listener,
            queue,
            count,
        })
        .collect();
    let targets = match &args.app {
        Some(app) if !args.listener.is_empty() => Some(named_targets(app, args)?),
        // Without flags: the listeners workers registered.
        _ => {
            let registered = outbox::consumer::registered_listeners(&mut conn)
                .context("cannot read the registered listeners")?;
            (!registered.is_empty()).then(|| registered.into_iter().map(Target::from).collect())
        }
    };
    let listeners = match targets {
        Some(targets) => Some(listener_status(targets, args, &failed)?),
        None => None,
    };
    let status = Status {
        database: DatabaseStatus {
            stats,
            paused_by,
            by_event_type,
            unroutable_by_event_type,
        },
        failed_jobs: failed,
        listeners,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status, args.app.as_deref());
    }
    Ok(())
}

/// One listener's queues to measure.
struct Target {
    app: String,
    listener: String,
    queue: String,
    retry_queues: Vec<String>,
    dead_queue: String,
}

impl From<outbox::consumer::RegisteredListener> for Target {
    fn from(registered: outbox::consumer::RegisteredListener) -> Self {
        Self {
            app: registered.app,
            listener: registered.listener,
            queue: registered.queue,
            retry_queues: registered.retry_queues,
            dead_queue: registered.dead_queue,
        }
    }
}

/// The queues of the listeners named by `--app` and `--listener`, their
/// retry queues named by `--retry-delays`.
fn named_targets(app: &str, args: &StatusArgs) -> anyhow::Result<Vec<Target>> {
    outbox::amqp::validate_amqp_name("app", app)?;
    let mut targets = Vec::new();
    for listener in &args.listener {
        outbox::amqp::validate_amqp_name("listener", listener)?;
        let queue = format!("{app}.{listener}");
        targets.push(Target {
            app: app.to_owned(),
            listener: listener.clone(),
            retry_queues: args
                .retry_delays
                .iter()
                .map(|delay| topology::retry_queue_name(&queue, *delay))
                .collect(),
            dead_queue: topology::dead_queue_name(&queue),
            queue,
        });
    }
    Ok(targets)
}

fn listener_status(
    targets: Vec<Target>,
    args: &StatusArgs,
    failed: &[FailedCount],
) -> anyhow::Result<Vec<ListenerStatus>> {
    outbox::amqp::validate_amqp_url(&args.amqp_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shown = outbox::redact_url(&args.amqp_url);
        let connection = outbox::amqp::connect(&args.amqp_url, "outbox status")
            .await
            .with_context(|| format!("cannot reach the broker at {shown}"))?;
        let mut out = Vec::new();
        for target in targets {
            let Target {
                app,
                listener,
                queue,
                retry_queues: retry_names,
                dead_queue,
            } = target;
            let depths = topology::measure_depths(&connection, &queue, &retry_names, &dead_queue).await?;
            let retry_queues: Vec<QueueDepth> = depths
                .retry_queues
                .into_iter()
                .map(|(queue, depth)| QueueDepth { queue, depth })
                .collect();
            let failed_jobs = failed
                .iter()
                .filter(|f| f.listener == listener && f.queue == queue)
                .map(|f| f.count)
                .sum();
            out.push(ListenerStatus {
                app,
                listener,
                retry_depth: depths.retry_depth,
                queue,
                depth: depths.depth,
                retry_queues,
                dead_queue,
                dead_depth: depths.dead_depth,
                failed_jobs,
            });
        }
        let _ = connection.close(200, "done".into()).await;
        if out.iter().all(|l| l.depth.is_none()) {
            let apps: Vec<&str> = out.iter().map(|l| l.app.as_str()).collect();
            bail!(
                "none of the listeners' queues exist at {shown} (is --app {} right?): {}",
                apps.first().copied().unwrap_or("?"),
                out.iter()
                    .map(|l| l.queue.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(out)
    })
}

/// What the DEAD column counts, printed when it is not zero: the
/// dead-letter copies are kept for inspection, retrying or forgetting a
/// failed job leaves its copy, and how to empty them.
fn dead_note(app: &str, listeners: &[ListenerStatus]) -> String {
    let holding: Vec<&str> = listeners
        .iter()
        .filter(|l| l.dead_depth.unwrap_or(0) > 0)
        .map(|l| l.listener.as_str())
        .collect();
    format!(
        "DEAD counts the copies kept in <queue>.dead for inspection, one per message that failed for good; \
         FAILED JOBS is the record to act on (`outbox failed retry` and `forget` leave the copy, \
         so DEAD may exceed it). Empty them with: outbox topology purge-dead --app {app} {}",
        holding
            .iter()
            .map(|l| format!("--listener {l}"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn depth(depth: Option<u32>) -> String {
    depth.map_or_else(|| "missing".to_owned(), |d| d.to_string())
}

fn print_text(status: &Status, app: Option<&str>) {
    let db = &status.database;
    let s = &db.stats;
    match (s.paused, &db.paused_by) {
        (true, Some(by)) => println!("relays:     PAUSED ({by})"),
        (true, None) => println!("relays:     PAUSED"),
        (false, _) => println!("relays:     running (not paused)"),
    }
    println!(
        "backlog:    {} unpublished, oldest {:.1}s old",
        s.backlog, s.oldest_unpublished_age_seconds
    );
    println!(
        "relay rows: {} in flight, {} waiting to retry, {} failed",
        s.in_flight, s.retrying, s.failed
    );
    if !db.by_event_type.is_empty() {
        println!();
        let rows: Vec<[String; 4]> = db
            .by_event_type
            .iter()
            .map(|b| {
                [
                    b.event_type.clone(),
                    b.backlog.to_string(),
                    b.failed.to_string(),
                    format!("{:.1}s", b.oldest_unpublished_age_seconds),
                ]
            })
            .collect();
        print!("{}", table(&["EVENT TYPE", "BACKLOG", "FAILED", "OLDEST"], &rows));
    }
    if !db.unroutable_by_event_type.is_empty() {
        println!();
        println!(
            "unroutable: {} kept events had no queue bound to their type (replay them once a listener exists)",
            s.unroutable
        );
        let rows: Vec<[String; 3]> = db
            .unroutable_by_event_type
            .iter()
            .map(|u| {
                [
                    u.event_type.clone(),
                    u.count.to_string(),
                    u.last_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                ]
            })
            .collect();
        print!("{}", table(&["EVENT TYPE", "UNROUTABLE", "LAST"], &rows));
    }
    println!();
    match &status.listeners {
        Some(listeners) => {
            let rows: Vec<[String; 5]> = listeners
                .iter()
                .map(|l| {
                    [
                        l.queue.clone(),
                        depth(l.depth),
                        l.retry_depth.to_string(),
                        depth(l.dead_depth),
                        l.failed_jobs.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["QUEUE", "READY", "RETRYING", "DEAD", "FAILED JOBS"], &rows)
            );
            if listeners.iter().any(|l| l.dead_depth.unwrap_or(0) > 0) {
                let app = app
                    .or_else(|| listeners.first().map(|l| l.app.as_str()))
                    .unwrap_or("APP");
                println!("{}", dead_note(app, listeners));
            }
        }
        None => {
            println!("queues:     not shown; name them with --app APP --listener NAME (repeatable)");
            if status.failed_jobs.is_empty() {
                println!("failed jobs: none");
            } else {
                let rows: Vec<[String; 2]> = status
                    .failed_jobs
                    .iter()
                    .map(|f| [f.queue.clone(), f.count.to_string()])
                    .collect();
                print!("{}", table(&["QUEUE", "FAILED JOBS"], &rows));
            }
        }
    }
}
