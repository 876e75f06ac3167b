//! `outbox bench latency`: commit -> delivered at a steady rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use outbox::testing::TestDatabase;
use serde::Serialize;

use super::broker::BenchQueue;
use super::drain::blocking;
use super::pinned::{dead_tuples, hold_snapshot, release_snapshot};
use super::process::RelayProcess;
use super::stats::{ms, percentile};
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench latency`.
#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    /// Events per second, one per transaction, from one writer.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to write.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Leading time left out of the figures.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Aggregates the events are spread over.
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
    /// Writers do not wake the relay and it does not listen (polling only).
    #[arg(long)]
    no_wake_up: bool,
    /// Writer threads sharing the rate, each with its own connection (a
    /// commit waits for its WAL flush, so one writer reaches only about
    /// 1,000 commits/s here). Default: one per 400 events/s.
    #[arg(long)]
    writers: Option<usize>,
    /// Hold a `REPEATABLE READ` snapshot open in the relay's database from
    /// before the first commit to the end (a long transaction elsewhere:
    /// nothing published during the run can be vacuumed away).
    #[arg(long)]
    hold_snapshot: bool,
}

/// The latency figures.
#[derive(Debug, Serialize)]
pub struct LatencyReport {
    /// Target rate, events/s.
    pub target_rate: f64,
    /// Whether commits woke the relay (else it found them by polling).
    pub wake_up: bool,
    /// Writer threads.
    pub writers: usize,
    /// Rate the writer achieved, events/s.
    pub achieved_rate: f64,
    /// Events measured (after the warm-up).
    pub events: usize,
    /// Median commit -> delivered, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// Peak resident memory of the relay process, MiB.
    pub relay_peak_rss_mib: f64,
    /// Whether a snapshot was held open for the whole run.
    pub snapshot_held: bool,
    /// Dead row versions in `outbox_events` at the end of a run with a
    /// snapshot held (0 without one: not read).
    pub dead_tuples: i64,
    /// The broker alone, same rate, same queue: lapin publish -> delivered
    /// to the same consumer, median ms (the floor under `p50_ms`).
    pub raw_p50_ms: f64,
    /// The broker alone, 99th percentile, ms.
    pub raw_p99_ms: f64,
    /// The broker alone, 99.9th percentile, ms.
    pub raw_p999_ms: f64,
    /// The broker alone, worst, ms.
    pub raw_max_ms: f64,
    /// Every measured latency in ms, in commit order (for plots).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
}

impl Report for LatencyReport {
    fn table(&self) -> String {
        format!(
            "latency: {:.0} events/s target ({:.0} achieved by {} writers), one per transaction, {} events measured, {}{}\n\
             {:<44} {:>8} {:>8} {:>8} {:>8} {:>16}\n\
             {:<44} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>16}\n\
             {:<44} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>16.1}\n",
            self.target_rate,
            self.achieved_rate,
            self.writers,
            self.events,
            if self.wake_up {
                "writers wake the relay"
            } else {
                "relay polling only"
            },
            if self.snapshot_held {
                format!(
                    ", a snapshot held open throughout ({} dead tuples at the end)",
                    self.dead_tuples
                )
            } else {
                String::new()
            },
            "",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "relay RSS (MiB)",
            "raw lapin publish -> delivered (broker alone)",
            self.raw_p50_ms,
            self.raw_p99_ms,
            self.raw_p999_ms,
            self.raw_max_ms,
            "-",
            "commit -> delivered through `outbox relay`",
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.relay_peak_rss_mib
        )
    }
}

/// The broker's own share: messages of the probe's size published straight
/// to the exchange at the same rate, each timed from just before its
/// publish to its arrival at the consumer.
async fn measure_raw(
    queue: &BenchQueue,
    arrivals: &Arrivals,
    args: &LatencyArgs,
) -> anyhow::Result<Vec<Duration>> {
    let connection = queue.connect("outbox bench raw publisher").await?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .context("cannot enable publisher confirms")?;
    let total = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let warmup_events = (args.rate * args.warmup.as_secs_f64()).round() as usize;
    let mut sent = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for n in 0..total {
        let slot = started + Duration::from_secs_f64(n as f64 / args.rate);
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let id = uuid::Uuid::now_v7().to_string();
        let body = serde_json::json!({"specversion": "1.0", "id": id, "type": "bench.probe",
            "source": "/outbox", "subject": (n % 1000).to_string(), "data": {"n": n}});
        let published = Instant::now();
        // Confirms are not awaited one by one: the relay's publishes do not
        // wait for each other's either (only per aggregate).
        let _confirm = channel
            .basic_publish(
                queue.exchange.as_str().into(),
                "bench.probe".into(),
                lapin::options::BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                lapin::BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2),
            )
            .await
            .context("raw publish failed")?;
        sent.push((id, published));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arrived = {
            let seen = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
            sent.iter().all(|(id, _)| seen.contains_key(id))
        };
        if arrived {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every raw message arrived within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "done".into()).await;
    let seen = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(sent
        .iter()
        .skip(warmup_events)
        .filter_map(|(id, published)| seen.get(id).map(|at| at.saturating_duration_since(*published)))
        .collect())
}

#[derive(serde::Serialize)]
struct Probe {
    n: u64,
    aggregate: usize,
}

impl outbox::DomainEvent for Probe {
    fn event_type(&self) -> &'static str {
        "bench.probe"
    }
    fn aggregate_type(&self) -> &'static str {
        "probe"
    }
    fn aggregate_id(&self) -> String {
        self.aggregate.to_string()
    }
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    anyhow::ensure!(
        args.rate > 0.0 && args.rate <= 100_000.0,
        "--rate must be between 0 and 100000"
    );
    anyhow::ensure!(args.aggregates > 0, "--aggregates must be positive");
    anyhow::ensure!(
        args.warmup < args.duration,
        "--warmup must be shorter than --duration (nothing would be measured)"
    );
    let db = scratch_database(&target.database_url, false).await?;
    let outcome = measure(target, args, &db).await;
    drop_database(db).await?;
    outcome
}

/// The scenario in the scratch database `db` (dropped by the caller, also
/// on error).
async fn measure(
    target: &BenchTarget,
    args: &LatencyArgs,
    db: &TestDatabase,
) -> anyhow::Result<LatencyReport> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;

    // The consumer notes when each message id first arrives.
    let arrivals: Arrivals = Arc::new(Mutex::new(HashMap::new()));
    let consumer_connection = queue.connect("outbox bench consumer").await?;
    let channel = consumer_connection.create_channel().await?;
    channel.basic_qos(2000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot consume the bench queue")?;
    let sink = Arc::clone(&arrivals);
    let consumer_task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let now = Instant::now();
            if let Some(id) = delivery.properties.message_id() {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(id.to_string())
                    .or_insert(now);
            }
        }
    });

    let mut raw = measure_raw(&queue, &arrivals, args).await?;

    let relay_args: &[&str] = if args.no_wake_up { &["--no-wake-up"] } else { &[] };
    let pin = if args.hold_snapshot {
        Some(hold_snapshot(db.url().to_owned()).await?)
    } else {
        None
    };
    let mut relay = RelayProcess::spawn(db.url(), &target.amqp_url, &queue.exchange, relay_args)?;
    let wake_up = !args.no_wake_up;
    let total = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let warmup_events = (args.rate * args.warmup.as_secs_f64()).round() as u64;
    let (url, rate, aggregates) = (db.url().to_owned(), args.rate, args.aggregates);
    let writers = args
        .writers
        .unwrap_or_else(|| (rate / 400.0).ceil() as usize)
        .clamp(1, 64);
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<(String, Instant)>, f64)> {
        // One Outbox (and so one wake-up sender) for all writers, as in a
        // service.
        let outbox = if wake_up {
            outbox::Outbox::builder().wake_relays(&url).build()?
        } else {
            outbox::Outbox::new()
        };
        let started = Instant::now();
        let threads: Vec<_> = (0..writers as u64)
            .map(|w| {
                let (url, outbox) = (url.clone(), outbox.clone());
                std::thread::spawn(move || -> anyhow::Result<Vec<(String, Instant)>> {
                    let mut conn = outbox::connect(&url)?;
                    let mut commits = Vec::new();
                    // Writer w commits events w, w + writers, ... on the
                    // shared schedule.
                    for n in (w..total).step_by(writers) {
                        let slot = started + Duration::from_secs_f64(n as f64 / rate);
                        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let id = outbox.transaction::<_, outbox::Error, _>(&mut conn, |tx| {
                            tx.record(&Probe {
                                n,
                                aggregate: n as usize % aggregates,
                            })
                        })?;
                        commits.push((id.to_string(), Instant::now()));
                    }
                    Ok(commits)
                })
            })
            .collect();
        let mut commits = Vec::with_capacity(total as usize);
        for thread in threads {
            commits.extend(
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??,
            );
        }
        let achieved = total as f64 / started.elapsed().as_secs_f64();
        // In commit order, for the warm-up cut and the samples.
        commits.sort_by_key(|(_, committed)| *committed);
        Ok((commits, achieved))
    });
    // Sample the relay's memory while the writer runs.
    while !writer.is_finished() {
        relay.sample_memory();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (commits, achieved_rate) = writer.await??;
    let deadline = Instant::now() + Duration::from_secs(60);
    // By id: the map also holds the raw phase's messages, so its size says
    // nothing about the relay's.
    let all_arrived = || {
        let seen = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        commits.iter().all(|(id, _)| seen.contains_key(id))
    };
    while !all_arrived() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every event arrived within 60 s of the last commit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_peak_rss_mib = relay.stop()?;
    // Only a held snapshot makes the figure worth a connection.
    let dead_tuples = match pin {
        Some(pin) => {
            let url = db.url().to_owned();
            let dead = blocking(move || dead_tuples(&mut outbox::connect(&url)?)).await?;
            release_snapshot(pin).await?;
            dead
        }
        None => 0,
    };
    consumer_task.abort();
    let _ = consumer_connection.close(200, "done".into()).await;

    let arrivals = arrivals.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut latencies: Vec<Duration> = commits
        .iter()
        .skip(warmup_events as usize)
        .filter_map(|(id, committed)| {
            arrivals
                .get(id)
                .map(|arrived| arrived.saturating_duration_since(*committed))
        })
        .collect();
    let samples_ms: Vec<f64> = latencies.iter().map(|d| ms(*d)).collect();
    let report = LatencyReport {
        target_rate: args.rate,
        wake_up,
        writers,
        achieved_rate,
        events: latencies.len(),
        p50_ms: ms(percentile(&mut latencies, 0.50)),
        p99_ms: ms(percentile(&mut latencies, 0.99)),
        p999_ms: ms(percentile(&mut latencies, 0.999)),
        max_ms: ms(percentile(&mut latencies, 1.0)),
        relay_peak_rss_mib,
        snapshot_held: args.hold_snapshot,
        dead_tuples,
        raw_p50_ms: ms(percentile(&mut raw, 0.50)),
        raw_p99_ms: ms(percentile(&mut raw, 0.99)),
        raw_p999_ms: ms(percentile(&mut raw, 0.999)),
        raw_max_ms: ms(percentile(&mut raw, 1.0)),
        samples_ms,
    };
    drop(queue);
    Ok(report)
}
