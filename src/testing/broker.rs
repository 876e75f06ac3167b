//! A private exchange with a queue bound to it, consumed into memory, for
//! tests that check what reached the broker. Dropping it deletes the
//! exchange (and the exclusive queue goes with its connection), even when
//! the test panicked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::amqp::{self, DEFAULT_AMQP_URL};
use crate::error::{Error, Result};

/// Prefix of every exchange and queue a test declares.
pub const TEST_AMQP_PREFIX: &str = "outbox_test.";

/// A message as the test queue received it.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// AMQP properties.
    pub properties: BasicProperties,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The body parsed as JSON (`Null` if it was not JSON).
    pub body: serde_json::Value,
}

impl ReceivedMessage {
    /// The AMQP message id (the event id).
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    }

    /// The CloudEvents `subject` (the aggregate id).
    pub fn subject(&self) -> String {
        self.body["subject"].as_str().unwrap_or_default().to_owned()
    }
}

fn broker_error(context: &str) -> impl FnOnce(lapin::Error) -> Error + '_ {
    move |source| Error::Broker {
        context: context.to_owned(),
        source,
    }
}

/// A unique durable topic exchange (`outbox_test.<uuid>`) with an exclusive
/// queue, consumed into memory.
pub struct TestExchange {
    /// The exchange's name; point the relay at it.
    pub exchange: String,
    /// The queue's name.
    pub queue: String,
    connection: Option<Connection>,
    /// A channel for declaring extra queues or bindings in a test.
    pub channel: Channel,
    received: Arc<Mutex<Vec<ReceivedMessage>>>,
    consumer: JoinHandle<()>,
}

impl std::fmt::Debug for TestExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestExchange")
            .field("exchange", &self.exchange)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl TestExchange {
    /// An exchange whose queue is bound to `#` (receives everything).
    pub async fn new() -> Result<Self> {
        Self::with_binding(Some("#")).await
    }

    /// An exchange whose queue is bound to `binding`, or to nothing with
    /// `None` (every publish is then unroutable).
    pub async fn with_binding(binding: Option<&str>) -> Result<Self> {
        let id = Uuid::now_v7().simple().to_string();
        let exchange = format!("{TEST_AMQP_PREFIX}{id}");
        let queue = format!("{TEST_AMQP_PREFIX}{id}.all");
        let connection = amqp::connect(DEFAULT_AMQP_URL, "outbox tests").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker_error("open channel"))?;
        amqp::declare_exchange(&channel, &exchange).await?;
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
            .map_err(broker_error("declare test queue"))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let consumer_channel = connection
            .create_channel()
            .await
            .map_err(broker_error("open channel"))?;
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error("consume test queue"))?;
        let sink = Arc::clone(&received);
        let consumer = tokio::spawn(async move {
            let _keep = consumer_channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let body = serde_json::from_slice(&delivery.data).unwrap_or(serde_json::Value::Null);
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(ReceivedMessage {
                        properties: delivery.properties.clone(),
                        routing_key: delivery.routing_key.to_string(),
                        body,
                    });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        let test_exchange = Self {
            exchange,
            queue,
            connection: Some(connection),
            channel,
            received,
            consumer,
        };
        if let Some(pattern) = binding {
            test_exchange.bind(pattern).await?;
        }
        Ok(test_exchange)
    }

    /// Binds the queue to `pattern` as well.
    pub async fn bind(&self, pattern: &str) -> Result<()> {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error("bind test queue"))
    }

    /// Every message received so far, in arrival order (duplicates too).
    pub fn received(&self) -> Vec<ReceivedMessage> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many distinct message ids have arrived.
    pub fn distinct(&self) -> usize {
        self.received()
            .iter()
            .map(ReceivedMessage::message_id)
            .collect::<HashSet<_>>()
            .len()
    }

    /// Waits until `count` distinct messages arrived.
    ///
    /// # Panics
    /// When `deadline` passes first (this is a test helper).
    pub async fn wait_for_distinct(&self, count: usize, deadline: Duration) {
        let until = Instant::now() + deadline;
        while self.distinct() < count {
            assert!(
                Instant::now() < until,
                "timed out after {deadline:?} waiting for {count} distinct messages (have {})",
                self.distinct()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Per subject (aggregate), the values of `data[field]` in order of
    /// each message id's first arrival (`-1` where missing).
    pub fn first_arrival_order(&self, field: &str) -> HashMap<String, Vec<i64>> {
        let mut seen = HashSet::new();
        let mut order: HashMap<String, Vec<i64>> = HashMap::new();
        for message in self.received() {
            if seen.insert(message.message_id()) {
                let value = message.body["data"][field].as_i64().unwrap_or(-1);
                order.entry(message.subject()).or_default().push(value);
            }
        }
        order
    }
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        self.consumer.abort();
        // The exclusive queue goes with its connection.
        let connection = self.connection.take();
        std::thread::spawn(move || {
            if let (Some(connection), Ok(runtime)) = (
                connection,
                tokio::runtime::Builder::new_current_thread().enable_all().build(),
            ) {
                runtime.block_on(async move {
                    let limit = Duration::from_secs(5);
                    let _ = tokio::time::timeout(limit, connection.close(200, "bye".into())).await;
                });
            }
        })
        .join()
        .ok();
        delete_broker_objects(DEFAULT_AMQP_URL, &[], std::slice::from_ref(&self.exchange));
    }
}

/// Deletes `queues` and `exchanges` (missing ones are fine), waiting up to
/// 30 s for the broker to accept a connection. It runs on a thread of its
/// own with its own runtime, so it can be called from `Drop`, during a
/// panic or inside a test's runtime, where blocking on async is not
/// allowed. Failures are printed, not raised: this is cleanup.
pub fn delete_broker_objects(amqp_url: &str, queues: &[String], exchanges: &[String]) {
    let (url, queues, exchanges) = (amqp_url.to_owned(), queues.to_vec(), exchanges.to_vec());
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let connection = loop {
                match amqp::connect(&url, "outbox test cleanup").await {
                    Ok(connection) => break connection,
                    Err(error) if Instant::now() > deadline => {
                        eprintln!("cannot connect to delete {queues:?} and {exchanges:?}: {error}");
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            if let Ok(channel) = connection.create_channel().await {
                for queue in &queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in &exchanges {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = connection.close(200, "cleanup".into()).await;
        });
    });
    let _ = cleanup.join();
}
