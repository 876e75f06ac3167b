//! The worker: consumes every queued listener's queue, runs the listener,
//! and turns each outcome into an acknowledgement, a delayed retry, or a
//! failed job plus a dead-lettered message.
//!
//! ## One message
//!
//! 1. Decode the CloudEvents body. A body that does not decode, or whose
//!    type the listener is not registered for, fails at once.
//! 2. When the message may have been seen before (the broker's
//!    `redelivered` flag, or the retry marker this worker adds), read the
//!    trusted state from Postgres: the failed tries so far, and whether a
//!    failed job already exists (then it only needs dead-lettering). A
//!    message redelivered `max_unacked_deliveries` times without an ack
//!    (the broker's own `x-delivery-count`, clamped) is failed without
//!    running the handler again.
//! 3. Run the handler on the blocking pool, in an inbox transaction when
//!    the listener has one, under the listener's timeout.
//! 4. Success: ack. Failure: count it in `listener_attempts`; if tries
//!    remain, publish the message to the retry queue of the backoff delay
//!    (with a publisher confirm) and ack; if not (or the error was
//!    permanent), write the failed_jobs row, publish to the dead-letter
//!    queue, ack.
//!
//! Database or broker trouble in the framework's own steps (no pooled
//! connection, a publish not confirmed) never counts as a try: the worker
//! waits with backoff and tries the step again, holding the message, so
//! the listener's prefetch window stops the flow until things recover.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::amqp::{self, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, validate_amqp_name, validate_amqp_url};
use crate::consumer::listener::{HandlerContext, ListenerError};
use crate::consumer::message::{ReceivedEvent, decode};
use crate::consumer::store::{self, FailedMessage, FailureOutcome};
use crate::consumer::topology::{self, ListenerQueues};
use crate::database::{DEFAULT_DATABASE_URL, PgPool, redact_url};
use crate::error::{Error, Result};
use crate::prepared::{Bind, Prepared};
use crate::registry::{QueuedRegistration, Registry};

/// Messages handled, by `listener` and `outcome`: `success`, `duplicate`
/// (inbox hit, handler skipped), `retry` (sent to a retry queue), `failed`
/// (failed job + dead-letter queue), `returned` (left unacknowledged at
/// shutdown or connection loss, back to the queue).
pub const LISTENER_OUTCOMES_TOTAL: &str = "outbox_listener_outcomes_total";
/// Handler run time, by `listener`.
pub const LISTENER_DURATION_SECONDS: &str = "outbox_listener_duration_seconds";
/// Failed jobs recorded, by `listener`.
pub const FAILED_JOBS_TOTAL: &str = "outbox_failed_jobs_total";

/// Header marking a message this worker sent to a retry queue. Only a
/// hint that Postgres holds an attempt count for it; never trusted as one.
pub const RETRY_HEADER: &str = "x-outbox-retry";
/// Header naming the failed job of a dead-lettered message.
pub const FAILED_JOB_HEADER: &str = "x-outbox-failed-job";
/// Header with the (cut) final error of a dead-lettered message.
pub const ERROR_HEADER: &str = "x-outbox-error";
/// Header counting the publisher's headers left off a retry or
/// dead-letter copy because the table was too large.
pub const HEADERS_DROPPED_HEADER: &str = "x-outbox-headers-dropped";
/// Longest error text put in [`ERROR_HEADER`].
const MAX_ERROR_HEADER_BYTES: usize = 1024;
/// Largest header table (on the wire) of the publisher's kept on a retry
/// or dead-letter copy. A content header must fit one frame (RabbitMQ's
/// default frame_max is 128 KiB): a message whose headers only just fit
/// would not fit with the worker's own headers added, the copy could never
/// be published, and the message would be held and redelivered for ever.
const MAX_COPIED_HEADER_BYTES: usize = 64 * 1024;

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        LISTENER_OUTCOMES_TOTAL,
        "Messages handled by listener and outcome"
    );
    describe_histogram!(
        LISTENER_DURATION_SECONDS,
        Unit::Seconds,
        "Listener handler run time"
    );
    describe_counter!(FAILED_JOBS_TOTAL, "Failed jobs recorded by listener");
}

/// How a worker connects and behaves; each default beside its field.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Postgres (attempts, failed jobs, inbox, and the listeners' own
    /// tables). Default [`DEFAULT_DATABASE_URL`].
    pub database_url: String,
    /// RabbitMQ. Default [`DEFAULT_AMQP_URL`].
    pub amqp_url: String,
    /// The topic exchange the relay publishes to; declared (durable,
    /// idempotent) before binding. Default `outbox.events`.
    pub exchange: String,
    /// Prefix of the queue names (`<app>.<listener>`). Default `app`;
    /// services set their own (`chom`).
    pub app: String,
    /// Name in the broker's connection list and logs. Default
    /// `<host>-<pid>-<random>`.
    pub worker_id: String,
    /// Database connections. Default: the listeners' concurrency summed,
    /// plus 2, at most 64.
    pub pool_size: Option<u32>,
    /// Wait for the broker's confirm of a retry or dead-letter publish.
    /// Default 10 s.
    pub confirm_timeout: Duration,
    /// Longest wait between reconnects to the broker, and between tries of
    /// a database step that failed. Default 30 s.
    pub reconnect_max: Duration,
    /// How long shutdown waits for handlers in flight; messages of those
    /// still running then go back to their queues. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Declare the exchange and queues on every connect. Default true.
    pub declare_topology: bool,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("app", &self.app)
            .field("worker_id", &self.worker_id)
            .field("pool_size", &self.pool_size)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("reconnect_max", &self.reconnect_max)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("declare_topology", &self.declare_topology)
            .finish()
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            app: "app".to_owned(),
            worker_id: crate::relay::config::default_relay_id(),
            pool_size: None,
            confirm_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            declare_topology: true,
        }
    }
}

impl WorkerConfig {
    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::Config(message));
        if !self.database_url.starts_with("postgres://") && !self.database_url.starts_with("postgresql://") {
            return bad(format!(
                "database URL {} must start with postgres:// or postgresql://",
                redact_url(&self.database_url)
            ));
        }
        validate_amqp_url(&self.amqp_url)?;
        validate_amqp_name("exchange", &self.exchange)?;
        validate_amqp_name("app", &self.app)?;
        if self.worker_id.is_empty() || self.worker_id.len() > 200 {
            return bad("worker id must be 1 to 200 characters".into());
        }
        if let Some(size) = self.pool_size
            && !(1..=1024).contains(&size)
        {
            return bad(format!("pool size must be between 1 and 1024, not {size}"));
        }
        if self.confirm_timeout.is_zero() || self.reconnect_max.is_zero() {
            return bad("confirm timeout and reconnect max must be positive".into());
        }
        Ok(())
    }
}

/// Liveness as `/health` reports it.
#[derive(Debug, Default)]
pub struct WorkerHealth {
    broker: AtomicBool,
    database: AtomicBool,
}

impl WorkerHealth {
    /// Connected to the broker and the last database step succeeded.
    pub fn is_healthy(&self) -> bool {
        self.broker_ok() && self.database_ok()
    }

    /// Whether the broker session is up.
    pub fn broker_ok(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    /// Whether the last database step succeeded.
    pub fn database_ok(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }
}

/// A worker running a registry's queued listeners.
pub struct Worker {
    config: Arc<WorkerConfig>,
    listeners: Vec<(QueuedRegistration, ListenerQueues)>,
    pool: PgPool,
    health: Arc<WorkerHealth>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field(
                "listeners",
                &self.listeners.iter().map(|(r, _)| r.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Checks `config` and the registry's queued listeners and prepares a
    /// lazily connecting pool (a database still starting is waited for,
    /// not an error here).
    pub fn new(config: WorkerConfig, registry: &Registry) -> Result<Self> {
        config.validate()?;
        if registry.queued_listeners().is_empty() {
            return Err(Error::Config("the registry has no queued listener to run".into()));
        }
        let listeners = registry
            .queued_listeners()
            .iter()
            .map(|r| Ok((r.clone(), topology::queues_for(&config.app, r)?)))
            .collect::<Result<Vec<_>>>()?;
        let concurrency: usize = listeners.iter().map(|(r, _)| r.options().concurrency).sum();
        let size = config
            .pool_size
            .unwrap_or_else(|| u32::try_from(concurrency + 2).unwrap_or(64).min(64));
        let pool = Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(5))
            .build_unchecked(ConnectionManager::<PgConnection>::new(&config.database_url));
        Ok(Self {
            config: Arc::new(config),
            listeners,
            pool,
            health: Arc::new(WorkerHealth::default()),
        })
    }

    /// Health flags, for `/health`.
    pub fn health(&self) -> Arc<WorkerHealth> {
        Arc::clone(&self.health)
    }

    /// The queues of the listeners this worker runs.
    pub fn queues(&self) -> Vec<ListenerQueues> {
        self.listeners.iter().map(|(_, q)| q.clone()).collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Consumes until `shutdown` resolves, reconnecting with backoff when
    /// the broker goes away. On shutdown it stops taking messages, waits
    /// up to `shutdown_timeout` for handlers in flight, and closes the
    /// connection, which returns every unacknowledged message to its
    /// queue.
    pub async fn run<F: Future<Output = ()>>(&self, shutdown: F) -> Result<()> {
        describe_metrics();
        self.health.database.store(true, Ordering::Relaxed);
        tracing::info!(worker_id = %self.config.worker_id, app = %self.config.app, listeners = self.listeners.len(), "worker starting");
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delay = Duration::from_millis(100);
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => break,
                opened = tokio::time::timeout(Duration::from_secs(60), self.open_session()) => {
                    opened.unwrap_or_else(|_| Err(Error::Config("broker session setup took over 60 s".into())))
                }
            };
            match opened {
                Ok(session) => {
                    delay = Duration::from_millis(100);
                    self.health.broker.store(true, Ordering::Relaxed);
                    tracing::info!(worker_id = %self.config.worker_id, "worker connected to the broker");
                    let end = session.run(shutdown.as_mut(), &self.config).await;
                    self.health.broker.store(false, Ordering::Relaxed);
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::BrokerLost(reason) => {
                            tracing::warn!(%reason, "worker lost the broker; reconnecting");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), retry_in = ?delay, "worker cannot set up its broker session");
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(jitter(delay)) => {}
            }
            delay = (delay * 2).min(self.config.reconnect_max);
        }
        tracing::info!(worker_id = %self.config.worker_id, "worker stopped");
        Ok(())
    }

    async fn open_session(&self) -> Result<Session> {
        let config = &self.config;
        let connection =
            amqp::connect(&config.amqp_url, &format!("outbox-worker {}", config.worker_id)).await?;
        let broker = |context: String| move |source| Error::Broker { context, source };
        let publish = connection
            .create_channel()
            .await
            .map_err(broker("cannot open a channel".into()))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("cannot enable publisher confirms".into()))?;
        if config.declare_topology {
            amqp::declare_exchange(&publish, &config.exchange).await?;
            for (_, queues) in &self.listeners {
                topology::declare_listener(&publish, &config.exchange, queues).await?;
            }
        }
        let publisher = Arc::new(Publisher {
            channel: publish.clone(),
            confirm_timeout: config.confirm_timeout,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut consumers = Vec::new();
        for (registration, queues) in &self.listeners {
            let channel = connection
                .create_channel()
                .await
                .map_err(broker("cannot open a channel".into()))?;
            channel
                .basic_qos(registration.options().prefetch, BasicQosOptions::default())
                .await
                .map_err(broker(format!("cannot set the prefetch of {}", queues.queue)))?;
            let tag = format!("{}.{}", config.worker_id, registration.name());
            let consumer = channel
                .basic_consume(
                    queues.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker(format!("cannot consume {}", queues.queue)))?;
            consumers.push(ListenerLoop {
                shared: Arc::new(ListenerShared {
                    registration: registration.clone(),
                    queues: queues.clone(),
                    pool: self.pool.clone(),
                    publisher: Arc::clone(&publisher),
                    health: Arc::clone(&self.health),
                    stop: stop_rx.clone(),
                    reconnect_max: config.reconnect_max,
                }),
                channel,
                consumer,
                tag,
            });
        }
        Ok(Session {
            connection,
            publish,
            consumers,
            stop_tx,
        })
    }
}

enum SessionEnd {
    Shutdown,
    BrokerLost(String),
}

struct Session {
    connection: Connection,
    publish: Channel,
    consumers: Vec<ListenerLoop>,
    stop_tx: watch::Sender<bool>,
}

impl Session {
    async fn run<F: Future<Output = ()>>(
        self,
        mut shutdown: std::pin::Pin<&mut F>,
        config: &WorkerConfig,
    ) -> SessionEnd {
        let Session {
            connection,
            publish,
            consumers,
            stop_tx,
        } = self;
        let mut loops = JoinSet::new();
        let mut cancel = Vec::new();
        for consumer in consumers {
            cancel.push((consumer.channel.clone(), consumer.tag.clone()));
            loops.spawn(consumer.run());
        }
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let end = loop {
            tokio::select! {
                () = &mut shutdown => break SessionEnd::Shutdown,
                done = loops.join_next() => {
                    let reason = match done {
                        Some(Ok(reason)) => reason,
                        Some(Err(e)) => format!("listener loop failed: {e}"),
                        None => "no listener loop left".into(),
                    };
                    break SessionEnd::BrokerLost(reason);
                }
                _ = check.tick() => {
                    if !connection.status().connected() {
                        break SessionEnd::BrokerLost("connection closed".into());
                    }
                    // Without the publish channel no failure can be sent on:
                    // start over with a fresh session.
                    if !publish.status().connected() {
                        break SessionEnd::BrokerLost("publish channel closed".into());
                    }
                }
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            tracing::info!("worker stopping: no new messages, waiting for handlers in flight");
            for (channel, tag) in &cancel {
                // Bounded: a broker that stopped answering must not hold
                // up the shutdown.
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await;
            }
        }
        let _ = stop_tx.send(true);
        // Each loop waits for its own handlers; bound the whole wait.
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            while loops.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "handlers still running after the shutdown timeout; their messages go back to the queue"
            );
            loops.abort_all();
            while loops.join_next().await.is_some() {}
        }
        if connection.status().connected() {
            // Channels first, then the connection (unacknowledged messages
            // go back to their queues either way).
            let channels = cancel
                .iter()
                .map(|(channel, _)| channel)
                .chain(std::iter::once(&publish));
            for channel in channels {
                if channel.status().connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        channel.close(200, "worker stopping".into()),
                    )
                    .await;
                }
            }
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "worker stopping".into()),
            )
            .await;
        }
        end
    }
}

/// What every delivery task of one listener shares.
struct ListenerShared {
    registration: QueuedRegistration,
    queues: ListenerQueues,
    pool: PgPool,
    publisher: Arc<Publisher>,
    health: Arc<WorkerHealth>,
    stop: watch::Receiver<bool>,
    reconnect_max: Duration,
}

struct ListenerLoop {
    shared: Arc<ListenerShared>,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
}

impl ListenerLoop {
    /// Takes deliveries while a concurrency slot is free; returns why it
    /// stopped. Waits for its handlers before returning (aborted by the
    /// session after the shutdown timeout).
    async fn run(mut self) -> String {
        let options = self.shared.registration.options().clone();
        let slots = Arc::new(Semaphore::new(options.concurrency));
        let mut tasks = JoinSet::new();
        let mut stop = self.shared.stop.clone();
        let reason = loop {
            let permit = tokio::select! {
                _ = stop.changed() => break "stopping".to_owned(),
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break "semaphore closed".to_owned(),
                },
            };
            let next = tokio::select! {
                _ = stop.changed() => break "stopping".to_owned(),
                next = self.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle_delivery(Arc::clone(&self.shared), delivery, permit));
                }
                Some(Err(error)) => {
                    break format!("consumer of {} failed: {error}", self.shared.queues.queue);
                }
                None => break format!("consumer of {} was cancelled", self.shared.queues.queue),
            }
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
        };
        while tasks.join_next().await.is_some() {}
        reason
    }
}

/// The publish channel (confirm mode) for retry and dead-letter copies.
struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Publishes to `queue` through the default exchange and waits for the
    /// broker's confirm; a return (no such queue) or nack is an error.
    async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<()> {
        crate::amqp::publish_to_queue(&self.channel, queue, body, properties, self.confirm_timeout).await
    }
}

/// How a handler run ended.
enum HandlerRun {
    Done {
        duplicate: bool,
    },
    Failed(ListenerError),
    /// The framework could not even start the try (no connection, BEGIN
    /// failed): not the listener's fault, not counted.
    Infrastructure(String),
    /// Another delivery of the same event is being handled right now
    /// (a duplicate, or a retry overtaking a timed-out try): wait for it,
    /// not counted.
    Busy,
}

/// Why processing stopped without an ack.
struct Stopped;

async fn handle_delivery(shared: Arc<ListenerShared>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let permit = Arc::new(permit);
    let listener = shared.registration.name().to_owned();
    let outcome = process(&shared, &delivery, &permit).await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(Stopped) => {
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => "returned")
                .increment(1);
            return;
        }
    };
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => outcome)
                .increment(1);
        }
        Ok(false) | Err(_) => {
            // The channel is gone: the message comes back, and the inbox,
            // the attempt count or the failed job makes that harmless.
            tracing::warn!(listener = %listener, "could not acknowledge a message (channel closed); it will be redelivered");
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => "returned")
                .increment(1);
        }
    }
}

/// Runs the pipeline for one delivery; returns the outcome label to ack
/// with, or [`Stopped`] to leave the message unacknowledged.
async fn process(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    permit: &Arc<OwnedSemaphorePermit>,
) -> std::result::Result<&'static str, Stopped> {
    let listener = shared.registration.name();
    let options = shared.registration.options();
    let event = match decode(&delivery.data) {
        Ok(event) => Arc::new(event),
        Err(error) => {
            let text = format!("cannot decode message: {error}");
            return fail_malformed(shared, delivery, None, &text).await;
        }
    };
    if !shared.registration.handles(&event.event_type) {
        let text = format!(
            "listener {listener} does not handle {} events (it handles {})",
            event.event_type,
            shared.registration.event_types().join(", ")
        );
        return fail_event(shared, delivery, &event, &text, true).await;
    }
    let mut previous = 0;
    if delivery.redelivered || has_header(&delivery.properties, RETRY_HEADER) {
        let (name, id) = (listener.to_owned(), event.event_id);
        let state = db_step(shared, move |conn| store::delivery_state(conn, &name, id)).await?;
        if let Some(job_id) = state.failed_job {
            // Failed for good before the crash that redelivered it: only
            // the dead-letter copy and the ack may be missing.
            let text = format!("already recorded as failed job {job_id}");
            dead_letter(shared, delivery, job_id, &text).await?;
            return Ok("failed");
        }
        previous = state.attempts;
        let deliveries = delivery_count(&delivery.properties);
        if delivery.redelivered && deliveries >= options.max_unacked_deliveries {
            let text = format!(
                "delivered {} times without being acknowledged: the worker crashed, timed out or lost its connection while handling it",
                deliveries + 1
            );
            return fail_event(shared, delivery, &event, &text, true).await;
        }
    }
    let attempt = previous + 1;
    let mut wait = Duration::from_millis(100);
    let mut busy_wait = Duration::from_millis(20);
    loop {
        let started = Instant::now();
        let run = run_handler(shared, &event, attempt, previous > 0, permit).await;
        metrics::histogram!(LISTENER_DURATION_SECONDS, "listener" => listener.to_owned())
            .record(started.elapsed().as_secs_f64());
        match run {
            HandlerRun::Done { duplicate } => {
                shared.health.database.store(true, Ordering::Relaxed);
                if previous > 0 && !options.inbox {
                    let (name, id) = (listener.to_owned(), event.event_id);
                    db_step(shared, move |conn| store::clear_attempts(conn, &name, id)).await?;
                }
                return Ok(if duplicate { "duplicate" } else { "success" });
            }
            HandlerRun::Failed(error) => {
                let permanent = error.is_permanent();
                let text = error.to_string();
                tracing::warn!(listener, event_id = %event.event_id, event_type = %event.event_type, attempt, tries = options.tries, permanent, error = %text, "listener failed");
                return fail_event(shared, delivery, &event, &text, permanent).await;
            }
            HandlerRun::Busy => {
                tracing::debug!(listener, event_id = %event.event_id, retry_in = ?busy_wait, "another delivery of this event is being handled; waiting");
                pause_up_to(shared, &mut busy_wait, Duration::from_secs(1)).await?;
            }
            HandlerRun::Infrastructure(reason) => {
                shared.health.database.store(false, Ordering::Relaxed);
                tracing::warn!(listener, event_id = %event.event_id, %reason, retry_in = ?wait, "cannot run the listener; holding the message");
                pause(shared, &mut wait).await?;
            }
        }
    }
}

/// Records a failed try (or a permanent failure) and sends the message on:
/// to a retry queue, or to failed_jobs and the dead-letter queue.
async fn fail_event(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    event: &Arc<ReceivedEvent>,
    error: &str,
    permanent: bool,
) -> std::result::Result<&'static str, Stopped> {
    let options = shared.registration.options();
    let tries = options.tries;
    let (listener, queue) = (shared.registration.name().to_owned(), shared.queues.queue.clone());
    let (event_id, event_type) = (event.event_id, event.event_type.clone());
    let body = delivery.data.clone();
    let error_text = error.to_owned();
    let outcome = db_step(shared, move |conn| {
        store::record_failure(
            conn,
            &FailedMessage {
                listener: &listener,
                queue: &queue,
                event_id,
                event_type: &event_type,
                body: &body,
            },
            &error_text,
            permanent,
            tries,
        )
    })
    .await?;
    match outcome {
        FailureOutcome::Retry { attempts } => {
            let delay = options.delay_after(attempts);
            let Some(retry_queue) = shared.queues.retry_queue(delay) else {
                // Cannot happen: every delay of the first tries-1 failures
                // has a queue. Fail rather than loop.
                return fail_malformed(
                    shared,
                    delivery,
                    Some(event),
                    "no retry queue for the backoff delay",
                )
                .await;
            };
            let mut headers = copied_headers(&delivery.properties);
            headers.insert(RETRY_HEADER.into(), AMQPValue::LongInt(attempts.min(1000) as i32));
            let properties = delivery
                .properties
                .clone()
                .with_headers(headers)
                .with_delivery_mode(2);
            publish_step(shared, retry_queue, &delivery.data, properties).await?;
            tracing::info!(listener = shared.registration.name(), event_id = %event.event_id, attempts, tries, retry_in = ?delay, "retry scheduled");
            Ok("retry")
        }
        FailureOutcome::Failed {
            job_id,
            attempts,
            inserted,
        } => {
            if inserted {
                metrics::counter!(FAILED_JOBS_TOTAL, "listener" => shared.registration.name().to_owned())
                    .increment(1);
            }
            tracing::error!(listener = shared.registration.name(), event_id = %event.event_id, attempts, failed_job = job_id, error, "listener failed for good; recorded in failed_jobs");
            dead_letter(shared, delivery, job_id, error).await?;
            Ok("failed")
        }
    }
}

/// A message that does not name a usable event: failed_jobs and the
/// dead-letter queue at once.
async fn fail_malformed(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    event: Option<&Arc<ReceivedEvent>>,
    error: &str,
) -> std::result::Result<&'static str, Stopped> {
    let (listener, queue) = (shared.registration.name().to_owned(), shared.queues.queue.clone());
    let event_type = event
        .map(|e| e.event_type.clone())
        .or_else(|| delivery.properties.kind().as_ref().map(|t| t.to_string()))
        .filter(|t| t.len() <= 255);
    let body = delivery.data.clone();
    let error_text = error.to_owned();
    let (job_id, inserted) = db_step(shared, move |conn| {
        store::record_malformed(conn, &listener, &queue, event_type.as_deref(), &body, &error_text)
    })
    .await?;
    if inserted {
        metrics::counter!(FAILED_JOBS_TOTAL, "listener" => shared.registration.name().to_owned())
            .increment(1);
    }
    tracing::error!(
        listener = shared.registration.name(),
        failed_job = job_id,
        error,
        "malformed message recorded in failed_jobs"
    );
    dead_letter(shared, delivery, job_id, error).await?;
    Ok("failed")
}

async fn dead_letter(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    job_id: i64,
    error: &str,
) -> std::result::Result<(), Stopped> {
    let mut headers = copied_headers(&delivery.properties);
    headers.insert(FAILED_JOB_HEADER.into(), AMQPValue::LongLongInt(job_id));
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(crate::failed_jobs::bounded_text(
            error,
            MAX_ERROR_HEADER_BYTES,
        ))),
    );
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let dead = shared.queues.dead.clone();
    publish_step(shared, &dead, &delivery.data, properties).await
}

/// Runs the handler on the blocking pool under the listener's timeout.
async fn run_handler(
    shared: &Arc<ListenerShared>,
    event: &Arc<ReceivedEvent>,
    attempt: u32,
    clear_attempts: bool,
    permit: &Arc<OwnedSemaphorePermit>,
) -> HandlerRun {
    let options = shared.registration.options().clone();
    let listener = Arc::clone(shared.registration.listener());
    let pool = shared.pool.clone();
    let event = Arc::clone(event);
    // The blocking thread holds a clone of the slot: a handler that
    // outlives its timeout still counts against the concurrency.
    let slot = Arc::clone(permit);
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        if options.inbox {
            run_in_inbox(
                &pool,
                listener.as_ref(),
                &event,
                attempt,
                &options,
                clear_attempts,
            )
        } else {
            let mut ctx = HandlerContext::with_pool(Some(&pool), attempt, options.tries);
            match guarded(|| listener.handle(&event, &mut ctx)) {
                Ok(()) => HandlerRun::Done { duplicate: false },
                Err(error) => HandlerRun::Failed(error),
            }
        }
    });
    let timeout = shared.registration.options().timeout;
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(run)) => run,
        Ok(Err(join)) => HandlerRun::Failed(ListenerError::transient(format!("handler task failed: {join}"))),
        Err(_) => HandlerRun::Failed(ListenerError::transient(format!(
            "handler timed out after {timeout:?}"
        ))),
    }
}

enum TxError {
    Setup(diesel::result::Error),
    Busy,
    Listener(ListenerError),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for TxError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

fn run_in_inbox(
    pool: &PgPool,
    listener: &dyn crate::consumer::QueuedListener,
    event: &ReceivedEvent,
    attempt: u32,
    options: &crate::consumer::ListenerOptions,
    clear_attempts: bool,
) -> HandlerRun {
    use diesel::Connection;
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(error) => return HandlerRun::Infrastructure(format!("no database connection: {error}")),
    };
    let name = listener.name().to_owned();
    let mut handler_ran = false;
    let outcome = conn.transaction::<bool, TxError, _>(|conn| {
        use diesel::RunQueryDsl;
        // One round trip: bound the transaction by the handler's timeout,
        // make sure no other delivery of this event is being handled right
        // now (a duplicate would otherwise wait on the uncommitted inbox
        // row, and the wait would count as its try), and claim the inbox
        // row.
        #[derive(diesel::QueryableByName)]
        struct Claim {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            locked: bool,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            inserted: i64,
            #[diesel(sql_type = diesel::sql_types::Integer)]
            previous: i32,
        }
        let millis = options.timeout.as_millis().max(1).to_string();
        struct InboxClaimSql;
        let claim = Prepared::<InboxClaimSql>::new(
            "WITH guard AS (
                 SELECT pg_try_advisory_xact_lock(hashtextextended($1 || '/' || $2::text, 0)) AS locked,
                        set_config('statement_timeout', $3, true) AS timeout),
             claimed AS (
                 INSERT INTO processed_events (listener, event_id)
                 SELECT $1, $2 FROM guard WHERE locked
                 ON CONFLICT DO NOTHING
                 RETURNING 1)
             SELECT (SELECT locked FROM guard) AS locked, (SELECT count(*) FROM claimed) AS inserted,
                    -- Failed tries so far, also for a copy that carries no
                    -- marker (a relay's duplicate publish): the handler's
                    -- attempt number stays true at no extra round trip.
                    COALESCE((SELECT attempts FROM listener_attempts
                              WHERE listener = $1 AND event_id = $2), 0) AS previous",
            vec![Bind::Text(&name), Bind::Uuid(event.event_id), Bind::Text(&millis)],
        )
        .get_result::<Claim>(conn)
        .map_err(TxError::Setup)?;
        if !claim.locked {
            return Err(TxError::Busy);
        }
        let previous = u32::try_from(claim.previous).unwrap_or(0);
        let (attempt, clear_attempts) = (attempt.max(previous + 1), clear_attempts || previous > 0);
        if claim.inserted == 0 {
            if clear_attempts {
                // A retry whose event another copy already handled.
                store::clear_attempts(conn, &name, event.event_id).map_err(|e| match e {
                    Error::Database(db) => TxError::Setup(db),
                    other => TxError::Listener(ListenerError::transient(other)),
                })?;
            }
            return Ok(true);
        }
        handler_ran = true;
        let mut ctx = HandlerContext::with_transaction(conn, attempt, options.tries);
        guarded(|| listener.handle(event, &mut ctx)).map_err(TxError::Listener)?;
        if clear_attempts {
            store::clear_attempts(conn, &name, event.event_id).map_err(|e| match e {
                Error::Database(db) => TxError::Database(db),
                other => TxError::Listener(ListenerError::transient(other)),
            })?;
        }
        Ok(false)
    });
    // A connection that broke under the handler (Postgres restarted, the
    // backend was terminated, the network dropped) is the database's
    // trouble, not the listener's: hold the message and run it again
    // without counting a try. The inbox makes the rerun safe if the COMMIT
    // did reach the server.
    let connection_lost = outcome.is_err() && diesel::r2d2::R2D2Connection::is_broken(&mut *conn);
    match outcome {
        Ok(duplicate) => HandlerRun::Done { duplicate },
        Err(TxError::Listener(_) | TxError::Database(_)) if connection_lost => {
            HandlerRun::Infrastructure("the database connection was lost during the try".to_owned())
        }
        Err(TxError::Listener(error)) => HandlerRun::Failed(error),
        Err(TxError::Busy) => HandlerRun::Busy,
        Err(TxError::Setup(error)) => {
            HandlerRun::Infrastructure(format!("cannot open the inbox transaction: {error}"))
        }
        Err(TxError::Database(error)) if !handler_ran => {
            HandlerRun::Infrastructure(format!("cannot open the inbox transaction: {error}"))
        }
        // COMMIT failed (serialization, deferred constraint, lost
        // connection): the effect did not happen; a try of the listener.
        Err(TxError::Database(error)) => HandlerRun::Failed(ListenerError::transient(error)),
    }
}

/// Runs a handler, turning a panic into a transient failure.
fn guarded(
    run: impl FnOnce() -> std::result::Result<(), ListenerError>,
) -> std::result::Result<(), ListenerError> {
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(ListenerError::transient(format!("listener panicked: {message}")))
        }
    }
}

/// Runs a framework database step on the blocking pool, waiting with
/// backoff while the database is unreachable; [`Stopped`] on shutdown.
async fn db_step<T: Send + 'static>(
    shared: &Arc<ListenerShared>,
    work: impl Fn(&mut PgConnection) -> Result<T> + Send + Sync + 'static,
) -> std::result::Result<T, Stopped> {
    let work = Arc::new(work);
    let mut wait = Duration::from_millis(100);
    loop {
        let pool = shared.pool.clone();
        let step = Arc::clone(&work);
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            step(&mut conn)
        })
        .await
        .unwrap_or_else(|e| Err(Error::Config(format!("blocking task failed: {e}"))));
        match result {
            Ok(value) => {
                shared.health.database.store(true, Ordering::Relaxed);
                return Ok(value);
            }
            Err(error) => {
                shared.health.database.store(false, Ordering::Relaxed);
                tracing::warn!(listener = shared.registration.name(), error = %error_chain(&error), retry_in = ?wait, "database step failed; holding the message");
                pause(shared, &mut wait).await?;
            }
        }
    }
}

/// Publishes with a confirm, retrying with backoff; [`Stopped`] on
/// shutdown or when the session ends (the message then comes back).
async fn publish_step(
    shared: &Arc<ListenerShared>,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> std::result::Result<(), Stopped> {
    let mut wait = Duration::from_millis(100);
    loop {
        match shared
            .publisher
            .publish_to_queue(queue, body, properties.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(listener = shared.registration.name(), queue, error = %error_chain(&error), retry_in = ?wait, "publish failed; holding the message");
                if !shared.publisher.channel.status().connected() {
                    return Err(Stopped);
                }
                pause(shared, &mut wait).await?;
            }
        }
    }
}

/// Waits `wait` (then doubles it, up to the reconnect maximum), or returns
/// [`Stopped`] when the worker stops.
async fn pause(shared: &Arc<ListenerShared>, wait: &mut Duration) -> std::result::Result<(), Stopped> {
    pause_up_to(shared, wait, shared.reconnect_max).await
}

/// [`pause`] with its own cap on the doubling.
async fn pause_up_to(
    shared: &Arc<ListenerShared>,
    wait: &mut Duration,
    cap: Duration,
) -> std::result::Result<(), Stopped> {
    let mut stop = shared.stop.clone();
    if *stop.borrow() {
        return Err(Stopped);
    }
    tokio::select! {
        _ = stop.changed() => return Err(Stopped),
        () = tokio::time::sleep(jitter(*wait)) => {}
    }
    *wait = (*wait * 2).min(cap);
    if *stop.borrow() { Err(Stopped) } else { Ok(()) }
}

fn jitter(delay: Duration) -> Duration {
    let factor = 0.8 + rand_fraction() * 0.4;
    delay.mul_f64(factor)
}

/// A cheap pseudo-random fraction in [0, 1) for jitter.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// The message's headers for a retry or dead-letter copy: entries are kept
/// while the table stays within [`MAX_COPIED_HEADER_BYTES`]; the number
/// left off, if any, goes in [`HEADERS_DROPPED_HEADER`].
pub(crate) fn copied_headers(properties: &BasicProperties) -> FieldTable {
    let mut kept = FieldTable::default();
    let Some(original) = properties.headers().as_ref() else {
        return kept;
    };
    let (mut size, mut dropped) = (0usize, 0u32);
    for (key, value) in original.inner() {
        let entry = 1 + key.as_str().len() + encoded_size(value);
        if size + entry <= MAX_COPIED_HEADER_BYTES {
            kept.insert(key.clone(), value.clone());
            size += entry;
        } else {
            dropped = dropped.saturating_add(1);
        }
    }
    if dropped > 0 {
        kept.insert(HEADERS_DROPPED_HEADER.into(), AMQPValue::LongUInt(dropped));
    }
    kept
}

/// Bytes `value` takes in an AMQP field table (type octet included).
pub(crate) fn encoded_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => {
            4 + t
                .inner()
                .iter()
                .map(|(k, v)| 1 + k.as_str().len() + encoded_size(v))
                .sum::<usize>()
        }
    }
}

pub(crate) fn has_header(properties: &BasicProperties, name: &str) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.contains_key(name))
}

/// The broker's `x-delivery-count` (quorum queues), clamped to 0..=1000.
/// Only consulted together with the broker's `redelivered` flag.
pub(crate) fn delivery_count(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    let value = headers.inner().get("x-delivery-count");
    let count: i64 = match value {
        Some(AMQPValue::ShortShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortShortUInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortUInt(v)) => i64::from(*v),
        Some(AMQPValue::LongInt(v)) => i64::from(*v),
        Some(AMQPValue::LongUInt(v)) => i64::from(*v),
        Some(AMQPValue::LongLongInt(v)) => *v,
        _ => 0,
    };
    u32::try_from(count.clamp(0, 1000)).unwrap_or(0)
}

fn error_chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_counts_are_clamped() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(i64::MAX));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(delivery_count(&properties), 1000);
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(-5));
        assert_eq!(
            delivery_count(&BasicProperties::default().with_headers(headers)),
            0
        );
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
    }

    #[test]
    fn copies_keep_headers_up_to_a_bound() {
        let mut headers = FieldTable::default();
        headers.insert("small".into(), AMQPValue::LongInt(1));
        for i in 0..200 {
            headers.insert(
                format!("x-bulk-{i:04}").into(),
                AMQPValue::LongString("v".repeat(990).as_str().into()),
            );
        }
        let kept = copied_headers(&BasicProperties::default().with_headers(headers));
        let size: usize = kept
            .inner()
            .iter()
            .map(|(k, v)| 1 + k.as_str().len() + encoded_size(v))
            .sum();
        assert!(size <= MAX_COPIED_HEADER_BYTES + 64, "{size}");
        assert!(kept.contains_key("small"));
        assert!(matches!(
            kept.inner().get(HEADERS_DROPPED_HEADER),
            Some(AMQPValue::LongUInt(n)) if *n > 100
        ));
        let few = copied_headers(&BasicProperties::default());
        assert!(few.inner().is_empty());
    }

    #[test]
    fn config_defaults_are_valid_and_hide_passwords() {
        let config = WorkerConfig::default();
        assert!(config.validate().is_ok());
        let config = WorkerConfig {
            database_url: "postgres://u:hunter2@h/db".into(),
            amqp_url: "amqp://u:hunter2@h/%2f".into(),
            ..WorkerConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        let bad = WorkerConfig {
            app: "no spaces".into(),
            ..WorkerConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
