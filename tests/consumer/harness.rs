//! Scripted listeners and a worker running in the test's runtime.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::{Registry, TestDatabase, Worker, WorkerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use outbox::testing::eventually;

use crate::broker::{TestBroker, amqp_url};

/// One call of a scripted listener.
#[derive(Debug, Clone)]
pub struct Call {
    pub event_id: Uuid,
    pub attempt: u32,
    pub at: Instant,
}

type Behavior =
    dyn Fn(&ReceivedEvent, &mut HandlerContext<'_>, usize) -> Result<(), ListenerError> + Send + Sync;

/// A listener whose behaviour is a closure of (event, context, how many
/// calls came before for this event).
#[derive(Clone)]
pub struct Scripted {
    pub name: String,
    pub calls: Arc<Mutex<Vec<Call>>>,
    behavior: Arc<Behavior>,
}

impl Scripted {
    pub fn new(
        name: &str,
        behavior: impl Fn(&ReceivedEvent, &mut HandlerContext<'_>, usize) -> Result<(), ListenerError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            name: name.to_owned(),
            calls: Arc::default(),
            behavior: Arc::new(behavior),
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn calls_for(&self, event_id: Uuid) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.event_id == event_id)
            .collect()
    }
}

impl QueuedListener for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let before = {
            let mut calls = self.calls.lock().unwrap();
            let before = calls.iter().filter(|c| c.event_id == event.event_id).count();
            calls.push(Call {
                event_id: event.event_id,
                attempt: ctx.attempt(),
                at: Instant::now(),
            });
            before
        };
        (self.behavior)(event, ctx, before)
    }
}

/// Writes the listener's effect: one `effects` row.
pub fn effect(
    ctx: &mut HandlerContext<'_>,
    listener: &str,
    event: &ReceivedEvent,
) -> Result<(), ListenerError> {
    diesel::sql_query("INSERT INTO effects (listener, event_id) VALUES ($1, $2)")
        .bind::<Text, _>(listener)
        .bind::<SqlUuid, _>(event.event_id)
        .execute(ctx.conn()?)?;
    Ok(())
}

/// A migrated database with an `effects` table.
pub fn database() -> (TestDatabase, PgConnection) {
    let (db, mut conn) = crate::support::database();
    diesel::sql_query("CREATE TABLE effects (listener TEXT NOT NULL, event_id UUID NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&mut conn)
        .unwrap();
    (db, conn)
}

/// Options with millisecond retries.
pub fn fast(tries: u32, backoff_ms: &[u64]) -> ListenerOptions {
    let backoff: Vec<Duration> = backoff_ms.iter().map(|ms| Duration::from_millis(*ms)).collect();
    ListenerOptions {
        timeout: Duration::from_secs(10),
        ..ListenerOptions::default().retries(tries, &backoff)
    }
}

/// A worker running in the background.
pub struct Running {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<outbox::Result<()>>>,
    pub queues: Vec<outbox::consumer::ListenerQueues>,
    pub health: std::sync::Arc<outbox::Health>,
}

impl Running {
    /// Declares the topology, starts a worker for `registry` and waits
    /// until every listener's consumer is attached.
    pub async fn start(db: &TestDatabase, broker: &mut TestBroker, registry: &Registry) -> Self {
        Self::start_with(db, broker, registry, |_| {}).await
    }

    pub async fn start_with(
        db: &TestDatabase,
        broker: &mut TestBroker,
        registry: &Registry,
        configure: impl FnOnce(&mut WorkerConfig),
    ) -> Self {
        crate::support::init_tracing();
        let mut config = WorkerConfig {
            database_url: db.url().to_owned(),
            amqp_url: amqp_url(),
            exchange: broker.exchange.clone(),
            app: broker.app.clone(),
            shutdown_timeout: Duration::from_secs(10),
            ..WorkerConfig::default()
        };
        configure(&mut config);
        let worker = Worker::new(config, registry).unwrap();
        let queues = worker.queues();
        let health = worker.health();
        broker.track(&queues);
        outbox::consumer::topology::declare(&broker.channel, &broker.exchange, &broker.app, registry)
            .await
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = rx.await;
                })
                .await
        });
        let running = Self {
            shutdown: Some(tx),
            task: Some(task),
            queues,
            health,
        };
        for queue in running.queues.iter().map(|q| q.queue.clone()) {
            wait_for_consumer(broker, &queue).await;
        }
        running
    }

    pub fn queue(&self, listener: &str) -> &outbox::consumer::ListenerQueues {
        self.queues.iter().find(|q| q.listener == listener).unwrap()
    }

    /// Asks the worker to stop and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("worker stops within 30 s")
                .unwrap()
                .unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("worker stops within 30 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn wait_for_consumer(broker: &TestBroker, queue: &str) {
    outbox::testing::eventually_async(
        &format!("a consumer on {queue}"),
        Duration::from_secs(20),
        || async {
            let declared = broker
                .channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            declared.consumer_count() > 0
        },
    )
    .await;
}

/// A relay publishing `db`'s events to `broker`'s exchange, in this
/// test's runtime, until [`RelayRunning::stop`].
pub struct RelayRunning {
    stop: oneshot::Sender<()>,
    task: JoinHandle<outbox::Result<()>>,
}

impl RelayRunning {
    pub fn start(db: &TestDatabase, broker: &TestBroker) -> Self {
        let relay = outbox::Relay::new(outbox::RelayConfig {
            database_url: db.url().to_owned(),
            amqp_url: amqp_url(),
            exchange: broker.exchange.clone(),
            poll_max: Duration::from_millis(20),
            ..outbox::RelayConfig::default()
        })
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}
