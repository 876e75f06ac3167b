//! Decoding a delivery: the CloudEvents 1.0 structured JSON document the
//! relay publishes (see [`crate::cloudevents::encode_body`]) back into the
//! event contract's fields.
//!
//! Decoding is bounded: bodies over [`MAX_BODY_BYTES`] are refused before
//! parsing, serde_json refuses nesting deeper than 128 levels, and every
//! string attribute is limited like the envelope's fields. A message that
//! fails to decode is a permanent failure: retrying the same bytes cannot
//! help.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::envelope::is_valid_event_type;
use crate::error::ListenerError;

/// Largest body decoded: the 1 MiB database backstop on a payload plus
/// room for the CloudEvents attributes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024 + 64 * 1024;
/// Longest accepted string attribute (as for the envelope's fields).
const MAX_ATTRIBUTE_LEN: usize = 255;
/// Deepest nesting of arrays and objects accepted in a body (serde_json's
/// own limit when deserializing into types).
pub(crate) const MAX_NESTING: usize = 128;

/// Why a message body is not an event this framework can hand to a
/// listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("message body is {size} bytes, over the cap of {limit} bytes")]
    TooLarge {
        /// Body size.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// Arrays and objects are nested deeper than 128 levels.
    #[error("message body nests arrays and objects deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The body is not a JSON document with the expected attributes.
    #[error("message body is not a CloudEvents structured JSON document: {0}")]
    Json(#[source] serde_json::Error),
    /// `specversion` is not `1.0`.
    #[error("unsupported CloudEvents specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
    /// An attribute breaks the event contract.
    #[error("invalid {name} attribute: {reason}")]
    Attribute {
        /// The CloudEvents attribute name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// An event as a listener receives it: the event contract's fields, and
/// the payload as JSON text.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// The event id (UUIDv7): the dedup key.
    pub event_id: Uuid,
    /// Dotted lower-case type (`site.created`).
    pub event_type: String,
    /// CloudEvents `source` (the producing service).
    pub source: String,
    /// Kind of aggregate (`site`).
    pub aggregate_type: String,
    /// The aggregate's id (CloudEvents `subject`).
    pub aggregate_id: String,
    /// Owning tenant, if any.
    pub tenant_id: Option<String>,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// Who caused it; `None` for a system action.
    pub actor: Option<String>,
    /// Request or workflow id.
    pub correlation_id: Option<String>,
    /// What caused it.
    pub causation_id: Option<String>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Payload schema version (from 1).
    pub schema_version: i32,
    /// The payload, exactly as published.
    pub data: Box<RawValue>,
}

impl ReceivedEvent {
    /// Deserializes the payload into `T`. A payload that does not fit `T`
    /// is a [`ListenerError::Permanent`]: redelivering it cannot help.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, ListenerError> {
        serde_json::from_str(self.data.get()).map_err(|e| {
            ListenerError::permanent(format!(
                "payload of {} event {} does not fit {} (schema version {}): {e}",
                self.event_type,
                self.event_id,
                std::any::type_name::<T>(),
                self.schema_version
            ))
        })
    }

    /// The payload as a `serde_json::Value`.
    pub fn data_value(&self) -> serde_json::Value {
        serde_json::from_str(self.data.get()).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Deserialize)]
struct Structured {
    specversion: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    source: String,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    datacontenttype: Option<String>,
    aggregatetype: Option<String>,
    schemaversion: Option<i64>,
    tenantid: Option<String>,
    actor: Option<String>,
    correlationid: Option<String>,
    causationid: Option<String>,
    traceparent: Option<String>,
    data: Option<Box<RawValue>>,
}

/// Decodes a structured-mode CloudEvents body as the relay writes it.
pub fn decode(body: &[u8]) -> Result<ReceivedEvent, DecodeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: MAX_BODY_BYTES,
        });
    }
    if nesting_exceeds(body, MAX_NESTING) {
        return Err(DecodeError::TooDeep { limit: MAX_NESTING });
    }
    let doc: Structured = serde_json::from_slice(body).map_err(DecodeError::Json)?;
    if doc.specversion != "1.0" {
        return Err(DecodeError::SpecVersion(bounded(&doc.specversion)));
    }
    let bad = |name: &'static str, reason: String| DecodeError::Attribute { name, reason };
    let event_id = Uuid::parse_str(&doc.id)
        .map_err(|e| bad("id", format!("{:?} is not a UUID: {e}", bounded(&doc.id))))?;
    if !is_valid_event_type(&doc.event_type) {
        return Err(bad(
            "type",
            format!(
                "{:?} is not a dotted lower-case event type",
                bounded(&doc.event_type)
            ),
        ));
    }
    if let Some(content_type) = &doc.datacontenttype
        && content_type != "application/json"
    {
        return Err(bad(
            "datacontenttype",
            format!("{:?} is not application/json", bounded(content_type)),
        ));
    }
    let schema_version = match doc.schemaversion {
        None => 1,
        Some(v) if (1..=i64::from(i32::MAX)).contains(&v) => v as i32,
        Some(v) => return Err(bad("schemaversion", format!("{v} is not between 1 and 2^31-1"))),
    };
    let required = |name: &'static str, value: Option<String>| -> Result<String, DecodeError> {
        let value = value.ok_or_else(|| bad(name, "missing".into()))?;
        check_len(name, &value)?;
        Ok(value)
    };
    let optional = |name: &'static str, value: Option<String>| -> Result<Option<String>, DecodeError> {
        if let Some(value) = &value {
            check_len(name, value)?;
        }
        Ok(value)
    };
    if doc.source.is_empty() || doc.source.len() > 4096 {
        return Err(bad("source", "must be 1 to 4096 bytes".into()));
    }
    Ok(ReceivedEvent {
        event_id,
        aggregate_id: required("subject", doc.subject)?,
        aggregate_type: required("aggregatetype", doc.aggregatetype)?,
        occurred_at: doc.time.ok_or_else(|| bad("time", "missing".into()))?,
        tenant_id: optional("tenantid", doc.tenantid)?,
        actor: optional("actor", doc.actor)?,
        correlation_id: optional("correlationid", doc.correlationid)?,
        causation_id: optional("causationid", doc.causationid)?,
        traceparent: optional("traceparent", doc.traceparent)?,
        schema_version,
        data: doc.data.ok_or_else(|| bad("data", "missing".into()))?,
        event_type: doc.event_type,
        source: doc.source,
    })
}

/// Whether JSON text nests `[`/`{` deeper than `limit` (outside strings).
/// A linear scan: the payload is kept as raw text, which serde_json skips
/// over without a depth limit.
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn check_len(name: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() || value.len() > MAX_ATTRIBUTE_LEN {
        return Err(DecodeError::Attribute {
            name,
            reason: format!("must be 1 to {MAX_ATTRIBUTE_LEN} bytes, not {}", value.len()),
        });
    }
    Ok(())
}

/// A value quoted in an error, cut so a hostile message cannot make the
/// error text huge.
fn bounded(value: &str) -> String {
    crate::text::elided(value, 64).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevents::{EventRef, encode_body};

    fn sample(payload: &str) -> Vec<u8> {
        let event = EventRef {
            event_id: Uuid::now_v7(),
            event_type: "site.created",
            aggregate_type: "site",
            aggregate_id: "7",
            tenant_id: Some("3"),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            actor: Some("user:1"),
            correlation_id: Some("req-1"),
            causation_id: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            schema_version: 2,
            payload_json: payload,
        };
        encode_body(&event, "/chom").unwrap_or_default()
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Site {
        site_id: i64,
        domain: String,
    }

    #[test]
    fn decodes_what_the_relay_encodes() {
        let body = sample(r#"{"site_id":7,"domain":"a.example"}"#);
        let event = decode(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event.event_type, "site.created");
        assert_eq!(event.aggregate_type, "site");
        assert_eq!(event.aggregate_id, "7");
        assert_eq!(event.tenant_id.as_deref(), Some("3"));
        assert_eq!(event.actor.as_deref(), Some("user:1"));
        assert_eq!(event.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(event.causation_id, None);
        assert_eq!(event.schema_version, 2);
        assert_eq!(event.source, "/chom");
        assert_eq!(event.occurred_at.timestamp(), 1_700_000_000);
        assert_eq!(event.data.get(), r#"{"site_id":7,"domain":"a.example"}"#);
        let site: Site = event.data_as().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            site,
            Site {
                site_id: 7,
                domain: "a.example".into()
            }
        );
        assert!(matches!(
            event.data_as::<Vec<u8>>(),
            Err(ListenerError::Permanent(_))
        ));
    }

    #[test]
    fn refuses_malformed_bodies() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "not a CloudEvents"),
            (b"{}".to_vec(), "not a CloudEvents"),
            (
                br#"{"specversion":"0.3","id":"x","type":"a.b","source":"/s"}"#.to_vec(),
                "specversion",
            ),
            (
                br#"{"specversion":"1.0","id":"x","type":"a.b","source":"/s"}"#.to_vec(),
                "id attribute",
            ),
            (
                format!(
                    r#"{{"specversion":"1.0","id":"{}","type":"Bad","source":"/s"}}"#,
                    Uuid::now_v7()
                )
                .into_bytes(),
                "type attribute",
            ),
            (
                format!(
                    r#"{{"specversion":"1.0","id":"{}","type":"a.b","source":"/s","subject":"1","aggregatetype":"a","time":"2024-01-01T00:00:00Z"}}"#,
                    Uuid::now_v7()
                )
                .into_bytes(),
                "data attribute",
            ),
            (
                format!(
                    r#"{{"specversion":"1.0","id":"{}","type":"a.b","source":"/s","subject":"{}","aggregatetype":"a","time":"2024-01-01T00:00:00Z","data":{{}}}}"#,
                    Uuid::now_v7(),
                    "x".repeat(300)
                )
                .into_bytes(),
                "subject attribute",
            ),
            (vec![b' '; MAX_BODY_BYTES + 1], "over the cap"),
        ];
        for (body, expected) in cases {
            let message = decode(&body).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(expected), "{expected}: {message}");
            assert!(message.len() < 400, "bounded: {message}");
        }
    }

    #[test]
    fn refuses_absurd_nesting() {
        let depth = 100_000;
        let mut data = "[".repeat(depth);
        data.push_str(&"]".repeat(depth));
        let body = sample("1");
        let text = String::from_utf8(body)
            .unwrap_or_default()
            .replace("\"data\":1", &format!("\"data\":{data}"));
        let message = decode(text.as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("deeper than 128"), "{message}");
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(!nesting_exceeds(ok.as_bytes(), MAX_NESTING));
        assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[[[[[[[[[[[[[[[[\"[[["}"#, 3));
    }
}
