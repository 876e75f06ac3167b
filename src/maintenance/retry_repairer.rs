//! The retry repairer (run by the worker that owns the listeners): finds
//! retry copies the broker did not hand back in time and moves them on.
//!
//! A failed try's copy waits in `<app>.<listener>.retry.<delay>`, a quorum
//! queue whose TTL dead-letters it back to the listener's queue. When that
//! dead-letter path breaks, RabbitMQ keeps the copy: an expired message of
//! a quorum queue with at-least-once dead-lettering leaves the queue's
//! ready messages (no `basic.get`, no count shows it) and waits in the
//! queue's dead-letter worker, which tries again only every
//! `dead_letter_worker_publisher_confirm_timeout` (180 s by default) and
//! never while the target exchange "does not exist". RabbitMQ 3.10 logged
//! exactly that for the default exchange after a node restart; the event
//! was then neither lost nor handled, silently (issue 27).
//!
//! So the broker cannot be asked where the copy is; the worker's own
//! record can. When a try fails and the event is retried, the worker's
//! `listener_attempts` row keeps the retry queue, when the copy is due
//! back (`retry_due_at`, now plus the delay) and the message itself. Every
//! [`WorkerConfig::retry_repair_interval`] (default 15 s) this service
//! looks for its listeners' rows due more than
//! [`WorkerConfig::retry_repair_grace`] (default 60 s) ago: copies that
//! should have come back and were not handled since (handling deletes the
//! row or writes the next try's). It
//!
//! - sets `outbox_retry_copies_overdue{listener,queue}` to how many each
//!   retry queue holds past its delay and the grace (0 again once none);
//! - logs once per episode, per retry queue, with the count (WARN), and
//!   when the queue is clear again (INFO);
//! - when the listener's own queue has no ready message (so the copy is
//!   not simply waiting there behind a backlog), publishes each overdue
//!   copy to that queue, with a publisher confirm and the retry marker (the
//!   worker reads the tries so far from Postgres, as for any retried copy),
//!   then notes the repair on the row (`retry_repairs`, `retry_due_at` =
//!   now, so a repaired copy not handled within the grace is repaired
//!   again), and counts `outbox_retry_copies_repaired_total{listener,queue}`.
//!
//! A copy is repaired at most [`MAX_REPAIRS`] times; past that it stays
//! counted as overdue (the alert fires) for an operator. Rows are taken
//! `FOR UPDATE SKIP LOCKED`, so workers running the same listener do not
//! repair the same copy at once. The stuck original may still be
//! forwarded later (RabbitMQ's dead-letter worker tries again): the
//! listener then sees the event twice, which its inbox makes a no-op (an
//! effect outside the database is, as always, at least once).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::Connection as _;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Binary, Double, Integer, Text, Uuid as SqlUuid};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use uuid::Uuid;

use super::{MaintenanceService, Step};
use crate::amqp::BrokerConnector;
use crate::cloudevents::CONTENT_TYPE;
use crate::consumer::{ListenerQueues, RETRY_HEADER, WorkerConfig};
use crate::error::{Error, Result, Unconfirmed};
use crate::metrics as m;

/// Repairs of one copy before it is left to an operator.
pub(crate) const MAX_REPAIRS: i32 = 3;

/// Overdue copies repaired per step (a full batch runs the next step at
/// once).
const REPAIR_BATCH: i64 = 100;

/// Header on a repaired copy: the retry queue it was stuck in.
pub const REPAIRED_FROM_HEADER: &str = "x-outbox-repaired-from";

/// One listener whose retry copies are watched.
#[derive(Debug, Clone)]
pub(crate) struct WatchedListener {
    listener: String,
    queue: String,
    retry_queues: Vec<String>,
}

/// Finds overdue retry copies of a worker's listeners and moves them on.
pub(crate) struct RetryRepairer {
    period: Duration,
    grace: Duration,
    confirm_timeout: Duration,
    listeners: Vec<WatchedListener>,
    broker: BrokerConnector,
    connection_name: String,
    runtime: tokio::runtime::Handle,
    session: Mutex<Option<Arc<Session>>>,
    /// Retry queues with overdue copies at the last step, and the copies
    /// repaired since their episode began.
    episodes: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for RetryRepairer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryRepairer")
            .field("period", &self.period)
            .field("grace", &self.grace)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl RetryRepairer {
    /// The repairer of `queues` (those with retry queues), for a worker
    /// configured with `config`, on the current tokio runtime. `None` when
    /// no listener retries.
    pub(crate) fn new(
        config: &WorkerConfig,
        period: Duration,
        queues: &[ListenerQueues],
    ) -> Result<Option<Self>> {
        let listeners: Vec<WatchedListener> = queues
            .iter()
            .filter(|queues| !queues.retries.is_empty())
            .map(|queues| WatchedListener {
                listener: queues.listener.clone(),
                queue: queues.queue.clone(),
                retry_queues: queues.retries.iter().map(|(_, name)| name.clone()).collect(),
            })
            .collect();
        if listeners.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            period,
            grace: config.retry_repair_grace,
            confirm_timeout: config.confirm_timeout,
            listeners,
            broker: BrokerConnector::new(&config.amqp_url)?,
            connection_name: format!("outbox-worker {} retry repairer", config.worker_id),
            runtime: tokio::runtime::Handle::current(),
            session: Mutex::new(None),
            episodes: Mutex::new(HashMap::new()),
        }))
    }

    /// The repairer's own connection with a confirm-mode channel, opened
    /// when there is none or it was lost.
    async fn session(&self) -> Result<Arc<Session>> {
        if let Some(session) = self.session.lock().ok().and_then(|session| session.clone())
            && session.connection.status().connected()
            && session.channel.status().connected()
        {
            return Ok(session);
        }
        let connection = self.broker.connect(&self.connection_name).await?;
        let channel = crate::amqp::open_channel(&connection, true).await?;
        let session = Arc::new(Session { connection, channel });
        if let Ok(mut kept) = self.session.lock() {
            *kept = Some(Arc::clone(&session));
        }
        Ok(session)
    }

    /// Runs broker work `what` on the worker's runtime from this blocking
    /// thread, bounded (a broker that stopped answering, or a connect to a
    /// blackholed address, must not hold the step, and with it the
    /// worker's shutdown). A failure drops the session.
    fn on_broker<T>(&self, what: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let limit = self.confirm_timeout.saturating_add(Duration::from_secs(10));
        let done = self
            .runtime
            .block_on(async { tokio::time::timeout(limit, work).await })
            .unwrap_or_else(|_| {
                Err(Error::Unconfirmed {
                    context: format!("retry repairer: {what}"),
                    reason: Unconfirmed::TimedOut(limit),
                })
            });
        if done.is_err() {
            self.forget_session();
        }
        done
    }

    fn forget_session(&self) {
        if let Ok(mut session) = self.session.lock() {
            *session = None;
        }
    }

    /// Sets the gauges and logs episodes from `overdue`, `(listener, retry
    /// queue) -> copies`.
    fn report(&self, overdue: &HashMap<(String, String), i64>) {
        let Ok(mut episodes) = self.episodes.lock() else {
            return;
        };
        for watched in &self.listeners {
            for retry_queue in &watched.retry_queues {
                let count = overdue
                    .get(&(watched.listener.clone(), retry_queue.clone()))
                    .copied()
                    .unwrap_or(0);
                metrics::gauge!(m::RETRY_COPIES_OVERDUE, "listener" => watched.listener.clone(), "queue" => retry_queue.clone())
                    .set(count as f64);
                match (count > 0, episodes.contains_key(retry_queue)) {
                    (true, false) => {
                        tracing::warn!(
                            listener = %watched.listener,
                            queue = %retry_queue,
                            count,
                            grace = ?self.grace,
                            "retry copies overdue: the broker did not hand them back to {} after their delay (a broken dead-letter path?); moving them there",
                            watched.queue
                        );
                        episodes.insert(retry_queue.clone(), 0);
                    }
                    (false, true) => {
                        let repaired = episodes.remove(retry_queue).unwrap_or(0);
                        tracing::info!(listener = %watched.listener, queue = %retry_queue, repaired, "no retry copy overdue any more");
                    }
                    _ => {}
                }
            }
        }
    }

    fn note_repaired(&self, listener: &str, retry_queue: &str) {
        metrics::counter!(m::RETRY_COPIES_REPAIRED_TOTAL, "listener" => listener.to_owned(), "queue" => retry_queue.to_owned())
            .increment(1);
        if let Ok(mut episodes) = self.episodes.lock() {
            *episodes.entry(retry_queue.to_owned()).or_insert(0) += 1;
        }
    }

    /// Publishes the overdue copies of `watched` to its queue; returns how
    /// many were moved (a full batch means more may wait).
    fn repair(&self, conn: &mut PgConnection, watched: &WatchedListener) -> Result<usize> {
        let ready = self.on_broker("reading the listener's queue depth", async {
            let session = self.session().await?;
            crate::amqp::queue_depth(&session.connection, &watched.queue).await
        })?;
        if ready != Some(0) {
            // Messages wait in the listener's queue (or it is gone): the
            // copy may be among them. Look again next period.
            tracing::debug!(listener = %watched.listener, ready = ?ready, "retry copies overdue but the listener's queue is not empty; not repairing yet");
            return Ok(0);
        }
        conn.transaction(|conn| {
            let copies = diesel::sql_query(
                "SELECT event_id, attempts, retry_queue, retry_copy FROM listener_attempts
                 WHERE listener = $1 AND retry_due_at < now() - make_interval(secs => $2)
                   AND retry_copy IS NOT NULL AND retry_repairs < $3
                 ORDER BY retry_due_at
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED",
            )
            .bind::<Text, _>(&watched.listener)
            .bind::<Double, _>(self.grace.as_secs_f64())
            .bind::<Integer, _>(MAX_REPAIRS)
            .bind::<BigInt, _>(REPAIR_BATCH)
            .load::<StuckCopy>(conn)?;
            if copies.is_empty() {
                return Ok(0);
            }
            let published = self.on_broker("publishing overdue copies", async {
                let session = self.session().await?;
                let publishes = copies.iter().map(|copy| {
                    let channel = &session.channel;
                    async move { (copy, self.publish(channel, &watched.queue, copy).await) }
                });
                Ok(futures_util::future::join_all(publishes).await)
            })?;
            let mut repaired = Vec::new();
            for (copy, outcome) in &published {
                match outcome {
                    Ok(()) => repaired.push(copy.event_id),
                    Err(error) => {
                        tracing::warn!(listener = %watched.listener, event_id = %copy.event_id, error = %crate::error::error_chain(error), "cannot move an overdue retry copy; will try again");
                    }
                }
            }
            if repaired.len() < published.len() {
                self.forget_session();
            }
            diesel::sql_query(
                "UPDATE listener_attempts SET retry_due_at = now(), retry_repairs = retry_repairs + 1
                 WHERE listener = $1 AND event_id = ANY($2)",
            )
            .bind::<Text, _>(&watched.listener)
            .bind::<Array<SqlUuid>, _>(&repaired)
            .execute(conn)?;
            for (copy, outcome) in &published {
                if outcome.is_ok() {
                    self.note_repaired(&watched.listener, &copy.retry_queue);
                    tracing::info!(listener = %watched.listener, event_id = %copy.event_id, attempts = copy.attempts, from = %copy.retry_queue, to = %watched.queue, "overdue retry copy moved to the listener's queue");
                }
            }
            Ok(repaired.len())
        })
    }

    /// Publishes `copy` to `queue` as a retried message and waits for the
    /// confirm.
    async fn publish(&self, channel: &Channel, queue: &str, copy: &StuckCopy) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            RETRY_HEADER.into(),
            AMQPValue::LongInt(copy.attempts.clamp(0, 1000)),
        );
        headers.insert(
            REPAIRED_FROM_HEADER.into(),
            AMQPValue::LongString(copy.retry_queue.as_str().into()),
        );
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(copy.event_id.to_string().into())
            .with_app_id("outbox-retry-repairer".into())
            .with_headers(headers);
        crate::amqp::publish_to_queue(channel, queue, &copy.retry_copy, properties, self.confirm_timeout)
            .await
    }
}

/// The repairer's broker connection and its confirm-mode channel.
struct Session {
    connection: Connection,
    channel: Channel,
}

/// An overdue copy, as `listener_attempts` keeps it.
#[derive(QueryableByName)]
struct StuckCopy {
    #[diesel(sql_type = SqlUuid)]
    event_id: Uuid,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Text)]
    retry_queue: String,
    #[diesel(sql_type = Binary)]
    retry_copy: Vec<u8>,
}

/// Overdue copies per (listener, retry queue).
#[derive(QueryableByName)]
struct Overdue {
    #[diesel(sql_type = Text)]
    listener: String,
    #[diesel(sql_type = Text)]
    retry_queue: String,
    #[diesel(sql_type = BigInt)]
    copies: i64,
}

impl MaintenanceService for RetryRepairer {
    const NAME: &'static str = "retry_repairer";
    const ROWS_TOTAL: Option<&'static str> = None;

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let names: Vec<&str> = self.listeners.iter().map(|l| l.listener.as_str()).collect();
        let overdue = diesel::sql_query(
            "SELECT listener, retry_queue, count(*) AS copies FROM listener_attempts
             WHERE listener = ANY($1) AND retry_due_at < now() - make_interval(secs => $2)
               AND retry_queue IS NOT NULL
             GROUP BY listener, retry_queue",
        )
        .bind::<Array<Text>, _>(&names)
        .bind::<Double, _>(self.grace.as_secs_f64())
        .load::<Overdue>(conn)?;
        let overdue: HashMap<(String, String), i64> = overdue
            .into_iter()
            .map(|row| ((row.listener, row.retry_queue), row.copies))
            .collect();
        self.report(&overdue);
        let stuck: HashSet<&str> = overdue.keys().map(|(listener, _)| listener.as_str()).collect();
        let mut more = false;
        for watched in self
            .listeners
            .iter()
            .filter(|l| stuck.contains(l.listener.as_str()))
        {
            let taken = self.repair(conn, watched)?;
            more |= taken >= REPAIR_BATCH as usize;
        }
        Ok(Step { rows: 0, more })
    }
}
