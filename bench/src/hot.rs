//! `outbox bench hot`: few aggregates with many events each, where
//! per-aggregate order is the limit: an aggregate's next event may only go
//! out after the broker confirmed the previous one.
//!
//! The raw baseline keeps the same rule (at most one unconfirmed message
//! per aggregate) with pre-encoded bodies on one channel, so the ratio
//! shows what the relay's own loop (claims, marks, hand-offs) adds to each
//! confirm round trip.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde::Serialize;

use super::broker::BenchQueue;
use super::drain::{EncodedEvent, blocking, encoded_backlog, fill_backlog, relay_drain};
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench hot`.
#[derive(Debug, clap::Args)]
pub struct HotArgs {
    /// Events in each backlog.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Aggregate counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    aggregates: Vec<usize>,
    /// Give up on a run after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One aggregate count.
#[derive(Debug, Serialize)]
pub struct HotRun {
    /// Aggregates the events are spread over.
    pub aggregates: usize,
    /// Raw publisher keeping one unconfirmed message per aggregate, events/s.
    pub raw_events_per_second: f64,
    /// One relay, events/s.
    pub relay_events_per_second: f64,
    /// relay / raw.
    pub ratio_to_raw: f64,
    /// Peak resident memory of the relay, MiB.
    pub relay_peak_rss_mib: f64,
}

/// The hot-aggregate figures.
#[derive(Debug, Serialize)]
pub struct HotReport {
    /// Events per backlog.
    pub events: usize,
    /// One entry per aggregate count.
    pub runs: Vec<HotRun>,
}

impl Report for HotReport {
    fn table(&self) -> String {
        let mut out = format!(
            "hot aggregates: {} events each run, one relay, raw publisher held to one unconfirmed message per aggregate\n",
            self.events
        );
        out.push_str(&format!(
            "{:<12} {:>16} {:>16} {:>8} {:>16}\n",
            "aggregates", "raw events/s", "relay events/s", "ratio", "relay RSS (MiB)"
        ));
        for run in &self.runs {
            out.push_str(&format!(
                "{:<12} {:>16.0} {:>16.0} {:>8.2} {:>16.1}\n",
                run.aggregates,
                run.raw_events_per_second,
                run.relay_events_per_second,
                run.ratio_to_raw,
                run.relay_peak_rss_mib
            ));
        }
        out
    }
}

/// Publishes the stored events keeping the relay's order rule: each
/// aggregate's next message only after its previous one was confirmed.
/// Returns events/s.
async fn raw_publish_in_aggregate_order(queue: &BenchQueue, url: String) -> anyhow::Result<f64> {
    let messages = encoded_backlog(url).await?;
    let total = messages.len();
    let mut by_aggregate: HashMap<String, VecDeque<EncodedEvent>> = HashMap::new();
    for message in messages {
        by_aggregate
            .entry(message.aggregate.clone())
            .or_default()
            .push_back(message);
    }
    let connection = queue.connect("outbox bench raw ordered publisher").await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let publish = |message: EncodedEvent| {
        let channel = channel.clone();
        let exchange = queue.exchange.clone();
        async move {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    message.properties,
                )
                .await
        }
    };
    let started = Instant::now();
    type Confirmed = (String, lapin::Result<lapin::Confirmation>);
    let mut in_flight: FuturesUnordered<
        std::pin::Pin<Box<dyn std::future::Future<Output = Confirmed> + Send>>,
    > = FuturesUnordered::new();
    let keys: Vec<String> = by_aggregate.keys().cloned().collect();
    for key in keys {
        if let Some(message) = by_aggregate.get_mut(&key).and_then(VecDeque::pop_front) {
            let confirm = publish(message).await?;
            in_flight.push(Box::pin(async move { (key, confirm.await) }));
        }
    }
    let mut confirmed = 0usize;
    while let Some((key, outcome)) = in_flight.next().await {
        anyhow::ensure!(lapin::Confirmation::is_ack(&outcome?), "raw publish was nacked");
        confirmed += 1;
        if let Some(message) = by_aggregate.get_mut(&key).and_then(VecDeque::pop_front) {
            let confirm = publish(message).await?;
            in_flight.push(Box::pin(async move { (key, confirm.await) }));
        }
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(confirmed == total, "confirmed {confirmed} of {total}");
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &HotArgs) -> anyhow::Result<HotReport> {
    anyhow::ensure!(args.events > 0, "--events must be positive");
    anyhow::ensure!(
        args.aggregates.iter().all(|a| *a > 0),
        "--aggregates takes positive counts"
    );
    let mut runs = Vec::new();
    for &aggregates in &args.aggregates {
        let db = scratch_database(&target.database_url, false).await?;
        let outcome = measure(target, args, aggregates, &db).await;
        drop_database(db).await?;
        runs.push(outcome?);
    }
    Ok(HotReport {
        events: args.events,
        runs,
    })
}

async fn measure(
    target: &BenchTarget,
    args: &HotArgs,
    aggregates: usize,
    db: &outbox::testing::TestDatabase,
) -> anyhow::Result<HotRun> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;
    let (url, events) = (db.url().to_owned(), args.events);
    blocking(move || fill_backlog(&url, events, aggregates)).await?;
    let raw = raw_publish_in_aggregate_order(&queue, db.url().to_owned()).await?;
    queue.purge().await?;
    let (url, events) = (db.url().to_owned(), args.events);
    blocking(move || fill_backlog(&url, events, aggregates)).await?;
    let (seconds, rss, _) = relay_drain(target, db, &queue, 1, &[], args.events, args.timeout).await?;
    queue.purge().await?;
    let relay = args.events as f64 / seconds;
    Ok(HotRun {
        aggregates,
        raw_events_per_second: raw,
        relay_events_per_second: relay,
        ratio_to_raw: relay / raw,
        relay_peak_rss_mib: rss.first().copied().unwrap_or(0.0),
    })
}
