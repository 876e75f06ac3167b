//! `outbox bench consume`: messages handled per second by an
//! `outbox::Worker` running in a process of its own, next to a raw lapin
//! consume-and-ack of the same queue in the same run.
//!
//! For each listener the scenario fills the listener's own queue (declared
//! as the worker declares it: a durable quorum queue) with N `site.created`
//! CloudEvents as the relay publishes them, drains it with a bare lapin
//! consumer that only acks (the ceiling broker and client allow), fills it
//! again and starts `outbox-bench worker-process` (this binary) running the
//! listener, which reports its rate on stdout. Both use the same prefetch.
//! Listeners:
//!
//! - `noop`: does nothing, without the inbox (decode, blocking-pool hop,
//!   ack: the framework's own cost);
//! - `noop-inbox`: does nothing, in the inbox transaction (BEGIN, inbox
//!   INSERT, COMMIT);
//! - `record-audit-log`: CHOM's RecordAuditLog (inbox + one audit row).
//!
//! It also measures handling latency at a steady rate (`--latency-rate`),
//! from the worker process's own duration samples.
//!
//! Why one file of over 600 lines: it is one scenario whose parts (the
//! fill, the raw drain, the worker process and its report, the latency
//! run) share its argument and result types and are read together.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use diesel::prelude::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use outbox::cloudevents::{EventRef, amqp_properties, encode_body};
use outbox::{
    HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent, Registry, Worker,
    WorkerConfig,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::broker::BrokerCleanup;
use super::process::RelayProcess;
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// The no-op target: worker rate over raw rate.
pub const NOOP_TARGET_RATIO: f64 = 0.8;

/// The listeners the scenario can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// Does nothing, no inbox.
    Noop,
    /// Does nothing, in the inbox transaction.
    NoopInbox,
    /// CHOM's RecordAuditLog (inbox + one audit row).
    RecordAuditLog,
}

impl ListenerKind {
    fn name(self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::NoopInbox => "noop_inbox",
            Self::RecordAuditLog => "record_audit_log",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::NoopInbox => "noop-inbox",
            Self::RecordAuditLog => "record-audit-log",
        }
    }
}

/// Options of `outbox bench consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Messages per run (each listener: one raw run, one worker run).
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// The worker's concurrency per listener.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Prefetch of both consumers (default: the listener default, 128).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Listeners to measure, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "noop,noop-inbox,record-audit-log"
    )]
    listeners: Vec<ListenerKind>,
    /// Deliveries per batched inbox transaction (1 turns batching off).
    #[arg(long, default_value_t = ListenerOptions::default().batch_size)]
    batch_size: usize,
    /// Also measure handling latency with the no-op inbox listener at this
    /// steady rate (messages/s; 0 skips it).
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// How long the latency run publishes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    latency_duration: Duration,
    /// Give up on a run after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

/// Options of the hidden `outbox-bench worker-process`.
#[derive(Debug, clap::Args)]
pub struct WorkerProcessArgs {
    /// The scenario's exchange.
    #[arg(long)]
    exchange: String,
    /// The queue-name prefix.
    #[arg(long)]
    app: String,
    /// The listener to run.
    #[arg(long, value_enum)]
    listener: ListenerKind,
    /// Report after this many messages were handled.
    #[arg(long)]
    messages: u64,
    /// The listener's concurrency.
    #[arg(long)]
    concurrency: usize,
    /// The listener's prefetch.
    #[arg(long)]
    prefetch: u16,
    /// The listener's batch size.
    #[arg(long, default_value_t = ListenerOptions::default().batch_size)]
    batch_size: usize,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One listener's figures.
#[derive(Debug, Serialize)]
pub struct ConsumeRow {
    /// The listener.
    pub listener: ListenerKind,
    /// Raw lapin consume-and-ack, messages/s.
    pub raw_per_second: f64,
    /// The worker process, messages/s (first to last handled).
    pub worker_per_second: f64,
    /// worker / raw.
    pub ratio: f64,
    /// Peak resident memory of the worker process, MiB.
    pub worker_peak_rss_mib: f64,
}

/// Handling latency at a steady rate.
#[derive(Debug, Serialize)]
pub struct ConsumeLatency {
    /// The listener measured.
    pub listener: ListenerKind,
    /// Messages published per second.
    pub rate: u32,
    /// Messages measured.
    pub messages: u64,
    /// Delivered to the worker until its outcome is committed and the ack
    /// goes out (the worker's `outbox_listener_duration_seconds`: batch
    /// wait, handler, commit), median, ms.
    pub p50_ms: f64,
    /// The same, 99th percentile, ms.
    pub p99_ms: f64,
}

/// The consume figures.
#[derive(Debug, Serialize)]
pub struct ConsumeReport {
    /// Messages per run.
    pub messages: usize,
    /// Prefetch of both consumers.
    pub prefetch: u16,
    /// Worker concurrency.
    pub concurrency: usize,
    /// Deliveries per batched inbox transaction.
    pub batch_size: usize,
    /// Handling latency at a steady rate (absent when skipped).
    pub latency: Option<ConsumeLatency>,
    /// Target ratio for the no-op listener.
    pub noop_target_ratio: f64,
    /// Whether the no-op ratio meets it (absent when no-op was not run).
    pub noop_target_met: Option<bool>,
    /// One row per listener.
    pub rows: Vec<ConsumeRow>,
}

impl Report for ConsumeReport {
    fn table(&self) -> String {
        let mut out = format!(
            "consume: {} site.created messages per run, quorum queue, prefetch {}, worker concurrency {}, batch size {} (separate process)\n",
            self.messages, self.prefetch, self.concurrency, self.batch_size
        );
        out.push_str(&format!(
            "{:<18} {:>16} {:>14} {:>8} {:>18}\n",
            "listener", "raw lapin msg/s", "worker msg/s", "ratio", "worker RSS (MiB)"
        ));
        for row in &self.rows {
            out.push_str(&format!(
                "{:<18} {:>16.0} {:>14.0} {:>8.2} {:>18.1}\n",
                row.listener.name(),
                row.raw_per_second,
                row.worker_per_second,
                row.ratio,
                row.worker_peak_rss_mib
            ));
        }
        if let Some(latency) = &self.latency {
            out.push_str(&format!(
                "handling latency, {} at a steady {}/s ({} messages; delivered -> committed, before the ack): p50 {:.2} ms, p99 {:.2} ms\n",
                latency.listener.name(),
                latency.rate,
                latency.messages,
                latency.p50_ms,
                latency.p99_ms
            ));
        }
        if let Some(met) = self.noop_target_met {
            out.push_str(&format!(
                "target: no-op ratio >= {:.2}: {}\n",
                self.noop_target_ratio,
                if met { "met" } else { "not met" }
            ));
        }
        out
    }
}

/// First and last handling time and a count, shared with a listener.
#[derive(Default)]
struct Clock {
    handled: AtomicU64,
    window: Mutex<Option<(Instant, Instant)>>,
}

impl Clock {
    fn tick(&self) {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let first = window.map_or(now, |(first, _)| first);
        *window = Some((first, now));
        self.handled.fetch_add(1, Ordering::SeqCst);
    }

    fn handled(&self) -> u64 {
        self.handled.load(Ordering::SeqCst)
    }

    /// Messages per second from the first to the last handled one.
    fn rate(&self) -> f64 {
        let n = self.handled() as f64;
        let window = *self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.map_or(0.0, |(first, last)| {
            (n - 1.0).max(1.0) / (last - first).as_secs_f64().max(1e-9)
        })
    }
}

/// Wraps a listener, ticking the clock after each successful handling.
struct Timed<L> {
    inner: L,
    name: &'static str,
    clock: Arc<Clock>,
}

impl<L: QueuedListener> QueuedListener for Timed<L> {
    fn name(&self) -> &str {
        self.name
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        self.inner.handle(event, ctx)?;
        self.clock.tick();
        Ok(())
    }
}

struct Noop;

impl QueuedListener for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    fn handle(&self, _event: &ReceivedEvent, _ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        Ok(())
    }
}

/// The registry with `kind` as its only queued listener.
fn registry(
    kind: ListenerKind,
    concurrency: usize,
    prefetch: u16,
    batch_size: usize,
    clock: Arc<Clock>,
) -> anyhow::Result<Registry> {
    let options = ListenerOptions {
        inbox: kind != ListenerKind::Noop,
        concurrency,
        prefetch,
        batch_size,
        ..ListenerOptions::default()
    };
    let name = kind.name();
    let registry = match kind {
        ListenerKind::Noop | ListenerKind::NoopInbox => Registry::new().queued_listener_with(
            &["site.created"],
            Timed {
                inner: Noop,
                name,
                clock,
            },
            options,
        ),
        ListenerKind::RecordAuditLog => Registry::new().queued_listener_with(
            &["site.created"],
            Timed {
                inner: chom::listeners::RecordAuditLog,
                name,
                clock,
            },
            options,
        ),
    };
    registry.context("cannot register the bench listener")
}

/// What the worker process prints on stdout (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
struct WorkerResult {
    handled: u64,
    per_second: f64,
    /// Handling durations (`outbox_listener_duration_seconds`), ms.
    p50_ms: f64,
    p99_ms: f64,
}

/// A metrics recorder that keeps every handling duration the worker
/// records, for exact percentiles.
struct DurationCapture {
    samples: Arc<Mutex<Vec<f64>>>,
}

struct Samples(Arc<Mutex<Vec<f64>>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(value);
    }
}

impl metrics::Recorder for DurationCapture {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        if key.name() == outbox::metrics::LISTENER_DURATION_SECONDS {
            metrics::Histogram::from_arc(Arc::new(Samples(Arc::clone(&self.samples))))
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// The `p`-th percentile of `samples` (seconds), in ms.
fn percentile_ms(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index.min(samples.len() - 1)] * 1000.0
}

/// `outbox-bench worker-process`: runs one listener until it handled
/// `--messages`, prints its rate as one JSON line, then keeps running
/// (so the parent can read its memory) until SIGTERM.
pub async fn worker_process(
    database_url: &str,
    amqp_url: &str,
    args: &WorkerProcessArgs,
) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let clock = Arc::new(Clock::default());
    let samples = Arc::new(Mutex::new(Vec::new()));
    metrics::set_global_recorder(DurationCapture {
        samples: Arc::clone(&samples),
    })
    .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    let registry = registry(
        args.listener,
        args.concurrency,
        args.prefetch,
        args.batch_size,
        Arc::clone(&clock),
    )?;
    let worker = Worker::new(
        WorkerConfig {
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            exchange: args.exchange.clone(),
            app: args.app.clone(),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .context("cannot configure the worker")?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut task = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });
    let deadline = Instant::now() + args.timeout;
    while clock.handled() < args.messages {
        if task.is_finished() {
            (&mut task).await.context("the worker task failed")??;
            anyhow::bail!("the worker stopped before handling {} messages", args.messages);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "handled {} of {} messages within {:?}",
            clock.handled(),
            args.messages,
            args.timeout
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut durations = samples.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let result = WorkerResult {
        handled: clock.handled(),
        per_second: clock.rate(),
        p50_ms: percentile_ms(&mut durations, 0.5),
        p99_ms: percentile_ms(&mut durations, 0.99),
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&result)?).context("cannot write the result")?;
    stdout.flush().context("cannot write the result")?;
    drop(stdout);
    tokio::select! {
        _ = terminate.recv() => {}
        () = tokio::time::sleep(args.timeout) => {}
    }
    let _ = stop_tx.send(true);
    task.await.context("the worker task failed")??;
    Ok(())
}

/// Publishes `n` site.created events straight to `queue`, confirmed.
async fn fill(channel: &Channel, queue: &str, n: usize) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for i in 0..n {
        let payload = format!(r#"{{"site_id":{i},"tenant_id":1,"domain":"site-{i}.bench.chom.test"}}"#);
        let aggregate = i.to_string();
        let event = EventRef {
            event_id: Uuid::now_v7(),
            event_type: "site.created",
            aggregate_type: "site",
            aggregate_id: &aggregate,
            tenant_id: Some("1"),
            occurred_at: Utc::now(),
            actor: Some("user:1"),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            schema_version: 1,
            payload_json: &payload,
        };
        let body = encode_body(&event, "/chom")?;
        let properties = amqp_properties(&event, "outbox-bench")?;
        pending.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .context("cannot publish to the listener queue")?,
        );
        if pending.len() >= 500 {
            for confirm in pending.drain(..) {
                anyhow::ensure!(confirm.await?.is_ack(), "a fill message was nacked");
            }
        }
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "a fill message was nacked");
    }
    Ok(())
}

/// Drains `n` messages from `queue` with a bare consumer that acks each;
/// returns messages per second from first delivery to last ack.
async fn raw_drain(connection: &Connection, queue: &str, n: usize, prefetch: u16) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot consume the listener queue")?;
    let mut first = None;
    for _ in 0..n {
        let delivery = consumer
            .next()
            .await
            .context("the raw consumer was cancelled")?
            .context("the raw consumer failed")?;
        first.get_or_insert_with(Instant::now);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let elapsed = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
    channel
        .basic_cancel("raw".into(), BasicCancelOptions::default())
        .await?;
    let _ = channel.close(200, "drained".into()).await;
    Ok((n as f64 - 1.0).max(1.0) / elapsed.max(1e-9))
}

/// Starts the worker process for one listener; it reports once it handled
/// `messages`.
fn spawn_worker(
    target: &BenchTarget,
    db_url: &str,
    names: (&str, &str),
    kind: ListenerKind,
    messages: u64,
    args: &ConsumeArgs,
    prefetch: u16,
) -> anyhow::Result<RelayProcess> {
    let (exchange, app) = names;
    let (messages, concurrency, prefetch_arg, batch_size, timeout) = (
        messages.to_string(),
        args.concurrency.to_string(),
        prefetch.to_string(),
        args.batch_size.to_string(),
        humantime::format_duration(args.timeout).to_string(),
    );
    RelayProcess::spawn_bench(
        &[
            "worker-process",
            "--exchange",
            exchange,
            "--app",
            app,
            "--listener",
            kind.arg(),
            "--messages",
            &messages,
            "--concurrency",
            &concurrency,
            "--prefetch",
            &prefetch_arg,
            "--batch-size",
            &batch_size,
            "--timeout",
            &timeout,
        ],
        db_url,
        &target.amqp_url,
    )
}

/// Reads the worker process's result line, then stops it; returns the
/// result and its peak RSS (MiB).
async fn finish_worker(
    mut worker: RelayProcess,
    messages: u64,
    timeout: Duration,
) -> anyhow::Result<(WorkerResult, f64)> {
    let stdout = worker.take_stdout().context("the worker process has no stdout")?;
    // The child gives up after --timeout itself and then closes stdout.
    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the worker's result")?;
        Ok(line)
    });
    let line = tokio::time::timeout(timeout + Duration::from_secs(30), read)
        .await
        .context("the worker process did not report in time")?
        .context("the reader task failed")??;
    let result: WorkerResult = serde_json::from_str(line.trim())
        .with_context(|| format!("the worker process gave no result (got {:?})", line.trim()))?;
    anyhow::ensure!(
        result.handled >= messages,
        "the worker handled {} messages",
        result.handled
    );
    let peak = tokio::task::spawn_blocking(move || worker.stop())
        .await
        .context("the stop task failed")??;
    Ok((result, peak))
}

/// Publishes `total` messages to `queue` at a steady `rate` per second
/// (paced every millisecond), confirmed.
async fn publish_steadily(channel: &Channel, queue: &str, rate: u32, total: u64) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
        if due > sent {
            fill(channel, queue, usize::try_from(due - sent)?).await?;
            sent = due;
        }
    }
    Ok(())
}

/// Declares `kind`'s queues as its worker would (remembered for clean-up);
/// returns the listener's queue.
async fn declare_queues(
    publisher: &Channel,
    names: (&str, &str),
    kind: ListenerKind,
    args: &ConsumeArgs,
    prefetch: u16,
    cleanup: &mut BrokerCleanup,
) -> anyhow::Result<String> {
    let (exchange, app) = names;
    let registry = registry(
        kind,
        args.concurrency,
        prefetch,
        args.batch_size,
        Arc::new(Clock::default()),
    )?;
    let plan = outbox::consumer::topology::plan(app, &registry)?;
    for queues in &plan {
        cleanup
            .queues
            .extend(queues.all_queues().into_iter().map(str::to_owned));
    }
    outbox::consumer::topology::declare(publisher, exchange, app, &registry).await?;
    plan.first()
        .map(|queues| queues.queue.clone())
        .context("no queue planned for the listener")
}

/// Waits until `queue` has a consumer (the worker process attached).
async fn wait_for_consumer(channel: &Channel, queue: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..lapin::options::QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot look at the listener queue")?;
        if declared.consumer_count() > 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker never consumed {queue}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn audit_rows(url: &str) -> anyhow::Result<i64> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = outbox::connect(url)?;
    Ok(diesel::sql_query("SELECT count(*) AS n FROM audit_logs")
        .get_result::<Count>(&mut conn)?
        .n)
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &ConsumeArgs) -> anyhow::Result<ConsumeReport> {
    anyhow::ensure!(
        (2..=10_000_000).contains(&args.messages),
        "--messages must be between 2 and 10000000"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.concurrency),
        "--concurrency must be between 1 and 256"
    );
    let prefetch = match args.prefetch {
        Some(prefetch) => prefetch,
        None => ListenerOptions::default()
            .prefetch
            .max(u16::try_from(args.concurrency)?),
    };
    anyhow::ensure!(prefetch >= 1, "--prefetch must be positive");
    let db = scratch_database(&target.database_url, true).await?;
    let id = Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_bench.{id}");
    let app = format!("outbox_bench.c{}", &id[20..]);
    let mut cleanup = BrokerCleanup {
        amqp_url: target.amqp_url.clone(),
        exchange: exchange.clone(),
        queues: Vec::new(),
    };
    let outcome = async {
        let connection = outbox::amqp::connect(&target.amqp_url, "outbox bench consume").await?;
        let publisher = connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut rows = Vec::new();
        for &kind in &args.listeners {
            let queue =
                declare_queues(&publisher, (&exchange, &app), kind, args, prefetch, &mut cleanup).await?;
            fill(&publisher, &queue, args.messages).await?;
            let raw = tokio::time::timeout(
                args.timeout,
                raw_drain(&connection, &queue, args.messages, prefetch),
            )
            .await
            .context("the raw consumer did not finish in time")??;
            fill(&publisher, &queue, args.messages).await?;
            let messages = args.messages as u64;
            let worker = spawn_worker(
                target,
                db.url(),
                (&exchange, &app),
                kind,
                messages,
                args,
                prefetch,
            )?;
            let (result, rss) = finish_worker(worker, messages, args.timeout).await?;
            rows.push(ConsumeRow {
                listener: kind,
                raw_per_second: raw,
                worker_per_second: result.per_second,
                ratio: result.per_second / raw,
                worker_peak_rss_mib: rss,
            });
        }
        let mut latency = None;
        if args.latency_rate > 0 {
            let kind = ListenerKind::NoopInbox;
            let latency_app = format!("{app}.latency");
            let queue = declare_queues(
                &publisher,
                (&exchange, &latency_app),
                kind,
                args,
                prefetch,
                &mut cleanup,
            )
            .await?;
            let total = (f64::from(args.latency_rate) * args.latency_duration.as_secs_f64()).max(1.0) as u64;
            let worker = spawn_worker(
                target,
                db.url(),
                (&exchange, &latency_app),
                kind,
                total,
                args,
                prefetch,
            )?;
            wait_for_consumer(&publisher, &queue, Duration::from_secs(60)).await?;
            publish_steadily(&publisher, &queue, args.latency_rate, total).await?;
            let (result, _) = finish_worker(worker, total, args.timeout).await?;
            latency = Some(ConsumeLatency {
                listener: kind,
                rate: args.latency_rate,
                messages: total,
                p50_ms: result.p50_ms,
                p99_ms: result.p99_ms,
            });
        }
        if args.listeners.contains(&ListenerKind::RecordAuditLog) {
            let url = db.url().to_owned();
            let written = tokio::task::spawn_blocking(move || audit_rows(&url)).await??;
            anyhow::ensure!(
                written >= args.messages as i64,
                "RecordAuditLog wrote {written} audit rows for {} messages",
                args.messages
            );
        }
        let _ = connection.close(200, "done".into()).await;
        anyhow::Ok((rows, latency))
    }
    .await;
    drop(cleanup);
    drop_database(db).await?;
    let (rows, latency) = outcome?;
    let noop_target_met = rows
        .iter()
        .find(|row| row.listener == ListenerKind::Noop)
        .map(|row| row.ratio >= NOOP_TARGET_RATIO);
    Ok(ConsumeReport {
        messages: args.messages,
        prefetch,
        concurrency: args.concurrency,
        batch_size: args.batch_size,
        latency,
        noop_target_ratio: NOOP_TARGET_RATIO,
        noop_target_met,
        rows,
    })
}
