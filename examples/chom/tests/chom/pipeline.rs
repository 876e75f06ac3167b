//! The whole flow in one test: CHOM's database, a relay and a worker in
//! this process, and a private exchange and queues on the real RabbitMQ,
//! deleted at the end (also on panic).

use std::sync::Arc;
use std::time::Duration;

use chom::listeners::{DatabaseNotifier, ListenerConfig, OutageSwitch, SwitchableNotifier};
use chom::work::WorkConfig;
use diesel::prelude::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use outbox::consumer::ListenerQueues;
use outbox::{DEFAULT_AMQP_URL, Outbox, Relay, RelayConfig, TestDatabase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// The test's exchange and queue prefix; deletes its queues and exchange
/// when dropped, from a fresh thread with its own runtime.
pub struct BrokerNames {
    pub exchange: String,
    pub app: String,
    /// CHOM's listeners' queues.
    pub queues: Vec<ListenerQueues>,
    /// The webhook listeners' queues (`chom work` declares them too).
    pub webhook_queues: Vec<ListenerQueues>,
}

impl BrokerNames {
    pub fn new(listeners: &ListenerConfig) -> Self {
        let id = Uuid::now_v7().simple().to_string();
        let app = format!("outbox_test.chom{}", &id[20..]);
        let registry = chom::listeners::registry(listeners).unwrap();
        let queues = outbox::consumer::topology::plan(&app, &registry).unwrap();
        // `chom work` (the binary) runs the webhook listeners too.
        let binary = chom::work::registry(&WorkConfig {
            listeners: listeners.clone(),
            ..WorkConfig::default()
        })
        .unwrap();
        let webhook_queues = outbox::consumer::topology::plan(&app, &binary)
            .unwrap()
            .into_iter()
            .filter(|planned| !queues.iter().any(|q| q.listener == planned.listener))
            .collect();
        Self {
            exchange: format!("outbox_test.{id}"),
            app,
            queues,
            webhook_queues,
        }
    }

    pub fn queue(&self, listener: &str) -> &ListenerQueues {
        self.queues.iter().find(|q| q.listener == listener).unwrap()
    }
}

impl Drop for BrokerNames {
    fn drop(&mut self) {
        let queues: Vec<String> = self
            .queues
            .iter()
            .chain(&self.webhook_queues)
            .flat_map(|q| q.all_queues().into_iter().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        outbox::testing::delete_broker_objects(&amqp_url(), &queues, std::slice::from_ref(&self.exchange));
    }
}

/// A background task stopped through a watch channel.
pub struct Background {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<outbox::Result<()>>>,
}

impl Background {
    pub fn spawn<F>(run: impl FnOnce(watch::Receiver<bool>) -> F) -> Self
    where
        F: std::future::Future<Output = outbox::Result<()>> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(rx));
        Self {
            stop,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("stops within 30 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Everything one end-to-end test needs.
pub struct Pipeline {
    pub db: TestDatabase,
    pub conn: PgConnection,
    pub outbox: Outbox,
    pub broker: BrokerNames,
    pub notifier: OutageSwitch,
    pub listeners: ListenerConfig,
    pub relay: Option<Background>,
    pub worker: Option<Background>,
}

/// Millisecond retries: 3 tries, 100 ms then 200 ms.
pub fn fast_retries() -> Option<(u32, Vec<Duration>)> {
    Some((3, vec![Duration::from_millis(100), Duration::from_millis(200)]))
}

impl Pipeline {
    /// A migrated database, the topology declared, the relay running, and
    /// (with `worker`) a worker with millisecond retries.
    pub async fn start(worker: bool) -> Self {
        init_tracing();
        let (db, conn) = crate::support::setup();
        let (notifier, switch) = SwitchableNotifier::new(DatabaseNotifier);
        let listeners = ListenerConfig {
            notifier: Arc::new(notifier),
            retries: fast_retries(),
            concurrency: Some(2),
        };
        let broker = BrokerNames::new(&listeners);
        declare(&broker, &listeners).await;
        let registry = chom::listeners::registry(&listeners).unwrap();
        let outbox = Outbox::builder().registry(registry).build().unwrap();
        let mut pipeline = Self {
            db,
            conn,
            outbox,
            broker,
            notifier: switch,
            listeners,
            relay: None,
            worker: None,
        };
        pipeline.relay = Some(pipeline.start_relay());
        if worker {
            pipeline.worker = Some(pipeline.start_worker().await);
        }
        pipeline
    }

    fn start_relay(&self) -> Background {
        let relay = Relay::new(RelayConfig {
            database_url: self.db.url().to_owned(),
            amqp_url: amqp_url(),
            exchange: self.broker.exchange.clone(),
            poll_max: Duration::from_millis(50),
            backoff_initial: Duration::from_millis(100),
            ..RelayConfig::default()
        })
        .unwrap();
        Background::spawn(move |rx| async move { relay.run(stopped(rx)).await })
    }

    pub fn work_config(&self) -> WorkConfig {
        WorkConfig {
            webhooks: None,
            database_url: self.db.url().to_owned(),
            amqp_url: amqp_url(),
            exchange: self.broker.exchange.clone(),
            app: self.broker.app.clone(),
            listeners: self.listeners.clone(),
            only: Vec::new(),
            metrics_addr: None,
            shutdown_timeout: Duration::from_secs(10),
            accept_sources: Vec::new(),
            quorum_initial_group_size: None,
        }
    }

    /// Starts a worker and waits until it consumes every queue.
    pub async fn start_worker(&self) -> Background {
        let worker = chom::work::worker(&self.work_config()).unwrap();
        let background = Background::spawn(move |rx| async move { worker.run(stopped(rx)).await });
        for queues in &self.broker.queues {
            wait_for_consumers(&queues.queue, 1).await;
        }
        background
    }

    /// Stops the worker and the relay.
    pub async fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        if let Some(relay) = self.relay.take() {
            relay.stop().await;
        }
    }
}

async fn declare(broker: &BrokerNames, listeners: &ListenerConfig) {
    let connection = outbox::amqp::connect(&amqp_url(), "chom test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let registry = chom::listeners::registry(listeners).unwrap();
    outbox::consumer::topology::declare(&channel, &broker.exchange, &broker.app, &registry)
        .await
        .unwrap();
    let _ = connection.close(200, "declared".into()).await;
}

/// Messages ready in `queue` and its consumers.
pub async fn queue_state(queue: &str) -> (u32, u32) {
    let connection = outbox::amqp::connect(&amqp_url(), "chom test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
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
    let _ = connection.close(200, "checked".into()).await;
    (declared.message_count(), declared.consumer_count())
}

/// Waits until `queue` has at least `count` consumers.
pub async fn wait_for_consumers(queue: &str, count: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while queue_state(queue).await.1 < count {
        assert!(tokio::time::Instant::now() < deadline, "no consumer on {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `queue` holds `count` messages.
pub async fn wait_for_messages(queue: &str, count: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, _) = queue_state(queue).await;
        if ready == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} holds {ready} messages, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `sql` (a count as `n`) until it equals `expected`, for at most
/// 30 s.
pub async fn wait_for_count(conn: &mut PgConnection, sql: &str, expected: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = crate::support::count(conn, sql);
        if n == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql}: {n}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("RUST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
        }
    });
}
