//! The wire format: a CloudEvents 1.0 structured-mode JSON document, and
//! the AMQP properties that repeat what brokers and tools read.
//!
//! Extension attribute names follow the CloudEvents rule (lower-case
//! letters and digits only): `aggregatetype`, `tenantid`, `actor`,
//! `correlationid`, `causationid`, `traceparent`, `schemaversion`. The
//! standard `dataschema` names the payload's JSON Schema
//! ([`crate::contract::dataschema_uri`]).

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Content type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// AMQP delivery mode of a persistent message.
const PERSISTENT: u8 = 2;

/// One stored event, borrowed, as the relay turns it into a message.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Event id (message id).
    pub event_id: Uuid,
    /// Type name (routing key).
    pub event_type: &'a str,
    /// Aggregate kind.
    pub aggregate_type: &'a str,
    /// Aggregate id (CloudEvents `subject`).
    pub aggregate_id: &'a str,
    /// Tenant.
    pub tenant_id: Option<&'a str>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Who did it.
    pub actor: Option<&'a str>,
    /// Request or workflow id.
    pub correlation_id: Option<&'a str>,
    /// What caused it.
    pub causation_id: Option<&'a str>,
    /// W3C trace context.
    pub traceparent: Option<&'a str>,
    /// Payload schema version.
    pub schema_version: i32,
    /// The payload as JSON text.
    pub payload_json: &'a str,
}

#[derive(Serialize)]
struct StructuredEvent<'a> {
    specversion: &'static str,
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: &'a str,
    subject: &'a str,
    time: DateTime<Utc>,
    datacontenttype: &'static str,
    dataschema: String,
    aggregatetype: &'a str,
    schemaversion: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenantid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    data: &'a RawValue,
}

/// Serializes `event` as a CloudEvents structured JSON body. `source`
/// is the CloudEvents `source` attribute (a URI reference naming the
/// producing service); `dataschema` is the default one
/// (`urn:outbox:schema:<type>:v<version>`).
pub fn encode_body(event: &EventRef<'_>, source: &str) -> Result<Vec<u8>> {
    encode_body_with(event, source, None)
}

/// [`encode_body`] with the `dataschema` URI under `dataschema_base`
/// ([`crate::contract::dataschema_uri`]).
pub fn encode_body_with(
    event: &EventRef<'_>,
    source: &str,
    dataschema_base: Option<&str>,
) -> Result<Vec<u8>> {
    let data: &RawValue = serde_json::from_str(event.payload_json).map_err(|source| Error::Serialize {
        event_type: event.event_type.to_owned(),
        source,
    })?;
    let document = StructuredEvent {
        specversion: "1.0",
        id: event.event_id,
        event_type: event.event_type,
        source,
        subject: event.aggregate_id,
        time: event.occurred_at,
        datacontenttype: "application/json",
        dataschema: crate::contract::dataschema_uri(dataschema_base, event.event_type, event.schema_version),
        aggregatetype: event.aggregate_type,
        schemaversion: event.schema_version,
        tenantid: event.tenant_id,
        actor: event.actor,
        correlationid: event.correlation_id,
        causationid: event.causation_id,
        traceparent: event.traceparent,
        data,
    };
    serde_json::to_vec(&document).map_err(|source| Error::Serialize {
        event_type: event.event_type.to_owned(),
        source,
    })
}

/// AMQP properties for `event`: persistent, message id = event id, type,
/// timestamp, content type, app id, correlation id; headers carry the
/// aggregate, tenant, traceparent and schema version.
pub fn amqp_properties(event: &EventRef<'_>, app_id: &str) -> Result<BasicProperties> {
    let short = |name: &str, value: &str| {
        ShortString::try_new(value)
            .map_err(|e| Error::InvalidEvent(format!("{name} does not fit an AMQP short string: {e}")))
    };
    let mut headers = FieldTable::default();
    headers.insert(
        "aggregate_type".into(),
        AMQPValue::LongString(LongString::from(event.aggregate_type)),
    );
    headers.insert(
        "aggregate_id".into(),
        AMQPValue::LongString(LongString::from(event.aggregate_id)),
    );
    headers.insert("schema_version".into(), AMQPValue::LongInt(event.schema_version));
    if let Some(tenant) = event.tenant_id {
        headers.insert(
            "tenant_id".into(),
            AMQPValue::LongString(LongString::from(tenant)),
        );
    }
    if let Some(traceparent) = event.traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(traceparent)),
        );
    }
    let timestamp = u64::try_from(event.occurred_at.timestamp()).unwrap_or(0);
    let mut properties = BasicProperties::default()
        .with_message_id(short("event_id", &event.event_id.to_string())?)
        .with_type(short("event_type", event.event_type)?)
        .with_timestamp(timestamp)
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_app_id(short("app_id", app_id)?)
        .with_headers(headers);
    if let Some(correlation) = event.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", correlation)?);
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_body_has_the_contract_attributes() {
        let id = Uuid::now_v7();
        let event = EventRef {
            event_id: id,
            event_type: "site.created",
            aggregate_type: "site",
            aggregate_id: "7",
            tenant_id: Some("3"),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            actor: None,
            correlation_id: Some("req-1"),
            causation_id: None,
            traceparent: None,
            schema_version: 1,
            payload_json: r#"{"site_id":7,"domain":"a.example"}"#,
        };
        let body = encode_body(&event, "/chom").unwrap_or_default();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["id"], id.to_string());
        assert_eq!(value["type"], "site.created");
        assert_eq!(value["source"], "/chom");
        assert_eq!(value["subject"], "7");
        assert_eq!(value["time"], "2023-11-14T22:13:20Z");
        assert_eq!(value["tenantid"], "3");
        assert_eq!(value["correlationid"], "req-1");
        assert_eq!(value["data"]["domain"], "a.example");
        assert_eq!(value["dataschema"], "urn:outbox:schema:site.created:v1");
        let based =
            encode_body_with(&event, "/chom", Some("https://schemas.example/chom/")).unwrap_or_default();
        let based: serde_json::Value = serde_json::from_slice(&based).unwrap_or_default();
        assert_eq!(
            based["dataschema"],
            "https://schemas.example/chom/site.created.v1.schema.json"
        );
        assert!(value.get("actor").is_none(), "system action: no actor attribute");
    }
}
