//! One delivery's path through the worker: decode, the trusted state from
//! Postgres for a redelivery, the handler (in its inbox transaction when
//! the listener has one), then an ack, a confirmed retry copy, or a failed
//! job plus a confirmed dead-letter copy. Framework steps that fail on the
//! database or the broker are tried again with backoff, holding the
//! message; they never count as a try.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use diesel::PgConnection;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, LongString};
use lapin::{BasicProperties, Channel};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::amqp::SessionLost;
use crate::consumer::attempts::{self, FailedMessage, FailureOutcome};
use crate::consumer::batch::Batcher;
use crate::consumer::headers::{
    ERROR_HEADER, FAILED_JOB_HEADER, MAX_ERROR_HEADER_BYTES, RETRY_HEADER, copied_headers, delivery_count,
    has_header,
};
use crate::consumer::inbox;
use crate::consumer::listener::{HandlerContext, HandlerRun, ListenerError, RateLimit, guarded};
use crate::consumer::message::{ReceivedEvent, decode};
use crate::consumer::topology::ListenerQueues;
use crate::database::PgPool;
use crate::delay::Backoff;
use crate::error::{Error, Result, error_chain};
use crate::metrics::{
    FAILED_JOBS_TOTAL, FOREIGN_EVENTS_TOTAL, Health, LISTENER_DURATION_SECONDS, LISTENER_OUTCOMES_TOTAL,
};
use crate::registry::QueuedRegistration;
use crate::upcast::Upcasters;

/// What every delivery task of one listener shares.
pub(crate) struct ListenerShared {
    pub(crate) registration: QueuedRegistration,
    pub(crate) queues: ListenerQueues,
    pub(crate) pool: PgPool,
    pub(crate) publisher: Arc<CopyPublisher>,
    pub(crate) health: Arc<Health>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) reconnect_max: Duration,
    /// Set for listeners whose deliveries run in batched transactions.
    pub(crate) batcher: Option<Batcher>,
    /// CloudEvents sources this worker applies; empty: any.
    pub(crate) accept_sources: Arc<[String]>,
    /// Brings old payload shapes to the current one before the handler.
    pub(crate) upcasters: Arc<Upcasters>,
    /// Foreign sources already logged (a bounded set).
    pub(crate) foreign_sources_seen: std::sync::Mutex<HashSet<String>>,
    /// Deliveries in each waiting step, for the shutdown's report of what
    /// outlived the shutdown timeout.
    pub(crate) waiting: WaitingSteps,
    /// Told when an ack did not complete: the loop then ends the session.
    pub(crate) ack_timed_out: tokio::sync::Notify,
}

/// How many deliveries of a listener wait in each step of the pipeline.
#[derive(Debug, Default)]
pub(crate) struct WaitingSteps {
    handler: AtomicUsize,
    database: AtomicUsize,
    publish: AtomicUsize,
    ack: AtomicUsize,
}

impl WaitingSteps {
    /// `"2 in the handler, 1 publishing a copy"`; `None` when idle.
    pub(crate) fn describe(&self) -> Option<String> {
        let steps = [
            (&self.handler, "in the handler"),
            (&self.database, "in a database step"),
            (&self.publish, "publishing a copy"),
            (&self.ack, "acknowledging"),
        ];
        let busy: Vec<String> = steps
            .iter()
            .filter_map(|(n, what)| {
                let n = n.load(AtomicOrdering::Relaxed);
                (n > 0).then(|| format!("{n} {what}"))
            })
            .collect();
        (!busy.is_empty()).then(|| busy.join(", "))
    }
}

/// Counts a delivery in one step while alive.
struct InStep<'a>(&'a AtomicUsize);

impl<'a> InStep<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, AtomicOrdering::Relaxed);
        Self(counter)
    }
}

impl Drop for InStep<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

/// Foreign sources remembered for logging once each; past this many, no
/// more are logged (the counter still counts them).
const MAX_FOREIGN_SOURCES_LOGGED: usize = 100;

impl ListenerShared {
    fn accepts_source(&self, source: &str) -> bool {
        self.accept_sources.is_empty() || self.accept_sources.iter().any(|s| s == source)
    }

    /// Whether `source` is logged now: the first time, while the set of
    /// remembered sources is not full.
    fn first_sight_of(&self, source: &str) -> bool {
        let Ok(mut seen) = self.foreign_sources_seen.lock() else {
            return false;
        };
        seen.len() < MAX_FOREIGN_SOURCES_LOGGED && seen.insert(source.to_owned())
    }
}

pub(crate) struct ListenerLoop {
    pub(crate) shared: Arc<ListenerShared>,
    pub(crate) channel: Channel,
    pub(crate) consumer: lapin::Consumer,
    pub(crate) tag: String,
}

impl ListenerLoop {
    /// Takes deliveries while a concurrency slot is free; returns why the
    /// broker side ended it (`Ok` when asked to stop). Waits for its
    /// handlers before returning (aborted by the session after the shutdown
    /// timeout).
    pub(crate) async fn run(mut self) -> std::result::Result<(), SessionLost> {
        let options = self.shared.registration.options().clone();
        // Batched deliveries wait for their batch without a thread of their
        // own: the prefetch window bounds them, the batcher the threads.
        let in_flight = if self.shared.batcher.is_some() {
            usize::from(options.prefetch)
        } else {
            options.concurrency
        };
        let slots = Arc::new(Semaphore::new(in_flight));
        let limiter = options.rate_limit.map(rate_limiter);
        let mut tasks = JoinSet::new();
        let mut stop = self.shared.stop.clone();
        let ended = loop {
            let permit = tokio::select! {
                _ = stop.changed() => break Ok(()),
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    // Never closed: the loop owns the semaphore.
                    Err(_) => break Ok(()),
                },
            };
            if let Some(limiter) = &limiter {
                // Deliveries beyond the rate stay with the broker (and in
                // the prefetch window), not in this process.
                tokio::select! {
                    _ = stop.changed() => break Ok(()),
                    () = limiter.until_ready() => {}
                }
            }
            let next = tokio::select! {
                _ = stop.changed() => break Ok(()),
                () = self.shared.ack_timed_out.notified() => {
                    break Err(SessionLost::AckTimedOut(self.shared.queues.queue.clone()));
                }
                next = self.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle_delivery(Arc::clone(&self.shared), delivery, permit));
                }
                Some(Err(source)) => {
                    break Err(SessionLost::Consumer {
                        queue: self.shared.queues.queue.clone(),
                        source,
                    });
                }
                None => break Err(SessionLost::ConsumerCancelled(self.shared.queues.queue.clone())),
            }
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
        };
        while tasks.join_next().await.is_some() {}
        ended
    }
}

/// A token bucket for a listener's [`RateLimit`].
fn rate_limiter(limit: RateLimit) -> DefaultDirectRateLimiter {
    let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

/// The publish channel (confirm mode) for retry and dead-letter copies.
pub(crate) struct CopyPublisher {
    pub(crate) channel: Channel,
    pub(crate) confirm_timeout: Duration,
}

impl CopyPublisher {
    /// Publishes to `queue` through the default exchange and waits for the
    /// broker's confirm; a return (no such queue) or nack is an error.
    async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<()> {
        crate::amqp::publish_to_queue(&self.channel, queue, body, properties, self.confirm_timeout).await
    }
}

/// How long an ack may take. An ack is one frame, written at once; but
/// an ack sent as the connection is reset may never resolve (seen with
/// lapin 4.12 when a cluster node stopped: the session then waited out its
/// whole shutdown timeout before reconnecting). Past this bound it counts
/// as not acknowledged, and the session ends (the message comes back once
/// the connection is closed).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why processing stopped without an ack.
struct Stopped;

async fn handle_delivery(shared: Arc<ListenerShared>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let permit = Arc::new(permit);
    let listener = shared.registration.name().to_owned();
    let span = handle_span(&listener, &delivery);
    let outcome = process(&shared, &delivery, &permit)
        .instrument(span.clone())
        .await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(Stopped) => {
            span.record("outbox.outcome", "returned");
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => "returned")
                .increment(1);
            return;
        }
    };
    let acking = InStep::enter(&shared.waiting.ack);
    let acked = tokio::time::timeout(ACK_TIMEOUT, delivery.acker.ack(BasicAckOptions::default())).await;
    drop(acking);
    match acked {
        Ok(Ok(true)) => {
            end_handle_span(&span, outcome);
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => outcome)
                .increment(1);
        }
        Ok(Ok(false) | Err(_)) | Err(_) => {
            // The channel is gone: the message comes back, and the inbox,
            // the attempt count or the failed job makes that harmless.
            span.record("outbox.outcome", "returned");
            if acked.is_err() {
                // Whatever holds the ack holds the connection: start over
                // with a fresh session, which gives every unacknowledged
                // message back.
                tracing::warn!(listener = %listener, timeout = ?ACK_TIMEOUT, "an ack did not complete; starting a new broker session, the message will be redelivered");
                shared.ack_timed_out.notify_one();
            } else {
                tracing::warn!(listener = %listener, "could not acknowledge a message (channel closed); it will be redelivered");
            }
            metrics::counter!(LISTENER_OUTCOMES_TOTAL, "listener" => listener, "outcome" => "returned")
                .increment(1);
        }
    }
}

/// The `handle <listener>` span of one delivery, child of the context
/// the message carries (its `traceparent` header), while exporting
/// traces; a disabled span otherwise. The attempt and the outcome are
/// recorded as the pipeline learns them.
#[cfg(feature = "otel")]
fn handle_span(listener: &str, delivery: &Delivery) -> tracing::Span {
    use crate::telemetry;
    if !telemetry::is_active() {
        return tracing::Span::none();
    }
    let header = |name: &str| {
        delivery.properties.headers().as_ref().and_then(|headers| {
            headers.inner().iter().find_map(|(key, value)| match value {
                AMQPValue::LongString(text) if key.as_str() == name => {
                    std::str::from_utf8(text.as_bytes()).ok()
                }
                _ => None,
            })
        })
    };
    let span = tracing::info_span!(
        target: "outbox::consumer",
        "handle",
        otel.name = format!("handle {listener}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.message.id = delivery.properties.message_id().as_ref().map(|id| id.as_str()),
        messaging.rabbitmq.redelivered = delivery.redelivered,
        outbox.listener = listener,
        outbox.event_type = delivery.properties.kind().as_ref().map(|kind| kind.as_str()),
        outbox.attempt = tracing::field::Empty,
        outbox.outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    telemetry::set_parent_from(&span, header("traceparent"));
    let _ = telemetry::record_ids(&span);
    span
}

#[cfg(not(feature = "otel"))]
fn handle_span(_listener: &str, _delivery: &Delivery) -> tracing::Span {
    tracing::Span::none()
}

/// Records the acknowledged `outcome` on the handling's span; a try that
/// failed (retried, or failed for good) is an error.
fn end_handle_span(span: &tracing::Span, outcome: &'static str) {
    span.record("outbox.outcome", outcome);
    #[cfg(feature = "otel")]
    match outcome {
        "failed" => crate::telemetry::mark_error(span, "listener failed for good; recorded in failed_jobs"),
        "retry" => crate::telemetry::mark_error(span, "listener failed; retry scheduled"),
        _ => {}
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
    let (event, upcast) = match decode(&delivery.data) {
        Ok(mut event) => {
            let upcast = shared.upcasters.upcast(&mut event);
            (Arc::new(event), upcast)
        }
        Err(error) => {
            let text = format!("cannot decode message: {error}");
            return fail_malformed(shared, delivery, None, &text).await;
        }
    };
    if !shared.accepts_source(&event.source) {
        return set_aside_foreign(shared, delivery, &event).await;
    }
    if let Err(error) = upcast {
        return fail_event(shared, delivery, &event, &error.to_string(), true, None).await;
    }
    if !shared.registration.handles(&event.event_type) {
        let text = format!(
            "listener {listener} does not handle {} events (it handles {})",
            event.event_type,
            shared.registration.event_types().join(", ")
        );
        return fail_event(shared, delivery, &event, &text, true, None).await;
    }
    let mut previous = 0;
    let retried = has_header(&delivery.properties, RETRY_HEADER);
    if delivery.redelivered || retried {
        let (name, id) = (listener.to_owned(), event.event_id);
        let state = db_step(shared, move |conn| attempts::delivery_state(conn, &name, id)).await?;
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
            return fail_event(shared, delivery, &event, &text, true, None).await;
        }
    }
    let attempt = previous + 1;
    tracing::Span::current().record("outbox.attempt", attempt);
    let mut wait = Backoff::new(Duration::from_millis(100), shared.reconnect_max);
    let mut busy_wait = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        let started = Instant::now();
        // A deferred copy may have an attempts row with no failure in it.
        let run = run_handler(shared, &event, attempt, previous > 0 || retried, permit).await;
        metrics::histogram!(LISTENER_DURATION_SECONDS, "listener" => listener.to_owned())
            .record(started.elapsed().as_secs_f64());
        match run {
            HandlerRun::Done { duplicate } => {
                shared.health.set_database_ok(true);
                if duplicate {
                    // Rare outside crashes and republishes; fault runs
                    // count these lines as deliveries more than once.
                    tracing::info!(listener, event_id = %event.event_id, event_type = %event.event_type, "duplicate delivery: the inbox already holds this event; acknowledged without running the listener");
                }
                if (previous > 0 || retried) && !options.inbox {
                    let (name, id) = (listener.to_owned(), event.event_id);
                    db_step(shared, move |conn| attempts::clear_attempts(conn, &name, id)).await?;
                }
                return Ok(if duplicate { "duplicate" } else { "success" });
            }
            HandlerRun::Failed(ListenerError::Deferred { reason, at_least })
                if shared.queues.retry_queue_at_least(at_least).is_some() =>
            {
                let reason = error_chain(reason.as_ref());
                tracing::debug!(listener, event_id = %event.event_id, %reason, at_least = ?at_least, "deferred, not counted as a try");
                return defer(shared, delivery, &event, previous, at_least).await;
            }
            HandlerRun::Failed(error) => {
                let permanent = error.is_permanent();
                let text = error.to_string();
                tracing::warn!(listener, event_id = %event.event_id, event_type = %event.event_type, attempt, tries = options.tries, permanent, error = %text, "listener failed");
                return fail_event(shared, delivery, &event, &text, permanent, error.at_least()).await;
            }
            HandlerRun::Busy => {
                tracing::debug!(listener, event_id = %event.event_id, retry_in = ?busy_wait.upcoming(), "another delivery of this event is being handled; waiting");
                pause(shared, &mut busy_wait).await?;
            }
            HandlerRun::Infrastructure(reason) => {
                shared.health.set_database_ok(false);
                tracing::warn!(listener, event_id = %event.event_id, %reason, retry_in = ?wait.upcoming(), "cannot run the listener; holding the message");
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
    at_least: Option<Duration>,
) -> std::result::Result<&'static str, Stopped> {
    let options = shared.registration.options();
    let tries = options.tries;
    let (listener, queue) = (shared.registration.name().to_owned(), shared.queues.queue.clone());
    let (event_id, event_type) = (event.event_id, event.event_type.clone());
    let body = delivery.data.clone();
    let error_text = error.to_owned();
    // The retry queue after `failures` failed tries: the backoff delay's,
    // or with `at_least` the smallest queue holding at least both.
    let retry_after = |failures: u32| {
        let delay = options.delay_after(failures);
        match at_least {
            Some(at_least) => shared.queues.retry_queue_at_least(delay.max(at_least)),
            None => shared.queues.retry_queue(delay).map(|queue| (delay, queue)),
        }
    };
    let schedule: attempts::RetrySchedule = (1..tries)
        .map(|failures| {
            let (delay, queue) = retry_after(failures).unwrap_or((options.delay_after(failures), ""));
            (delay, queue.to_owned())
        })
        .collect();
    let outcome = db_step(shared, move |conn| {
        attempts::record_failure(
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
            &schedule,
        )
    })
    .await?;
    match outcome {
        FailureOutcome::Retry { attempts } => {
            let Some((delay, retry_queue)) = retry_after(attempts) else {
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
            publish_step(
                shared,
                retry_queue,
                &delivery.data,
                retry_properties(delivery, attempts),
            )
            .await?;
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

/// A deferred event ([`ListenerError::Deferred`]): its copy goes to the
/// retry queue of at least `at_least` with the retry marker and no failed
/// try counted (see [`attempts::note_deferred`] for the repairer).
async fn defer(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    event: &Arc<ReceivedEvent>,
    previous: u32,
    at_least: Duration,
) -> std::result::Result<&'static str, Stopped> {
    let Some((delay, retry_queue)) = shared.queues.retry_queue_at_least(at_least) else {
        // The caller checked there is one.
        return fail_event(
            shared,
            delivery,
            event,
            "deferred, but the listener has no retry queue",
            false,
            None,
        )
        .await;
    };
    let retry_queue = retry_queue.to_owned();
    if previous > 0 {
        let (listener, event_id) = (shared.registration.name().to_owned(), event.event_id);
        let noted_queue = retry_queue.clone();
        db_step(shared, move |conn| {
            attempts::note_deferred(conn, &listener, event_id, &noted_queue, delay)
        })
        .await?;
    }
    publish_step(
        shared,
        &retry_queue,
        &delivery.data,
        retry_properties(delivery, previous),
    )
    .await?;
    Ok("deferred")
}

/// The properties of `delivery`'s retry copy after `attempts` failed tries.
fn retry_properties(delivery: &Delivery, attempts: u32) -> BasicProperties {
    let mut headers = copied_headers(&delivery.properties);
    headers.insert(RETRY_HEADER.into(), AMQPValue::LongInt(attempts.min(1000) as i32));
    delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
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
        attempts::record_malformed(conn, &listener, &queue, event_type.as_deref(), &body, &error_text)
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

/// An event from a source this worker does not accept: never applied,
/// counted, logged once per source, and dead-lettered with the reason (no
/// failed job: it was not this listener's to fail).
async fn set_aside_foreign(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    event: &ReceivedEvent,
) -> std::result::Result<&'static str, Stopped> {
    let listener = shared.registration.name();
    let source = crate::text::prefix_within(&event.source, 200).to_owned();
    metrics::counter!(FOREIGN_EVENTS_TOTAL, "listener" => listener.to_owned(), "source" => source.clone())
        .increment(1);
    let text = format!(
        "event {} comes from source {source}; this worker accepts only {}",
        event.event_id,
        shared.accept_sources.join(", ")
    );
    if shared.first_sight_of(&source) {
        tracing::warn!(listener, %source, "events from a source this worker does not accept are dead-lettered, not applied (logged once per source)");
    }
    publish_dead_letter_copy(shared, delivery, None, &text).await?;
    Ok("foreign")
}

async fn dead_letter(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    job_id: i64,
    error: &str,
) -> std::result::Result<(), Stopped> {
    publish_dead_letter_copy(shared, delivery, Some(job_id), error).await
}

/// Publishes the dead-letter copy of `delivery` with its failed job (if
/// one was recorded) and the bounded error in headers.
async fn publish_dead_letter_copy(
    shared: &Arc<ListenerShared>,
    delivery: &Delivery,
    job_id: Option<i64>,
    error: &str,
) -> std::result::Result<(), Stopped> {
    let mut headers = copied_headers(&delivery.properties);
    if let Some(job_id) = job_id {
        headers.insert(FAILED_JOB_HEADER.into(), AMQPValue::LongLongInt(job_id));
    }
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
    if let Some(batcher) = &shared.batcher {
        let _waiting = InStep::enter(&shared.waiting.handler);
        return batcher.run(Arc::clone(event), attempt, clear_attempts).await;
    }
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
            let delivery = inbox::InboxTry {
                event: &event,
                attempt,
                clear_attempts,
            };
            inbox::handle_in_transaction(&pool, listener.as_ref(), &delivery, &options)
        } else {
            let mut ctx = HandlerContext::with_pool(Some(&pool), attempt, options.tries);
            match guarded(|| listener.handle(&event, &mut ctx)) {
                Ok(()) => HandlerRun::Done { duplicate: false },
                Err(error) => HandlerRun::Failed(error),
            }
        }
    });
    let timeout = shared.registration.options().timeout;
    let _waiting = InStep::enter(&shared.waiting.handler);
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(run)) => run,
        Ok(Err(join)) => HandlerRun::Failed(ListenerError::transient(format!("handler task failed: {join}"))),
        Err(_) => HandlerRun::Failed(ListenerError::transient(format!(
            "handler timed out after {timeout:?}"
        ))),
    }
}

/// Runs a framework database step on the blocking pool, waiting with
/// backoff while the database is unreachable; [`Stopped`] on shutdown.
async fn db_step<T: Send + 'static>(
    shared: &Arc<ListenerShared>,
    work: impl Fn(&mut PgConnection) -> Result<T> + Send + Sync + 'static,
) -> std::result::Result<T, Stopped> {
    let work = Arc::new(work);
    let mut wait = Backoff::new(Duration::from_millis(100), shared.reconnect_max);
    loop {
        let pool = shared.pool.clone();
        let step = Arc::clone(&work);
        let waiting = InStep::enter(&shared.waiting.database);
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            step(&mut conn)
        })
        .await
        .unwrap_or_else(|e| Err(Error::BlockingTask(e)));
        drop(waiting);
        match result {
            Ok(value) => {
                shared.health.set_database_ok(true);
                return Ok(value);
            }
            Err(error) => {
                shared.health.set_database_ok(false);
                tracing::warn!(listener = shared.registration.name(), error = %error_chain(&error), retry_in = ?wait.upcoming(), "database step failed; holding the message");
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
    let mut wait = Backoff::new(Duration::from_millis(100), shared.reconnect_max);
    loop {
        let waiting = InStep::enter(&shared.waiting.publish);
        let published = shared
            .publisher
            .publish_to_queue(queue, body, properties.clone())
            .await;
        drop(waiting);
        match published {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(listener = shared.registration.name(), queue, error = %error_chain(&error), retry_in = ?wait.upcoming(), "publish failed; holding the message");
                if !shared.publisher.channel.status().connected() {
                    return Err(Stopped);
                }
                pause(shared, &mut wait).await?;
            }
        }
    }
}

/// Waits the backoff's next delay, or returns [`Stopped`] when the worker
/// stops.
async fn pause(shared: &Arc<ListenerShared>, wait: &mut Backoff) -> std::result::Result<(), Stopped> {
    let mut stop = shared.stop.clone();
    if *stop.borrow() {
        return Err(Stopped);
    }
    tokio::select! {
        _ = stop.changed() => return Err(Stopped),
        () = tokio::time::sleep(wait.next_delay()) => {}
    }
    if *stop.borrow() { Err(Stopped) } else { Ok(()) }
}
