//! An AsyncAPI 3.0 document of a service's events, generated from its
//! registry: what a consumer team or a catalog reads instead of the code.
//!
//! - channels: one per routing key on the exchange (a topic exchange,
//!   routing key = event type), and one per queue of each queued
//!   listener (its queue, retry queues and dead-letter queue);
//! - operations: the relay sends each event type to the exchange; each
//!   listener receives from its queue, and sends to its retry queues (a
//!   failed try waits there, then dead-letters back) and its dead-letter
//!   queue (after its last try); each with its AMQP binding;
//! - messages: one per event type, the CloudEvents structured document
//!   (`application/cloudevents+json`) whose `data` is the type's payload
//!   schema, with the AMQP headers the relay sets.
//!
//! Schemas are JSON Schema draft-07 (`schemaFormat:
//! application/schema+json;version=draft-07`), the same as the exported
//! files. Keys are sorted, so a registry always gives the same document.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::{SchemaSet, dataschema_uri, sorted};
use crate::cloudevents::CONTENT_TYPE;
use crate::consumer::topology::{delay_label, queues_for};
use crate::error::Result;
use crate::registry::Registry;

/// The schema format of every schema in the document.
pub const SCHEMA_FORMAT: &str = "application/schema+json;version=draft-07";
/// The AMQP bindings' version.
const AMQP_BINDING_VERSION: &str = "0.3.0";

/// What the document says about where it runs.
#[derive(Debug, Clone)]
pub struct AsyncApiOptions {
    /// `info.title`. Default: `<app> events`.
    pub title: Option<String>,
    /// `info.version`, the service's version. Default `1.0.0`.
    pub version: String,
    /// Queue-name prefix of the service's workers (`chom`).
    pub app: String,
    /// The topic exchange the relay publishes to.
    pub exchange: String,
    /// The broker's `host:port` (the `servers` entry). Default
    /// `127.0.0.1:5672`.
    pub host: String,
    /// The broker's virtual host. Default `/`.
    pub vhost: String,
    /// The `dataschema` base the relay uses (see [`dataschema_uri`]).
    pub dataschema_base: Option<String>,
}

impl AsyncApiOptions {
    /// Options for `app`'s workers on the default exchange and a local broker.
    pub fn new(app: impl Into<String>) -> Self {
        Self {
            title: None,
            version: "1.0.0".into(),
            app: app.into(),
            exchange: crate::DEFAULT_EXCHANGE.into(),
            host: "127.0.0.1:5672".into(),
            vhost: "/".into(),
            dataschema_base: None,
        }
    }
}

/// The AsyncAPI 3.0 document of `registry`'s events and queued listeners.
/// Fails when a listener's queue names are not valid (as the worker would).
pub fn document(registry: &Registry, options: &AsyncApiOptions) -> Result<Value> {
    let schemas = registry.schema_set();
    let mut event_types: BTreeSet<String> = schemas.event_types().map(str::to_owned).collect();
    for listener in registry.queued_listeners() {
        event_types.extend(listener.event_types().iter().cloned());
    }

    let mut messages = Map::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    for event_type in &event_types {
        messages.insert(event_type.clone(), message(&schemas, event_type, options));
        channels.insert(
            event_type.clone(),
            json!({
                "address": event_type,
                "title": format!("{event_type} on {}", options.exchange),
                "description": format!(
                    "Routing key {event_type} on the topic exchange {}: every committed {event_type} event, published by the relay.",
                    options.exchange
                ),
                "messages": { event_type.clone(): message_ref(event_type) },
                "bindings": { "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": options.exchange,
                        "type": "topic",
                        "durable": true,
                        "autoDelete": false,
                        "vhost": options.vhost,
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }},
            }),
        );
        operations.insert(
            format!("publish.{event_type}"),
            json!({
                "action": "send",
                "channel": channel_ref(event_type),
                "title": format!("Publish {event_type}"),
                "summary": "The relay publishes each committed event once its transaction commits, persistent and mandatory, and marks it published on the broker's confirm.",
                "messages": [channel_message_ref(event_type, event_type)],
                "bindings": { "amqp": {
                    "deliveryMode": 2,
                    "mandatory": true,
                    "timestamp": true,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }},
            }),
        );
    }

    for registration in registry.queued_listeners() {
        let queues = queues_for(&options.app, registration)?;
        let handled = registration.event_types();
        let mut queue_channel = |name: &str, description: String| {
            let messages: Map<String, Value> = handled.iter().map(|t| (t.clone(), message_ref(t))).collect();
            channels.insert(
                name.to_owned(),
                json!({
                    "address": name,
                    "description": description,
                    "messages": messages,
                    "bindings": { "amqp": {
                        "is": "queue",
                        "queue": {
                            "name": name,
                            "durable": true,
                            "exclusive": false,
                            "autoDelete": false,
                            "vhost": options.vhost,
                        },
                        "bindingVersion": AMQP_BINDING_VERSION,
                    }},
                }),
            );
        };
        let listener = registration.name();
        queue_channel(
            &queues.queue,
            format!(
                "The queue of listener {listener} (quorum), bound to {} on {}.",
                handled.join(", "),
                options.exchange
            ),
        );
        for (delay, name) in &queues.retries {
            queue_channel(
                name,
                format!(
                    "A retry queue of {listener}: a failed try waits {} here, then dead-letters back to {}.",
                    delay_label(*delay),
                    queues.queue
                ),
            );
        }
        queue_channel(
            &queues.dead,
            format!(
                "The dead-letter queue of {listener}: messages that failed for good, beside their failed_jobs rows."
            ),
        );
        let refs = |channel: &str| -> Vec<Value> {
            handled.iter().map(|t| channel_message_ref(channel, t)).collect()
        };
        let tries = registration.options().tries;
        operations.insert(
            listener.to_owned(),
            json!({
                "action": "receive",
                "channel": channel_ref(&queues.queue),
                "title": format!("{listener} handles its events"),
                "summary": format!(
                    "A worker runs {listener} on each message, acking it once handled; up to {tries} tries in all."
                ),
                "messages": refs(&queues.queue),
                "bindings": { "amqp": { "ack": true, "bindingVersion": AMQP_BINDING_VERSION }},
            }),
        );
        for (delay, name) in &queues.retries {
            operations.insert(
                format!("{listener}.retry.{}", delay_label(*delay)),
                json!({
                    "action": "send",
                    "channel": channel_ref(name),
                    "title": format!("{listener} retries after {}", delay_label(*delay)),
                    "summary": "After a transient failure the worker republishes the message here and acks the original.",
                    "messages": refs(name),
                    "bindings": { "amqp": { "deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION }},
                }),
            );
        }
        operations.insert(
            format!("{listener}.dead"),
            json!({
                "action": "send",
                "channel": channel_ref(&queues.dead),
                "title": format!("{listener} gives up"),
                "summary": "After the last try (or at once for a malformed message) the worker writes a failed_jobs row and publishes the message here.",
                "messages": refs(&queues.dead),
                "bindings": { "amqp": { "deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION }},
            }),
        );
    }

    let title = options
        .title
        .clone()
        .unwrap_or_else(|| format!("{} events", options.app));
    Ok(sorted(json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": options.version,
            "description": format!(
                "The domain events of {} as the transactional outbox publishes them: CloudEvents 1.0 structured JSON on the topic exchange {} (routing key = event type), and the queues of its listeners.",
                options.app, options.exchange
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": { "rabbitmq": {
            "host": options.host,
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
        }},
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages },
    })))
}

fn message_ref(event_type: &str) -> Value {
    json!({ "$ref": format!("#/components/messages/{event_type}") })
}

fn channel_ref(channel: &str) -> Value {
    json!({ "$ref": format!("#/channels/{channel}") })
}

fn channel_message_ref(channel: &str, event_type: &str) -> Value {
    json!({ "$ref": format!("#/channels/{channel}/messages/{event_type}") })
}

/// The message of `event_type`: the CloudEvent whose `data` is the
/// payload schema (any JSON when the type has no schema), and the headers.
fn message(schemas: &SchemaSet, event_type: &str, options: &AsyncApiOptions) -> Value {
    let current = schemas.current(event_type);
    let (data, version, description) = match current {
        Some(schema) => {
            let mut data = schema.schema().clone();
            if let Some(map) = data.as_object_mut() {
                map.remove("$schema");
            }
            let description = schema
                .schema()
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned);
            (data, Some(schema.version()), description)
        }
        None => (json!({}), None, None),
    };
    let text = json!({"type": "string"});
    let mut properties = json!({
        "specversion": {"type": "string", "const": "1.0"},
        "id": {"type": "string", "format": "uuid", "description": "The event id (UUIDv7), also the AMQP message_id: the consumers' dedup key."},
        "type": {"type": "string", "const": event_type},
        "source": {"type": "string", "format": "uri-reference", "description": "The producing service (`/outbox/<database>` unless configured)."},
        "subject": {"type": "string", "description": "The aggregate's id."},
        "time": {"type": "string", "format": "date-time", "description": "When the fact happened."},
        "datacontenttype": {"type": "string", "const": "application/json"},
        "aggregatetype": text,
        "tenantid": text,
        "actor": {"type": "string", "description": "Who caused it; absent for a system action."},
        "correlationid": text,
        "causationid": text,
        "traceparent": {"type": "string", "description": "W3C trace context."},
        "data": data,
    });
    let mut required = vec![
        "specversion",
        "id",
        "type",
        "source",
        "subject",
        "time",
        "datacontenttype",
        "aggregatetype",
        "schemaversion",
        "dataschema",
        "data",
    ];
    if let Some(map) = properties.as_object_mut() {
        match version {
            Some(version) => {
                map.insert(
                    "schemaversion".into(),
                    json!({"type": "integer", "const": version}),
                );
                map.insert(
                    "dataschema".into(),
                    json!({
                        "type": "string",
                        "format": "uri",
                        "const": dataschema_uri(options.dataschema_base.as_deref(), event_type, version),
                    }),
                );
            }
            None => {
                map.insert("schemaversion".into(), json!({"type": "integer", "minimum": 1}));
                map.insert("dataschema".into(), json!({"type": "string", "format": "uri"}));
                required.retain(|r| *r != "dataschema");
            }
        }
    }
    let mut message = json!({
        "name": event_type,
        "title": event_type,
        "contentType": CONTENT_TYPE,
        "headers": {
            "schemaFormat": SCHEMA_FORMAT,
            "schema": {
                "type": "object",
                "description": "AMQP headers the relay sets (the properties carry message_id = event id, type = event type, timestamp, content_type, delivery_mode 2, app_id, correlation_id).",
                "properties": {
                    "aggregate_type": {"type": "string"},
                    "aggregate_id": {"type": "string"},
                    "schema_version": {"type": "integer"},
                    "tenant_id": {"type": "string"},
                    "traceparent": {"type": "string"},
                },
                "required": ["aggregate_type", "aggregate_id", "schema_version"],
            },
        },
        "payload": {
            "schemaFormat": SCHEMA_FORMAT,
            "schema": {
                "type": "object",
                "description": format!("A CloudEvents 1.0 structured document whose data is the {event_type} payload."),
                "properties": properties,
                "required": required,
            },
        },
        "correlationId": { "location": "$message.payload#/correlationid" },
        "bindings": { "amqp": { "messageType": event_type, "bindingVersion": AMQP_BINDING_VERSION }},
    });
    if let (Some(description), Some(map)) = (description, message.as_object_mut()) {
        map.insert("summary".into(), Value::String(description));
    }
    message
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::consumer::{HandlerContext, ListenerOptions, QueuedListener, ReceivedEvent};
    use crate::error::ListenerError;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    struct Audit;

    impl QueuedListener for Audit {
        fn name(&self) -> &str {
            "audit"
        }

        fn handle(&self, _: &ReceivedEvent, _: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
            Ok(())
        }
    }

    /// A site was created.
    #[derive(schemars::JsonSchema, serde::Serialize)]
    #[allow(dead_code)]
    struct SiteCreated {
        site_id: i64,
    }

    #[test]
    fn channels_operations_and_messages_come_from_the_registry() -> TestResult {
        let registry = Registry::new()
            .event_schema::<SiteCreated>("site.created", 2)?
            .queued_listener_with(
                &["site.created", "site.deleted"],
                Audit,
                ListenerOptions::default().retries(3, &[Duration::from_secs(30), Duration::from_secs(60)]),
            )?;
        let doc = document(&registry, &AsyncApiOptions::new("shop"))?;
        assert_eq!(doc["asyncapi"], "3.0.0");
        assert_eq!(
            doc["channels"]["site.created"]["bindings"]["amqp"]["exchange"]["name"],
            "outbox.events"
        );
        for queue in ["shop.audit", "shop.audit.dead"] {
            assert_eq!(doc["channels"][queue]["bindings"]["amqp"]["queue"]["name"], queue);
        }
        assert_eq!(doc["operations"]["audit"]["action"], "receive");
        assert_eq!(doc["operations"]["audit.dead"]["action"], "send");
        assert_eq!(doc["operations"]["publish.site.created"]["action"], "send");
        let retries: Vec<&String> = doc["operations"]
            .as_object()
            .map(|o| o.keys().filter(|k| k.starts_with("audit.retry.")).collect())
            .unwrap_or_default();
        assert_eq!(retries.len(), 2, "one operation per retry queue: {retries:?}");
        let payload = &doc["components"]["messages"]["site.created"]["payload"]["schema"];
        assert_eq!(
            payload["properties"]["data"]["properties"]["site_id"]["type"],
            "integer"
        );
        assert_eq!(payload["properties"]["schemaversion"]["const"], 2);
        assert_eq!(
            payload["properties"]["dataschema"]["const"],
            "urn:outbox:schema:site.created:v2"
        );
        assert_eq!(
            doc["components"]["messages"]["site.created"]["summary"],
            "A site was created."
        );
        // A handled type without a schema still has a message (any data).
        assert_eq!(
            doc["components"]["messages"]["site.deleted"]["payload"]["schema"]["properties"]["data"],
            json!({})
        );
        assert_eq!(document(&registry, &AsyncApiOptions::new("shop"))?, doc);
        Ok(())
    }
}
