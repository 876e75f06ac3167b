//! The two listeners the chaos workers run, the failure schedule they
//! follow (derived from the run's seed, so a run can be replayed), and the
//! worker process's entry point.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::testing::Ticked;
use outbox::{Registry, Worker, WorkerConfig};

/// Listener with retries: transient failures on a schedule (always
/// succeeding by its last try) and 1% permanent failures.
pub const AUDIT: &str = "audit";
/// Listener that needs per-aggregate order: single active consumer, one
/// message at a time, no scheduled failures.
pub const ORDERED: &str = "ordered";
/// Tries of the audit listener; the schedule fails at most two of them.
pub const AUDIT_TRIES: u32 = 4;

/// What the schedule has in store for one event at the audit listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fate {
    /// Tries that fail with a transient error first.
    pub transient_failures: u32,
    /// Whether the try after those fails for good.
    pub permanent: bool,
}

/// SplitMix64: a stable mix, the same in every build, so a seed printed by
/// a failed run replays the same schedule.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The fate of tick `n` of `aggregate` (committed ticks are unique per
/// aggregate, so this names one event).
pub fn fate(seed: u64, aggregate: &str, n: i64) -> Fate {
    let mut h = mix(seed ^ n as u64);
    for byte in aggregate.bytes() {
        h = mix(h ^ u64::from(byte));
    }
    let roll = h % 1000;
    let transient_failures = match (h >> 20) % 20 {
        0..=16 => 0,
        17 | 18 => 1,
        _ => 2,
    };
    Fate {
        transient_failures,
        permanent: roll < 10,
    }
}

fn tick_of(event: &ReceivedEvent) -> Result<Ticked, ListenerError> {
    serde_json::from_str(event.data.get()).map_err(ListenerError::permanent)
}

fn apply_effect(
    ctx: &mut HandlerContext<'_>,
    listener: &str,
    event: &ReceivedEvent,
    tick: &Ticked,
) -> Result<(), ListenerError> {
    diesel::sql_query("INSERT INTO chaos_effects (listener, event_id, aggregate, n) VALUES ($1, $2, $3, $4)")
        .bind::<Text, _>(listener)
        .bind::<SqlUuid, _>(event.event_id)
        .bind::<Text, _>(&tick.aggregate)
        .bind::<BigInt, _>(tick.n)
        .execute(ctx.conn()?)?;
    Ok(())
}

struct Audit {
    seed: u64,
}

impl QueuedListener for Audit {
    fn name(&self) -> &str {
        AUDIT
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tick = tick_of(event)?;
        let fate = fate(self.seed, &tick.aggregate, tick.n);
        if ctx.attempt() <= fate.transient_failures {
            return Err(ListenerError::transient(format!(
                "scheduled transient failure on try {}",
                ctx.attempt()
            )));
        }
        if fate.permanent {
            return Err(ListenerError::permanent("scheduled permanent failure"));
        }
        apply_effect(ctx, AUDIT, event, &tick)
    }
}

struct Ordered;

impl QueuedListener for Ordered {
    fn name(&self) -> &str {
        ORDERED
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tick = tick_of(event)?;
        apply_effect(ctx, ORDERED, event, &tick)
    }
}

/// The registry every chaos worker runs (and the test plans queues from).
pub fn registry(seed: u64) -> Registry {
    let fast = |tries: u32, backoff: &[Duration]| ListenerOptions {
        // Statements stuck behind a blackholed link time out well after
        // the blackhole ends.
        timeout: Duration::from_secs(20),
        // Workers are SIGKILLed every few seconds: a message may be caught
        // unacknowledged by several kills without being a crash loop.
        max_unacked_deliveries: 50,
        ..ListenerOptions::default().retries(tries, backoff)
    };
    let ms = Duration::from_millis;
    Registry::new()
        .queued_listener_with(
            &["counter.ticked"],
            Audit { seed },
            ListenerOptions {
                concurrency: 4,
                prefetch: 8,
                ..fast(AUDIT_TRIES, &[ms(100), ms(200), ms(400)])
            },
        )
        .and_then(|registry| {
            registry.queued_listener_with(
                &["counter.ticked"],
                Ordered,
                ListenerOptions {
                    single_active_consumer: true,
                    concurrency: 1,
                    prefetch: 1,
                    ..fast(3, &[ms(50)])
                },
            )
        })
        .expect("the chaos listeners register")
}

/// Environment of a worker process.
pub const WORKER_ENV: &str = "OUTBOX_CHAOS_WORKER";

/// Runs a chaos worker until killed: called in a child process (the test
/// binary started again with `--ignored --exact worker_process`).
pub fn run_worker_process() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("worker spec");
    // Logs to stderr, which the test sends to a file per slot.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let text = |key: &str| spec[key].as_str().expect(key).to_owned();
    let config = WorkerConfig {
        database_url: text("database_url"),
        amqp_url: text("amqp_url"),
        exchange: text("exchange"),
        app: text("app"),
        worker_id: text("worker_id"),
        confirm_timeout: Duration::from_secs(2),
        reconnect_max: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(2),
        // A retry copy RabbitMQ keeps after its node is killed (issue 27)
        // is moved on within seconds, well inside the drain's 90 s.
        retry_repair_interval: Some(Duration::from_secs(1)),
        retry_repair_grace: Duration::from_secs(5),
        ..WorkerConfig::default()
    };
    let seed = spec["seed"].as_u64().expect("seed");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let worker = Worker::new(config, &registry(seed)).expect("worker config");
        worker
            .run(std::future::pending::<()>())
            .await
            .expect("worker runs until killed");
    });
}
