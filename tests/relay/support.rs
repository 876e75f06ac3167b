//! Test fixtures: a database with events, a private exchange with a queue
//! bound to `#`, relays running in-process, and a TCP proxy that can cut
//! connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::Connection as _;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use outbox::{DomainEvent, Error, Relay, RelayConfig, TestDatabase};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const AMQP_URL: &str = outbox::DEFAULT_AMQP_URL;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticked {
    pub aggregate: String,
    pub n: i64,
}

impl DomainEvent for Ticked {
    fn event_type(&self) -> &'static str {
        "counter.ticked"
    }
    fn aggregate_type(&self) -> &'static str {
        "counter"
    }
    fn aggregate_id(&self) -> String {
        self.aggregate.clone()
    }
    fn tenant_id(&self) -> Option<String> {
        Some("tenant-1".into())
    }
}

/// Records one event per transaction and returns the event ids.
pub fn record_ticks(conn: &mut PgConnection, aggregate: &str, range: std::ops::Range<i64>) -> Vec<Uuid> {
    range
        .map(|n| {
            conn.transaction::<_, Error, _>(|conn| {
                outbox::record(
                    conn,
                    &Ticked {
                        aggregate: aggregate.to_owned(),
                        n,
                    },
                )
            })
            .unwrap()
        })
        .collect()
}

/// Records `per_aggregate` events on each of `aggregates`, interleaved, in
/// batches of one transaction per round.
pub fn record_interleaved(conn: &mut PgConnection, aggregates: usize, per_aggregate: i64) -> usize {
    let outbox = outbox::Outbox::new();
    for n in 0..per_aggregate {
        let envelopes: Vec<_> = (0..aggregates)
            .map(|a| {
                outbox
                    .envelope(
                        &Ticked {
                            aggregate: format!("a{a}"),
                            n,
                        },
                        &outbox::Metadata::system(),
                    )
                    .unwrap()
            })
            .collect();
        conn.transaction::<_, Error, _>(|conn| outbox.record_batch(conn, envelopes))
            .unwrap();
    }
    aggregates * per_aggregate as usize
}

pub fn scalar(conn: &mut PgConnection, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(sql).get_result::<N>(conn).expect(sql).n
}

pub fn unpublished(conn: &mut PgConnection) -> i64 {
    scalar(
        conn,
        "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
    )
}

/// Polls `check` until it holds or `deadline` passes.
pub async fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !check() {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message as the test queue received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub properties: BasicProperties,
    pub routing_key: String,
    pub body: serde_json::Value,
}

impl Received {
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    }
    pub fn aggregate(&self) -> String {
        self.body["subject"].as_str().unwrap_or_default().to_owned()
    }
}

/// A private exchange with one queue bound to `#`, consumed into memory.
/// Dropping it deletes both, even when the test panicked.
pub struct Broker {
    pub exchange: String,
    pub queue: String,
    connection: Option<Connection>,
    pub channel: Channel,
    received: Arc<Mutex<Vec<Received>>>,
    consumer: JoinHandle<()>,
}

impl Broker {
    pub async fn new() -> Self {
        Self::with_binding(Some("#")).await
    }

    /// `binding` None: declare the exchange and queue but bind nothing, so
    /// every publish is unroutable.
    pub async fn with_binding(binding: Option<&str>) -> Self {
        let id = Uuid::now_v7().simple().to_string();
        let exchange = format!("outbox_test.{id}");
        let queue = format!("outbox_test.{id}.all");
        let connection = outbox::amqp::connect(AMQP_URL, "outbox relay tests")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        outbox::amqp::declare_exchange(&channel, &exchange).await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let broker_received = Arc::new(Mutex::new(Vec::new()));
        let consumer_channel = connection.create_channel().await.unwrap();
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let sink = Arc::clone(&broker_received);
        let consumer = tokio::spawn(async move {
            let _keep = consumer_channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let body = serde_json::from_slice(&delivery.data).unwrap_or(serde_json::Value::Null);
                sink.lock().unwrap().push(Received {
                    properties: delivery.properties.clone(),
                    routing_key: delivery.routing_key.to_string(),
                    body,
                });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        let broker = Self {
            exchange,
            queue,
            connection: Some(connection),
            channel,
            received: broker_received,
            consumer,
        };
        if let Some(pattern) = binding {
            broker.bind(pattern).await;
        }
        broker
    }

    pub async fn bind(&self, pattern: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Distinct message ids received.
    pub fn distinct(&self) -> usize {
        let received = self.received();
        received
            .iter()
            .map(Received::message_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    pub async fn wait_for_distinct(&self, count: usize, deadline: Duration) {
        eventually(&format!("{count} distinct messages"), deadline, || {
            self.distinct() >= count
        })
        .await;
    }

    /// Per aggregate, the payload counters in order of first arrival.
    pub fn first_arrival_order(&self) -> HashMap<String, Vec<i64>> {
        let mut seen = std::collections::HashSet::new();
        let mut order: HashMap<String, Vec<i64>> = HashMap::new();
        for message in self.received() {
            if seen.insert(message.message_id()) {
                let n = message.body["data"]["n"].as_i64().unwrap_or(-1);
                order.entry(message.aggregate()).or_default().push(n);
            }
        }
        order
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.consumer.abort();
        let exchange = self.exchange.clone();
        let connection = self.connection.take();
        // Clean up from a thread of its own: Drop may run during a panic or
        // inside the test's runtime, where blocking on async is not allowed.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                let limit = Duration::from_secs(5);
                if let Ok(Ok(admin)) =
                    tokio::time::timeout(limit, outbox::amqp::connect(AMQP_URL, "outbox test cleanup")).await
                {
                    if let Ok(channel) = admin.create_channel().await {
                        let _ = channel
                            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                    let _ = admin.close(200, "bye".into()).await;
                }
                // The exclusive queue goes with its connection.
                if let Some(connection) = connection {
                    let _ = tokio::time::timeout(limit, connection.close(200, "bye".into())).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Relay settings for tests: fast polling, short retries, this test's
/// database and exchange.
pub fn relay_config(db: &TestDatabase, broker: &Broker) -> RelayConfig {
    RelayConfig {
        database_url: db.url().to_owned(),
        exchange: broker.exchange.clone(),
        poll_min: Duration::from_millis(2),
        poll_max: Duration::from_millis(20),
        confirm_timeout: Duration::from_secs(5),
        lease: Duration::from_secs(10),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        reconnect_max: Duration::from_millis(500),
        stats_interval: Duration::from_millis(100),
        shutdown_timeout: Duration::from_secs(5),
        ..RelayConfig::default()
    }
}

/// A relay running in-process until stopped.
pub struct RunningRelay {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<outbox::Result<()>>>,
    pub health: Arc<outbox::relay::Health>,
}

impl RunningRelay {
    pub fn start(config: RelayConfig) -> Self {
        let relay = Relay::new(config).unwrap();
        let health = relay.health();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Self {
            stop,
            task: Some(task),
            health,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("relay stops within 20 s")
                .expect("relay task")
                .expect("relay run");
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A TCP proxy in front of a server, for cutting connections on demand.
pub struct Proxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    refusing: bool,
    links: Vec<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let upstream = upstream.to_owned();
        let accept_state = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_state.lock().unwrap().refusing {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_state.lock().unwrap().links.push(link);
            }
        });
        Self { port, state, accept }
    }

    /// Drops every open connection; with `refuse`, new ones are closed at
    /// once until [`Proxy::heal`].
    pub fn cut(&self, refuse: bool) {
        let mut state = self.state.lock().unwrap();
        state.refusing = refuse;
        for link in state.links.drain(..) {
            link.abort();
        }
    }

    pub fn heal(&self) {
        self.state.lock().unwrap().refusing = false;
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(true);
    }
}
