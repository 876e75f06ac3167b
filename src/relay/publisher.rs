//! One AMQP channel in confirm mode, publishing claimed rows as persistent,
//! mandatory CloudEvents messages to the exchange.

use lapin::PublisherConfirm;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Connection};

use crate::amqp;
use crate::cloudevents::{amqp_properties, encode_body_with};
use crate::error::Result;
use crate::relay::config::RelayConfig;
use crate::relay::store::ClaimedEvent;

/// Why a publish could not even be handed to the broker.
#[derive(Debug)]
pub(crate) enum PublishError {
    /// The row itself cannot be turned into a message; retrying the same
    /// bytes will not help, but its attempts count like any failure.
    Encode(String),
    /// The channel or connection is gone; every in-flight row is affected.
    Broker(lapin::Error),
}

pub(crate) struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
    source: String,
    dataschema_base: Option<String>,
    app_id: String,
}

impl Publisher {
    /// Connects (to the first of the configured brokers that answers),
    /// enables publisher confirms and declares the exchange. Confirms are
    /// per channel: a row published here is marked only on this
    /// connection's confirm, and a session that loses its connection
    /// counts its unconfirmed rows as failed attempts (published again
    /// later, over whichever connection comes next).
    pub(crate) async fn open(config: &RelayConfig, broker: &amqp::BrokerConnector) -> Result<Self> {
        let connection = broker
            .connect(&format!("outbox-relay {}", config.relay_id))
            .await?;
        let channel = amqp::open_channel(&connection, true).await?;
        amqp::declare_exchange(&channel, &config.exchange).await?;
        Ok(Self {
            connection,
            channel,
            exchange: config.exchange.clone(),
            source: config.effective_source(),
            dataschema_base: config.dataschema_base.clone(),
            app_id: config.app_id.clone(),
        })
    }

    /// Sends `row` and returns the future of the broker's confirm. Sending
    /// does not wait for the confirm, so many rows are in flight at once.
    pub(crate) async fn publish(&self, row: &ClaimedEvent) -> Result<PublisherConfirm, PublishError> {
        let event = row.as_event_ref();
        // While exporting traces: a `publish` span, child of the writer's
        // context, whose own context the message carries on.
        #[cfg(feature = "otel")]
        let (_span, traceparent) = publish_span(row, &self.exchange);
        #[cfg(feature = "otel")]
        let event = crate::cloudevents::EventRef {
            traceparent: traceparent.as_deref().or(event.traceparent),
            ..event
        };
        let body = encode_body_with(&event, &self.source, self.dataschema_base.as_deref())
            .map_err(|e| PublishError::Encode(e.to_string()))?;
        let properties =
            amqp_properties(&event, &self.app_id).map_err(|e| PublishError::Encode(e.to_string()))?;
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                row.event_type.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .map_err(PublishError::Broker)
    }

    /// Whether the connection and channel still work.
    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes the connection politely (best effort).
    pub(crate) async fn close(&self) {
        if self.connection.status().connected() {
            let _ = self.connection.close(200, "relay stopping".into()).await;
        }
    }
}

/// The `publish` span of `row` (none while no trace exporter runs) and
/// the traceparent the message carries instead of the writer's.
#[cfg(feature = "otel")]
fn publish_span(row: &ClaimedEvent, exchange: &str) -> (tracing::Span, Option<String>) {
    use crate::telemetry;
    if !telemetry::is_active() {
        return (tracing::Span::none(), None);
    }
    // How long the event waited in the outbox, from the writer's insert.
    let waited_ms = (chrono::Utc::now() - row.recorded_at).num_milliseconds().max(0);
    let span = tracing::info_span!(
        target: "outbox::relay",
        "publish",
        otel.name = "publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = %exchange,
        messaging.message.id = %row.event_id,
        outbox.event_type = %row.event_type,
        outbox.aggregate_type = %row.aggregate_type,
        outbox.waited_ms = waited_ms,
        outbox.publish_attempt = row.attempts + 1,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    telemetry::set_parent_from(&span, row.traceparent.as_deref());
    let traceparent = telemetry::record_ids(&span);
    (span, traceparent)
}
