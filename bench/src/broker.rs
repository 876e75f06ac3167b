//! The scenarios' private exchange and durable quorum queue (the queue type
//! listeners use), deleted when dropped.

use anyhow::Context;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

/// `outbox_bench.<id>`: a durable topic exchange and a durable quorum queue
/// bound to `#`.
pub struct BenchQueue {
    /// Exchange name.
    pub exchange: String,
    /// Queue name.
    pub queue: String,
    amqp_url: String,
    connection: Connection,
    /// A channel for the scenario's own use.
    pub channel: Channel,
}

impl BenchQueue {
    /// Declares the exchange and queue.
    pub async fn declare(amqp_url: &str) -> anyhow::Result<Self> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let exchange = format!("outbox_bench.{id}");
        let queue = format!("outbox_bench.{id}.all");
        let connection = outbox::amqp::connect(amqp_url, "outbox bench").await?;
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        outbox::amqp::declare_exchange(&channel, &exchange).await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .context("cannot declare the bench queue")?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot bind the bench queue")?;
        Ok(Self {
            exchange,
            queue,
            amqp_url: amqp_url.to_owned(),
            connection,
            channel,
        })
    }

    /// Empties the queue between runs.
    pub async fn purge(&self) -> anyhow::Result<()> {
        self.channel
            .queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .context("cannot purge the bench queue")?;
        Ok(())
    }

    /// Opens another connection (for a consumer or a publisher).
    pub async fn connect(&self, name: &str) -> anyhow::Result<Connection> {
        Ok(outbox::amqp::connect(&self.amqp_url, name).await?)
    }
}

impl Drop for BenchQueue {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(
            &self.amqp_url,
            std::slice::from_ref(&self.queue),
            std::slice::from_ref(&self.exchange),
        );
        let _ = &self.connection;
    }
}

/// The queues of a scenario's listeners and its exchange, deleted when
/// dropped (also on error).
pub struct BrokerCleanup {
    /// RabbitMQ.
    pub amqp_url: String,
    /// The scenario's exchange.
    pub exchange: String,
    /// Queues declared so far.
    pub queues: Vec<String>,
}

impl Drop for BrokerCleanup {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(
            &self.amqp_url,
            &self.queues,
            std::slice::from_ref(&self.exchange),
        );
    }
}
