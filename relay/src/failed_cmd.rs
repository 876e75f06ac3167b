//! `outbox failed ...`: inspect, retry and delete the jobs queued listeners
//! could not handle (the `failed_jobs` table).
//!
//! `outbox failed list --json` prints one JSON array of objects with the
//! stable fields `id`, `uuid`, `queue`, `listener`, `event_id` (null when
//! unknown), `event_type` (null when unknown), `exception`, `attempts` and
//! `failed_at` (RFC 3339). `outbox failed show --json` prints one object
//! with those fields plus `payload` (the message as received) and `errors`
//! (`[{attempt, at, error}]`, oldest first).

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use outbox::failed_jobs::{self, FailedJob, Filter, RetryProgress};
use serde::Serialize;

use crate::duration::{parse_duration, parse_time};

/// Subcommands of `outbox failed`.
#[derive(Debug, clap::Subcommand)]
pub enum FailedCommand {
    /// List failed jobs, newest first.
    ///
    /// Example: outbox failed list --listener record_audit_log --since 2h --json
    List(ListArgs),
    /// Show one failed job: its message, final error and every attempt.
    ///
    /// Example: outbox failed show 42
    Show(ShowArgs),
    /// Republish failed jobs to their own listener's queue, then delete them.
    ///
    /// Only the listener that failed gets the message again; a row is
    /// deleted only after the broker confirmed the republish. Each
    /// aggregate's jobs go back oldest event first (by the event's position
    /// in the outbox), whatever order they are named in; a job that is kept
    /// keeps its aggregate's later jobs too. The copy in
    /// the listener's dead-letter queue stays (`outbox status` counts it
    /// under DEAD); `outbox topology purge-dead` empties that queue.
    ///
    /// Example: outbox failed retry 42 43, or: outbox failed retry --all --listener send_backup_notification
    Retry(RetryArgs),
    /// Delete failed jobs without retrying them.
    ///
    /// Example: outbox failed forget 42 43
    Forget(ForgetArgs),
    /// Delete every failed job (or those older than --older-than).
    ///
    /// Asks for confirmation on a terminal; without one, --yes is required.
    ///
    /// Example: outbox failed flush --older-than 7d --yes
    Flush(FlushArgs),
    /// Delete failed jobs older than --hours (Laravel's queue:prune-failed).
    ///
    /// Example: outbox failed prune --hours 48
    Prune(PruneArgs),
}

/// Filters shared by `list` and `retry --all`.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Only this listener's jobs (e.g. record_audit_log).
    #[arg(long)]
    listener: Option<String>,
    /// Only jobs of this event type (e.g. site.created).
    #[arg(long)]
    event_type: Option<String>,
    /// Only jobs that failed at or after this time: RFC 3339 or a duration ago (2h).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only jobs that failed before this time: RFC 3339 or a duration ago (30m).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Only jobs whose final error contains this text (case-insensitive).
    #[arg(long)]
    error_contains: Option<String>,
    /// At most this many jobs, the newest, 1 to 10000 [default: 50 for list; every match for retry --all].
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=failed_jobs::MAX_LIST_LIMIT))]
    limit: Option<i64>,
}

impl FilterArgs {
    fn filter(&self, default_limit: i64) -> Filter {
        Filter {
            listener: self.listener.clone(),
            event_type: self.event_type.clone(),
            since: self.since,
            until: self.until,
            error_contains: self.error_contains.clone(),
            error_group: None,
            after: None,
            limit: Some(self.limit.unwrap_or(default_limit)),
        }
    }
}

/// Options of `outbox failed list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox failed show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The failed job's id (first column of `outbox failed list`).
    id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `outbox failed retry`.
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// Ids of the failed jobs to retry.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<i64>,
    /// Retry every job matching the filters instead of named ids.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    filter: FilterArgs,
    /// RabbitMQ URL (amqp:// or amqps://); several, comma separated, for the nodes of a cluster (the first that answers is used).
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// How long to wait for the broker's confirm of each republish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    confirm_timeout: Duration,
}

/// Options of `outbox failed forget`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// Ids of the failed jobs to delete.
    #[arg(required = true)]
    ids: Vec<i64>,
}

/// Options of `outbox failed flush`.
#[derive(Debug, clap::Args)]
pub struct FlushArgs {
    /// Only jobs that failed longer ago than this (e.g. 7d).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

/// Options of `outbox failed prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Delete jobs that failed more than this many hours ago.
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
}

/// Runs `outbox failed SUBCOMMAND`.
pub fn run(database_url: &str, command: &FailedCommand) -> anyhow::Result<()> {
    if let FailedCommand::Retry(args) = command {
        return retry(database_url, args);
    }
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    match command {
        FailedCommand::List(args) => list(&mut conn, args),
        FailedCommand::Show(args) => show(&mut conn, args),
        FailedCommand::Forget(args) => forget(&mut conn, args),
        FailedCommand::Flush(args) => flush(&mut conn, args),
        FailedCommand::Prune(args) => {
            let deleted = failed_jobs::prune(&mut conn, args.hours).context("cannot prune failed jobs")?;
            println!(
                "deleted {deleted} failed job(s) older than {} hour(s)",
                args.hours
            );
            Ok(())
        }
        FailedCommand::Retry(_) => unreachable!("handled above"),
    }
}

/// The stable fields of one row of `outbox failed list --json`.
#[derive(Debug, Serialize)]
struct ListedJob<'a> {
    id: i64,
    uuid: uuid::Uuid,
    queue: &'a str,
    listener: &'a str,
    event_id: Option<uuid::Uuid>,
    event_type: Option<&'a str>,
    exception: &'a str,
    attempts: i32,
    failed_at: String,
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn list(conn: &mut diesel::PgConnection, args: &ListArgs) -> anyhow::Result<()> {
    let jobs = failed_jobs::list(conn, &args.filter.filter(50)).context("cannot list failed jobs")?;
    if args.json {
        let rows: Vec<ListedJob<'_>> = jobs
            .iter()
            .map(|job| ListedJob {
                id: job.id,
                uuid: job.uuid,
                queue: &job.queue,
                listener: &job.listener,
                event_id: job.event_id,
                event_type: job.event_type.as_deref(),
                exception: &job.exception,
                attempts: job.attempts,
                failed_at: time(job.failed_at),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no failed jobs");
        return Ok(());
    }
    let header = ["ID", "FAILED AT", "LISTENER", "EVENT TYPE", "TRIES", "ERROR"];
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|job| {
            [
                job.id.to_string(),
                job.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                job.listener.clone(),
                job.event_type.clone().unwrap_or_else(|| "-".into()),
                job.attempts.to_string(),
                one_line(&job.exception, 60),
            ]
        })
        .collect();
    print!("{}", table(&header, &rows));
    Ok(())
}

/// An aligned text table; the last column is not padded.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn one_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or_default();
    if first.len() <= max {
        first.to_owned()
    } else {
        outbox::text::elided(first, max.saturating_sub(3)).into_owned()
    }
}

fn find(conn: &mut diesel::PgConnection, id: i64) -> anyhow::Result<FailedJob> {
    failed_jobs::get(conn, id)
        .with_context(|| format!("cannot read failed job {id}"))?
        .with_context(|| format!("no failed job with id {id}"))
}

fn show(conn: &mut diesel::PgConnection, args: &ShowArgs) -> anyhow::Result<()> {
    let job = find(conn, args.id)?;
    if args.json {
        let mut value = serde_json::to_value(&job)?;
        value["failed_at"] = serde_json::Value::String(time(job.failed_at));
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let unknown = || "-".to_owned();
    println!("id:         {}", job.id);
    println!("uuid:       {}", job.uuid);
    println!("listener:   {}", job.listener);
    println!("queue:      {}", job.queue);
    println!(
        "event id:   {}",
        job.event_id.map_or_else(unknown, |id| id.to_string())
    );
    println!("event type: {}", job.event_type.clone().unwrap_or_else(unknown));
    println!("failed at:  {}", time(job.failed_at));
    println!("attempts:   {}", job.attempts);
    println!("exception:");
    for line in job.exception.lines() {
        println!("  {line}");
    }
    println!("errors:");
    if job.errors.is_empty() {
        println!("  (none recorded)");
    }
    for error in &job.errors {
        println!("  #{} at {}: {}", error.attempt, time(error.at), error.error);
    }
    println!("payload:");
    for line in serde_json::to_string_pretty(&job.payload)?.lines() {
        println!("  {line}");
    }
    Ok(())
}

fn forget(conn: &mut diesel::PgConnection, args: &ForgetArgs) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut deleted = 0;
    for &id in &args.ids {
        if failed_jobs::forget(conn, id).with_context(|| format!("cannot delete failed job {id}"))? {
            deleted += 1;
        } else {
            missing.push(id.to_string());
        }
    }
    println!("deleted {deleted} failed job(s)");
    if !missing.is_empty() {
        bail!("no failed job with id {}", missing.join(", "));
    }
    Ok(())
}

/// Whether to go ahead: `yes` (from --yes), or the answer to `question` on
/// a terminal. Without a terminal and without --yes it refuses.
pub fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing without confirmation ({question} asked): stdin is not a terminal; pass --yes");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn flush(conn: &mut diesel::PgConnection, args: &FlushArgs) -> anyhow::Result<()> {
    let what = match args.older_than {
        Some(age) => format!("every failed job older than {}", humantime::format_duration(age)),
        None => "every failed job".to_owned(),
    };
    if !confirm(&format!("Delete {what}?"), args.yes)? {
        println!("nothing deleted");
        return Ok(());
    }
    let hours = args.older_than.map(|age| age.as_secs_f64() / 3600.0);
    let deleted = failed_jobs::flush(conn, hours).context("cannot flush failed jobs")?;
    println!("deleted {deleted} failed job(s)");
    Ok(())
}

/// From this many jobs on, `retry` shows a progress bar on a terminal.
const PROGRESS_BAR_FROM: usize = 20;

fn retry(database_url: &str, args: &RetryArgs) -> anyhow::Result<()> {
    outbox::amqp::validate_amqp_url(&args.amqp_url)?;
    let pool =
        outbox::pool(database_url, 2, Duration::from_secs(10)).context("cannot open the outbox database")?;
    // What to retry: named ids, the newest --limit matches, or every match.
    let selection = if !args.all {
        Selection::Ids(args.ids.clone())
    } else if args.filter.limit.is_some() {
        let mut conn = pool.get().context("cannot open the outbox database")?;
        let ids = failed_jobs::list(&mut conn, &args.filter.filter(failed_jobs::MAX_LIST_LIMIT))
            .context("cannot list failed jobs")?
            .into_iter()
            .map(|job| job.id)
            .collect();
        Selection::Ids(ids)
    } else {
        let filter = args.filter.filter(failed_jobs::MAX_LIST_LIMIT);
        let mut conn = pool.get().context("cannot open the outbox database")?;
        let matching = failed_jobs::count(&mut conn, &filter).context("cannot count failed jobs")?;
        Selection::Matching(filter, usize::try_from(matching).unwrap_or(usize::MAX))
    };
    let total = match &selection {
        Selection::Ids(ids) => ids.len(),
        Selection::Matching(_, count) => *count,
    };
    if total == 0 {
        println!("no failed jobs match; nothing retried");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shown = outbox::redact_url(&args.amqp_url);
        let connection = outbox::amqp::connect(&args.amqp_url, "outbox failed retry")
            .await
            .with_context(|| format!("cannot reach the broker at {shown}; nothing retried"))?;
        let channel = outbox::amqp::open_channel(&connection, true).await?;
        // Many jobs on a terminal: a progress bar instead of a line each
        // (indicatif draws nothing when stderr is not a terminal).
        let bar = if total >= PROGRESS_BAR_FROM {
            indicatif::ProgressBar::new(total as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "retrying {bar:40} {pos}/{len} {elapsed} (eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        // Each aggregate's jobs go out oldest event first, whatever the
        // order of the ids (outbox::failed_jobs, "Order").
        let mut report = |step: RetryProgress<'_>| {
            match step {
                RetryProgress::Retried(job) => {
                    if bar.is_hidden() {
                        println!(
                            "retried failed job {} ({}) to {}",
                            job.id, job.listener, job.queue
                        );
                    }
                }
                RetryProgress::Missing(id) => {
                    bar.suspend(|| eprintln!("error: no failed job with id {id}"));
                }
                RetryProgress::Kept { id, reason } => {
                    bar.suspend(|| eprintln!("error: failed job {id} not retried (it is kept): {reason}"));
                }
            }
            bar.inc(1);
        };
        let outcome = match &selection {
            Selection::Ids(ids) => {
                failed_jobs::retry_many_with(&pool, &channel, ids, args.confirm_timeout, &mut report).await
            }
            Selection::Matching(filter, _) => {
                failed_jobs::retry_matching_with(&pool, &channel, filter, args.confirm_timeout, &mut report)
                    .await
            }
        };
        bar.finish_and_clear();
        let _ = connection.close(200, "done".into()).await;
        let outcome = outcome.context("cannot retry failed jobs")?;
        let asked = outcome.retried.len() + outcome.kept.len() + outcome.missing.len();
        println!("retried {} of {asked} failed job(s)", outcome.retried.len());
        let mut failures: Vec<i64> = outcome.kept.iter().map(|(id, _)| *id).collect();
        failures.extend(&outcome.missing);
        if failures.is_empty() {
            Ok(())
        } else {
            let names: Vec<String> = failures.iter().map(ToString::to_string).collect();
            bail!(
                "{} failed job(s) not retried: {}",
                failures.len(),
                names.join(", ")
            )
        }
    })
}

/// The jobs `outbox failed retry` takes.
enum Selection {
    /// Named ids (or the newest `--limit` matches).
    Ids(Vec<i64>),
    /// Every job the filter matches, and how many matched when counted.
    Matching(Filter, usize),
}
