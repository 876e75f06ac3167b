//! A private exchange and the worker's queues for one test. Dropping the
//! guard deletes them from a fresh thread with its own runtime, also when
//! the test panicked.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use outbox::DEFAULT_AMQP_URL;
use outbox::cloudevents::{EventRef, amqp_properties, encode_body};
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// One test's exchange (`outbox_test.<uuid>`) and app prefix
/// (`outbox_test.c<uuid>`) for its queues.
pub struct TestBroker {
    pub exchange: String,
    pub app: String,
    #[allow(dead_code)] // kept open for the channel
    pub connection: Connection,
    pub channel: Channel,
    queues: Vec<String>,
}

impl TestBroker {
    pub async fn new() -> Self {
        let id = Uuid::now_v7().simple().to_string();
        let connection = outbox::amqp::connect(&amqp_url(), "consumer test").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = format!("outbox_test.{id}");
        outbox::amqp::declare_exchange(&channel, &exchange).await.unwrap();
        Self {
            exchange,
            app: format!("outbox_test.c{}", &id[16..]),
            connection,
            channel,
            queues: Vec::new(),
        }
    }

    /// Deletes these queues at the end too.
    pub fn track(&mut self, queues: &[outbox::consumer::ListenerQueues]) {
        for listener in queues {
            for name in listener.all_queues() {
                if !self.queues.iter().any(|q| q == name) {
                    self.queues.push(name.to_owned());
                }
            }
        }
    }

    /// Publishes `body` to the exchange with `routing_key`, confirmed.
    pub async fn publish(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes `body` straight to `queue` (default exchange), confirmed.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            confirmation,
            lapin::Confirmation::Ack(None),
            "published to {queue}"
        );
    }

    /// Publishes `event` as the relay would.
    pub async fn publish_event(&self, event: &TestEvent) {
        let (body, properties) = event.encode();
        self.publish(&event.event_type, &body, properties).await;
    }

    /// Messages ready in `queue`.
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Takes one message off `queue` (acknowledged).
    pub async fn take(&self, queue: &str) -> Option<(BasicProperties, Vec<u8>)> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()?;
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        Some((message.delivery.properties.clone(), message.delivery.data.clone()))
    }

    /// Waits until `queue` holds `count` ready messages.
    pub async fn wait_ready(&self, queue: &str, count: u32, limit: Duration) {
        outbox::testing::eventually_async(
            &format!("{queue} to hold {count} ready messages"),
            limit,
            || async { self.ready(queue).await == count },
        )
        .await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(
            &amqp_url(),
            &self.queues,
            std::slice::from_ref(&self.exchange),
        );
    }
}

/// An event as the relay would publish it.
#[derive(Debug, Clone)]
pub struct TestEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: String,
    pub payload: serde_json::Value,
    /// CloudEvents `source`; `/test` unless set.
    pub source: String,
}

impl TestEvent {
    pub fn new(event_type: &str, payload: serde_json::Value) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            aggregate_id: "1".into(),
            payload,
            source: "/test".into(),
        }
    }

    pub fn encode(&self) -> (Vec<u8>, BasicProperties) {
        let payload = self.payload.to_string();
        let event = EventRef {
            event_id: self.event_id,
            event_type: &self.event_type,
            aggregate_type: "widget",
            aggregate_id: &self.aggregate_id,
            tenant_id: Some("3"),
            occurred_at: Utc::now(),
            actor: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            schema_version: 1,
            payload_json: &payload,
        };
        (
            encode_body(&event, &self.source).unwrap(),
            amqp_properties(&event, "consumer-test").unwrap(),
        )
    }
}

/// Header `name` of `properties` as an i64, if it is an integer.
pub fn int_header(properties: &BasicProperties, name: &str) -> Option<i64> {
    use lapin::types::AMQPValue;
    let headers: HashMap<String, AMQPValue> = properties
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    match headers.get(name)? {
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}
