//! `outbox bench drain`: a backlog from the table to broker-confirmed.

use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::prelude::*;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use outbox::relay::ClaimedEvent;
use outbox::testing::TestDatabase;
use serde::Serialize;

use super::broker::BenchQueue;
use super::process::RelayProcess;
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench drain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Events in the backlog.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Aggregates they are spread over (round robin).
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
    /// Relay process counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    relays: Vec<usize>,
    /// The relays' --batch-size.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// The relays' --max-in-flight, and the raw publisher's confirm window.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Give up on a run after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One relay run.
#[derive(Debug, Serialize)]
pub struct DrainRun {
    /// Relay processes.
    pub relays: usize,
    /// Wall time from starting the relays to an empty backlog.
    pub seconds: f64,
    /// Events per second.
    pub events_per_second: f64,
    /// Our rate over the raw publisher's.
    pub ratio_to_raw: f64,
    /// Peak resident memory of each relay process, MiB.
    pub peak_rss_mib: Vec<f64>,
    /// (seconds since start, events published) samples, every 100 ms.
    pub progress: Vec<(f64, u64)>,
}

/// The drain figures.
#[derive(Debug, Serialize)]
pub struct DrainReport {
    /// Backlog size.
    pub events: usize,
    /// Aggregates.
    pub aggregates: usize,
    /// Raw lapin publish-with-confirms of the same bodies, events/s.
    pub raw_events_per_second: f64,
    /// Seconds the raw publish took.
    pub raw_seconds: f64,
    /// (seconds since start, events confirmed) samples of the raw
    /// publisher, about every 100 ms.
    pub raw_progress: Vec<(f64, u64)>,
    /// One entry per relay count.
    pub runs: Vec<DrainRun>,
}

impl Report for DrainReport {
    fn table(&self) -> String {
        let mut out = format!(
            "drain: {} events on {} aggregates, backlog -> broker-confirmed (durable quorum queue)\n",
            self.events, self.aggregates
        );
        out.push_str(&format!(
            "{:<34} {:>10} {:>12} {:>8} {:>16}\n",
            "", "seconds", "events/s", "ratio", "peak RSS (MiB)"
        ));
        out.push_str(&format!(
            "{:<34} {:>10.2} {:>12.0} {:>8} {:>16}\n",
            "raw lapin publish + confirms", self.raw_seconds, self.raw_events_per_second, "1.00", "-"
        ));
        for run in &self.runs {
            let rss: Vec<String> = run.peak_rss_mib.iter().map(|m| format!("{m:.1}")).collect();
            out.push_str(&format!(
                "{:<34} {:>10.2} {:>12.0} {:>8.2} {:>16}\n",
                format!("outbox relay x{}", run.relays),
                run.seconds,
                run.events_per_second,
                run.ratio_to_raw,
                rss.join(", ")
            ));
        }
        out
    }
}

#[derive(Serialize)]
struct SiteCreated {
    site_id: usize,
    tenant_id: usize,
    domain: String,
    plan: &'static str,
}

impl outbox::DomainEvent for SiteCreated {
    fn event_type(&self) -> &'static str {
        "site.created"
    }
    fn aggregate_type(&self) -> &'static str {
        "site"
    }
    fn aggregate_id(&self) -> String {
        self.site_id.to_string()
    }
    fn tenant_id(&self) -> Option<String> {
        Some(self.tenant_id.to_string())
    }
}

/// Empties the outbox and records `events` events on `aggregates`
/// aggregates, round robin, in large transactions.
pub fn fill_backlog(url: &str, events: usize, aggregates: usize) -> anyhow::Result<()> {
    let mut conn = outbox::connect(url)?;
    diesel::sql_query("TRUNCATE outbox_events").execute(&mut conn)?;
    for chunk_start in (0..events).step_by(5000) {
        let chunk = (events - chunk_start).min(5000);
        conn.transaction::<_, anyhow::Error, _>(|conn| append_backlog(conn, chunk, aggregates))?;
    }
    diesel::sql_query("VACUUM ANALYZE outbox_events").execute(&mut conn)?;
    Ok(())
}

/// Records `events` events on `aggregates` aggregates, round robin, in the
/// caller's transaction.
pub fn append_backlog(conn: &mut PgConnection, events: usize, aggregates: usize) -> anyhow::Result<()> {
    let outbox = outbox::Outbox::new();
    let metadata = outbox::Metadata::by("user:1").correlation_id("bench");
    for chunk_start in (0..events).step_by(5000) {
        let envelopes = (chunk_start..(chunk_start + 5000).min(events))
            .map(|n| {
                let site = n % aggregates.max(1);
                outbox.envelope(
                    &SiteCreated {
                        site_id: site,
                        tenant_id: site % 50,
                        domain: format!("site-{site}.example.com"),
                        plan: "standard",
                    },
                    &metadata,
                )
            })
            .collect::<outbox::Result<Vec<_>>>()?;
        outbox.record_batch(conn, &envelopes)?;
    }
    Ok(())
}

/// Whether no row is left unpublished: an index probe, cheap enough to ask
/// every few milliseconds without taking CPU from the relays measured.
pub fn backlog_is_empty(conn: &mut PgConnection) -> anyhow::Result<bool> {
    #[derive(QueryableByName)]
    struct Empty {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        empty: bool,
    }
    Ok(diesel::sql_query(
        "SELECT NOT EXISTS (SELECT 1 FROM outbox_events WHERE published_at IS NULL) AS empty",
    )
    .get_result::<Empty>(conn)?
    .empty)
}

/// Unpublished rows, counted (a scan of the backlog: tens of milliseconds
/// at 100,000 rows, so progress samples are taken sparingly).
pub fn unpublished(conn: &mut PgConnection) -> anyhow::Result<i64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    Ok(
        diesel::sql_query("SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL")
            .get_result::<Count>(conn)?
            .n,
    )
}

/// Runs blocking `work` on `conn` on the blocking pool and hands the
/// connection back with the result.
pub async fn on_connection<T: Send + 'static>(
    mut conn: PgConnection,
    work: impl FnOnce(&mut PgConnection) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<(PgConnection, T)> {
    let (conn, outcome) = blocking(move || {
        let outcome = work(&mut conn);
        Ok((conn, outcome))
    })
    .await?;
    Ok((conn, outcome?))
}

pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("blocking task failed")?
}

/// Publishes the stored events the way a minimal hand-written publisher
/// would: pre-encoded bodies, one channel, confirms pipelined in a window.
/// Returns (events, time, (seconds, confirmed) samples about every 100 ms).
/// A stored event encoded as the relay would send it.
pub struct EncodedEvent {
    /// Routing key (the event type).
    pub routing_key: String,
    /// The aggregate, for publishers that keep its order.
    pub aggregate: String,
    /// CloudEvents body.
    pub body: Vec<u8>,
    /// AMQP properties.
    pub properties: lapin::BasicProperties,
}

/// Every stored event in seq order, encoded as the relay encodes them, so
/// a raw publisher pays no encoding during its measured run.
pub async fn encoded_backlog(url: String) -> anyhow::Result<Vec<EncodedEvent>> {
    let rows: Vec<ClaimedEvent> = blocking(move || {
        let mut conn = outbox::connect(&url)?;
        Ok(diesel::sql_query(
            "SELECT seq, event_id, event_type, aggregate_type, aggregate_id, tenant_id, occurred_at, recorded_at,
                    actor, correlation_id, causation_id, traceparent, schema_version, payload::text AS payload, attempts,
                    0::bigint AS lease_id
             FROM outbox_events ORDER BY seq",
        )
        .load::<ClaimedEvent>(&mut conn)?)
    })
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let event = row.as_event_ref();
            Ok(EncodedEvent {
                routing_key: row.event_type.clone(),
                aggregate: row.aggregate_id.clone(),
                body: outbox::cloudevents::encode_body(&event, "/outbox")?,
                properties: outbox::cloudevents::amqp_properties(&event, "outbox-bench")?,
            })
        })
        .collect::<outbox::Result<Vec<_>>>()?)
}

async fn raw_publish(
    queue: &BenchQueue,
    url: String,
    window: usize,
) -> anyhow::Result<(usize, Duration, Vec<(f64, u64)>)> {
    let messages = encoded_backlog(url).await?;
    let count = messages.len();
    let connection = queue.connect("outbox bench raw publisher").await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut confirms = FuturesUnordered::new();
    let mut progress = Vec::new();
    let mut sampled = started;
    let mut sent = 0u64;
    for EncodedEvent {
        routing_key,
        body,
        properties,
        ..
    } in messages
    {
        if sampled.elapsed() >= Duration::from_millis(100) {
            sampled = Instant::now();
            progress.push((started.elapsed().as_secs_f64(), sent - confirms.len() as u64));
        }
        if confirms.len() >= window
            && let Some(confirm) = confirms.next().await
        {
            anyhow::ensure!(lapin::Confirmation::is_ack(&confirm?), "raw publish was nacked");
        }
        let confirm = channel
            .basic_publish(
                queue.exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await?;
        confirms.push(confirm);
        sent += 1;
    }
    while let Some(confirm) = confirms.next().await {
        anyhow::ensure!(lapin::Confirmation::is_ack(&confirm?), "raw publish was nacked");
        if sampled.elapsed() >= Duration::from_millis(100) {
            sampled = Instant::now();
            progress.push((started.elapsed().as_secs_f64(), sent - confirms.len() as u64));
        }
    }
    let elapsed = started.elapsed();
    progress.push((elapsed.as_secs_f64(), sent));
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok((count, elapsed, progress))
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &DrainArgs) -> anyhow::Result<DrainReport> {
    anyhow::ensure!(
        args.events > 0 && args.aggregates > 0,
        "--events and --aggregates must be positive"
    );
    anyhow::ensure!(
        args.relays.iter().all(|r| (1..=16).contains(r)),
        "--relays takes counts from 1 to 16"
    );
    let db = scratch_database(&target.database_url, false).await?;
    let outcome = measure(target, args, &db).await;
    drop_database(db).await?;
    outcome
}

/// The scenario in the scratch database `db` (dropped by the caller, also
/// on error).
async fn measure(target: &BenchTarget, args: &DrainArgs, db: &TestDatabase) -> anyhow::Result<DrainReport> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;
    let (url, events, aggregates) = (db.url().to_owned(), args.events, args.aggregates);
    blocking(move || fill_backlog(&url, events, aggregates)).await?;

    let (published, raw_elapsed, raw_progress) =
        raw_publish(&queue, db.url().to_owned(), args.max_in_flight).await?;
    let raw_rate = published as f64 / raw_elapsed.as_secs_f64();
    queue.purge().await?;

    let mut runs = Vec::new();
    for &relays in &args.relays {
        let (url, events, aggregates) = (db.url().to_owned(), args.events, args.aggregates);
        blocking(move || fill_backlog(&url, events, aggregates)).await?;
        let batch = args.batch_size.to_string();
        let in_flight = args.max_in_flight.to_string();
        let (seconds, peak_rss_mib, progress) = relay_drain(
            target,
            db,
            &queue,
            relays,
            &["--batch-size", &batch, "--max-in-flight", &in_flight],
            args.events,
            args.timeout,
        )
        .await?;
        let rate = args.events as f64 / seconds;
        runs.push(DrainRun {
            relays,
            seconds,
            events_per_second: rate,
            ratio_to_raw: rate / raw_rate,
            peak_rss_mib,
            progress,
        });
        queue.purge().await?;
    }
    drop(queue);
    Ok(DrainReport {
        events: args.events,
        aggregates: args.aggregates,
        raw_events_per_second: raw_rate,
        raw_seconds: raw_elapsed.as_secs_f64(),
        raw_progress,
        runs,
    })
}

/// Starts `relays` relay processes with `relay_args` on the backlog of
/// `events` rows in `db` and waits until it is empty. Returns (seconds,
/// each relay's peak RSS in MiB, (seconds, published) samples).
pub async fn relay_drain(
    target: &BenchTarget,
    db: &TestDatabase,
    queue: &BenchQueue,
    relays: usize,
    relay_args: &[&str],
    events: usize,
    timeout: Duration,
) -> anyhow::Result<(f64, Vec<f64>, Vec<(f64, u64)>)> {
    let started = Instant::now();
    let mut processes = (0..relays)
        .map(|_| RelayProcess::spawn(db.url(), &target.amqp_url, &queue.exchange, relay_args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let url = db.url().to_owned();
    let mut conn = blocking(move || Ok(outbox::connect(&url)?)).await?;
    let mut progress = Vec::new();
    let mut last_count = Instant::now();
    let seconds = loop {
        // Emptiness every 20 ms, a count for the progress chart every
        // 500 ms: counting often would take CPU from the relays.
        let count_now = last_count.elapsed() >= Duration::from_millis(500);
        let (back, remaining) = on_connection(conn, move |conn| {
            if count_now {
                unpublished(conn).map(Some)
            } else {
                backlog_is_empty(conn).map(|empty| empty.then_some(0))
            }
        })
        .await?;
        conn = back;
        for process in &mut processes {
            process.sample_memory();
        }
        let elapsed = started.elapsed();
        if let Some(remaining) = remaining {
            last_count = Instant::now();
            progress.push((elapsed.as_secs_f64(), events as u64 - remaining.max(0) as u64));
            if remaining == 0 {
                break elapsed.as_secs_f64();
            }
        }
        anyhow::ensure!(elapsed < timeout, "backlog not drained within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak_rss_mib = processes
        .into_iter()
        .map(RelayProcess::stop)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((seconds, peak_rss_mib, progress))
}
