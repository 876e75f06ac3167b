//! Consumer throughput: messages handled per second by the worker, next to
//! a raw lapin consume-and-ack of the same queue in the same run.
//!
//! For each listener the bench fills the listener's own queue with N
//! `site.created` CloudEvents (as the relay publishes them), drains it with
//! a bare lapin consumer that only acks (the ceiling the broker and client
//! allow), fills it again and lets an `outbox::Worker` handle it. Both use
//! the same prefetch. Listeners:
//!
//! - `noop`: does nothing, without the inbox (decode, blocking-pool hop,
//!   ack: the framework's own cost);
//! - `noop_inbox`: does nothing, in the inbox transaction (BEGIN, advisory
//!   lock, inbox INSERT, COMMIT);
//! - `record_audit_log`: CHOM's RecordAuditLog (inbox + one audit row).
//!
//! ```text
//! cargo bench -p chom --bench consume             # 5,000 messages per run
//! CONSUME_BENCH_MESSAGES=20000 CONSUME_BENCH_CONCURRENCY=8 cargo bench -p chom --bench consume
//! ```
//!
//! Measured on the 2-core development VM (PostgreSQL 15, RabbitMQ 3.10.8,
//! both local, `synchronous_commit = on`), 10,000 messages per run,
//! prefetch 16, concurrency 4, release build; runs vary by about +-30% with
//! other load on the machine:
//!
//! ```text
//! listener            raw lapin msg/s     worker msg/s    ratio
//! noop                           7416             7982     1.08
//! noop_inbox                     7840             1664     0.21
//! record_audit_log               5278             1283     0.24
//! ```
//!
//! The raw consumer awaits each ack before taking the next message; the
//! worker acks from concurrent tasks, hence a no-op ratio around 1. With
//! the inbox every message is a Postgres transaction, and the commit (a WAL
//! flush) bounds the rate; more concurrency helps through group commit
//! (concurrency 16: about 2,000 msg/s with the inbox).
//!
//! Without `--bench` (as `cargo test --benches` runs it) it does a 100-message
//! smoke run. Queues and exchange are unique to the run and deleted at the
//! end, also on panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use outbox::cloudevents::{EventRef, amqp_properties, encode_body};
use outbox::consumer::ListenerQueues;
use outbox::{
    HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent, Registry, TestDatabase,
    Worker, WorkerConfig,
};
use uuid::Uuid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| outbox::DEFAULT_AMQP_URL.to_owned())
}

/// First and last handling time and a count, shared with a listener.
#[derive(Default)]
struct Clock {
    handled: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

impl Clock {
    fn tick(&self) {
        let now = Instant::now();
        self.first.lock().unwrap().get_or_insert(now);
        *self.last.lock().unwrap() = Some(now);
        self.handled.fetch_add(1, Ordering::SeqCst);
    }

    fn rate(&self) -> f64 {
        let n = self.handled.load(Ordering::SeqCst) as f64;
        let first = self.first.lock().unwrap().unwrap();
        let last = self.last.lock().unwrap().unwrap();
        (n - 1.0).max(1.0) / (last - first).as_secs_f64().max(1e-9)
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

/// Deletes the run's queues and exchange when dropped.
struct Cleanup {
    exchange: String,
    queues: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exchange = self.exchange.clone();
        let queues = std::mem::take(&mut self.queues);
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let Ok(connection) = outbox::amqp::connect(&amqp_url(), "consume bench cleanup").await else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    for queue in &queues {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// Publishes `n` site.created events straight to `queue`, confirmed.
async fn fill(channel: &Channel, queue: &str, n: usize) {
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
        let body = encode_body(&event, "/chom").unwrap();
        let properties = amqp_properties(&event, "consume-bench").unwrap();
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
                .unwrap(),
        );
        if pending.len() >= 500 {
            for confirm in pending.drain(..) {
                assert!(confirm.await.unwrap().is_ack());
            }
        }
    }
    for confirm in pending {
        assert!(confirm.await.unwrap().is_ack());
    }
}

/// Drains `n` messages from `queue` with a bare consumer that acks each;
/// returns messages per second from first delivery to last ack.
async fn raw_drain(connection: &Connection, queue: &str, n: usize, prefetch: u16) -> f64 {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut first = None;
    let mut done = 0usize;
    while done < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        first.get_or_insert_with(Instant::now);
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        done += 1;
    }
    let elapsed = first.unwrap().elapsed().as_secs_f64();
    channel
        .basic_cancel("raw".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let _ = channel.close(200, "drained".into()).await;
    (n as f64 - 1.0).max(1.0) / elapsed.max(1e-9)
}

struct Row {
    listener: &'static str,
    raw: f64,
    framework: f64,
}

#[allow(clippy::too_many_arguments)]
async fn measure<L: QueuedListener>(
    db: &TestDatabase,
    connection: &Connection,
    publisher: &Channel,
    exchange: &str,
    app: &str,
    listener: L,
    name: &'static str,
    options: ListenerOptions,
    n: usize,
    cleanup: &mut Cleanup,
) -> Row {
    let clock = Arc::new(Clock::default());
    let prefetch = options.prefetch;
    let registry = Registry::new()
        .queued_listener_with(
            &["site.created"],
            Timed {
                inner: listener,
                name,
                clock: Arc::clone(&clock),
            },
            options,
        )
        .unwrap();
    let plan: Vec<ListenerQueues> = outbox::consumer::topology::plan(app, &registry).unwrap();
    for queues in &plan {
        cleanup
            .queues
            .extend(queues.all_queues().into_iter().map(str::to_owned));
    }
    outbox::consumer::topology::declare(publisher, exchange, app, &registry)
        .await
        .unwrap();
    let queue = plan[0].queue.clone();

    fill(publisher, &queue, n).await;
    let raw = raw_drain(connection, &queue, n, prefetch).await;

    fill(publisher, &queue, n).await;
    let worker = Worker::new(
        WorkerConfig {
            database_url: db.url().to_owned(),
            amqp_url: amqp_url(),
            exchange: exchange.to_owned(),
            app: app.to_owned(),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while clock.handled.load(Ordering::SeqCst) < n as u64 {
        assert!(Instant::now() < deadline, "{name}: the worker did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let framework = clock.rate();
    let _ = stop_tx.send(true);
    task.await.unwrap().unwrap();
    Row {
        listener: name,
        raw,
        framework,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n = if smoke {
        100
    } else {
        env_usize("CONSUME_BENCH_MESSAGES", 5000)
    };
    let concurrency = env_usize("CONSUME_BENCH_CONCURRENCY", 4);
    let prefetch = u16::try_from(env_usize("CONSUME_BENCH_PREFETCH", 4 * concurrency)).unwrap();

    let db = TestDatabase::create_empty().unwrap();
    chom::migrate(&mut db.connect().unwrap()).unwrap();
    let id = Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_test.{id}");
    let app = format!("outbox_test.bench{}", &id[20..]);
    let mut cleanup = Cleanup {
        exchange: exchange.clone(),
        queues: Vec::new(),
    };
    let connection = outbox::amqp::connect(&amqp_url(), "consume bench").await.unwrap();
    let publisher = connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let options = |inbox: bool| ListenerOptions {
        inbox,
        concurrency,
        prefetch,
        ..ListenerOptions::default()
    };
    let mut rows = Vec::new();
    rows.push(
        measure(
            &db,
            &connection,
            &publisher,
            &exchange,
            &app,
            Noop,
            "noop",
            options(false),
            n,
            &mut cleanup,
        )
        .await,
    );
    rows.push(
        measure(
            &db,
            &connection,
            &publisher,
            &exchange,
            &app,
            Noop,
            "noop_inbox",
            options(true),
            n,
            &mut cleanup,
        )
        .await,
    );
    rows.push(
        measure(
            &db,
            &connection,
            &publisher,
            &exchange,
            &app,
            chom::listeners::RecordAuditLog,
            "record_audit_log",
            options(true),
            n,
            &mut cleanup,
        )
        .await,
    );
    let audit_rows = {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM audit_logs")
            .get_result::<Count>(&mut db.connect().unwrap())
            .unwrap()
            .n
    };
    assert_eq!(audit_rows, n as i64, "RecordAuditLog wrote one row per message");
    let _ = connection.close(200, "done".into()).await;

    println!(
        "consumer throughput: {n} site.created messages per run, quorum queue, prefetch {prefetch}, worker concurrency {concurrency}"
    );
    println!(
        "{:<18} {:>16} {:>16} {:>8}",
        "listener", "raw lapin msg/s", "worker msg/s", "ratio"
    );
    for row in &rows {
        println!(
            "{:<18} {:>16.0} {:>16.0} {:>8.2}",
            row.listener,
            row.raw,
            row.framework,
            row.framework / row.raw
        );
    }
    drop(cleanup);
}
