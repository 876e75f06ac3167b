//! `outbox replay`: send stored (published, still retained) events again
//! to one listener's queue.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use outbox::replay::{self, ReplayFilter};

use crate::duration::{parse_duration, parse_time};
use crate::failed_cmd::table;

/// Options of `outbox replay`.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("what")
        .required(true)
        .multiple(true)
        .args(["event_type", "aggregate", "aggregate_type", "since", "until"])
))]
pub struct ReplayArgs {
    /// Only events of this type (e.g. site.created).
    #[arg(long)]
    event_type: Option<String>,
    /// Only events of this aggregate id (e.g. the site's id).
    #[arg(long)]
    aggregate: Option<String>,
    /// Only events of this aggregate kind (e.g. site).
    #[arg(long)]
    aggregate_type: Option<String>,
    /// Only events recorded at or after this time: RFC 3339 or a duration ago (2h).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only events recorded before this time: RFC 3339 or a duration ago (30m).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// The listener to send them to (its queue is `<app>.<listener>`).
    #[arg(long)]
    to_listener: String,
    /// The application prefix of the listener's queue.
    #[arg(long)]
    app: String,
    /// Print how many and which events would be sent, and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many events.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..=replay::MAX_REPLAY_LIMIT))]
    limit: i64,
    /// CloudEvents `source` attribute, as the relay was configured.
    #[arg(
        long,
        env = "OUTBOX_SOURCE",
        default_value = "/outbox",
        hide_env_values = true
    )]
    source: String,
    /// Start of each event's CloudEvents `dataschema` URI, as the relay was configured (its --dataschema-base) [default: urn:outbox:schema:<event type>:v<version>].
    #[arg(long, env = outbox::contract::DATASCHEMA_BASE_ENV, hide_env_values = true)]
    dataschema_base: Option<String>,
    /// RabbitMQ URL (amqp:// or amqps://); several, comma separated, for the nodes of a cluster (the first that answers is used).
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// How long to wait for the broker's confirm of each event.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    confirm_timeout: Duration,
}

/// Replays the selected events, or lists them with --dry-run.
pub fn run(database_url: &str, args: &ReplayArgs) -> anyhow::Result<()> {
    outbox::amqp::validate_amqp_name("app", &args.app)?;
    outbox::amqp::validate_amqp_name("listener", &args.to_listener)?;
    let queue = format!("{}.{}", args.app, args.to_listener);
    let mut conn = outbox::connect(database_url).context("cannot open the outbox database")?;
    let filter = ReplayFilter {
        event_type: args.event_type.clone(),
        aggregate_type: args.aggregate_type.clone(),
        aggregate_id: args.aggregate.clone(),
        since: args.since,
        until: args.until,
        limit: args.limit,
    };
    let events = replay::select(&mut conn, &filter).context("cannot read stored events")?;
    drop(conn);
    if args.dry_run {
        println!(
            "dry run: would replay {} event(s) to {queue} (nothing sent)",
            events.len()
        );
        let rows: Vec<[String; 4]> = events
            .iter()
            .map(|e| {
                [
                    e.event_id.to_string(),
                    e.event_type.clone(),
                    format!("{}:{}", e.aggregate_type, e.aggregate_id),
                    e.recorded_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                ]
            })
            .collect();
        if !rows.is_empty() {
            print!(
                "{}",
                table(&["EVENT ID", "TYPE", "AGGREGATE", "RECORDED AT"], &rows)
            );
        }
        return Ok(());
    }
    if events.is_empty() {
        println!("no stored published events match; nothing replayed");
        return Ok(());
    }
    outbox::amqp::validate_amqp_url(&args.amqp_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shown = outbox::redact_url(&args.amqp_url);
        let connection = outbox::amqp::connect(&args.amqp_url, "outbox replay")
            .await
            .with_context(|| format!("cannot reach the broker at {shown}; nothing replayed"))?;
        if outbox::amqp::queue_depth(&connection, &queue).await?.is_none() {
            anyhow::bail!(
                "queue {queue} does not exist at {shown} (are --app and --to-listener right?); nothing replayed"
            );
        }
        let channel = outbox::amqp::open_channel(&connection, true).await?;
        let sent = replay::publish_to_queue(
            &channel,
            &queue,
            &events,
            &args.source,
            args.dataschema_base.as_deref(),
            "outbox-replay",
            args.confirm_timeout,
        )
        .await
        .with_context(|| format!("replay to {queue} stopped"))?;
        let _ = connection.close(200, "done".into()).await;
        println!("replayed {sent} event(s) to {queue}");
        Ok(())
    })
}
