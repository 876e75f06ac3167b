//! The envelope: one event with every field of the event contract, checked
//! and serialized once, ready to insert or to hand to a listener.

use chrono::{DateTime, Utc};
use diesel::Insertable;
use diesel::pg::Pg;
use diesel::serialize::{IsNull, Output, ToSql};
use diesel::sql_types::Jsonb;
use serde::de::DeserializeOwned;
use std::io::Write;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::schema::outbox_events;
#[cfg(feature = "otel")]
use crate::telemetry::current_traceparent;

#[cfg(not(feature = "otel"))]
fn current_traceparent() -> Option<String> {
    None
}

/// Default cap on a serialized payload: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// The largest cap that may be configured. The database's CHECK backstop
/// (1 MiB on the jsonb text form) stays above it with room for jsonb's
/// slightly longer rendering.
pub const MAX_PAYLOAD_BYTES_LIMIT: usize = 512 * 1024;
/// Longest accepted value for identifiers and metadata strings.
const MAX_FIELD_LEN: usize = 255;

/// A payload already serialized to compact JSON. Inserted as jsonb without
/// serializing a second time.
#[derive(Debug, Clone, PartialEq, Eq, diesel::AsExpression)]
#[diesel(sql_type = Jsonb)]
pub struct JsonPayload(String);

impl JsonPayload {
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Size of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the JSON text is empty (never, for a serialized value).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Deserializes the payload into `T`.
    pub fn deserialize<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.0)
    }

    /// Parses the payload into a `serde_json::Value`.
    pub fn to_value(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(&self.0)
    }
}

impl ToSql<Jsonb, Pg> for JsonPayload {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> diesel::serialize::Result {
        // jsonb's binary wire format: a version byte, then the JSON text.
        out.write_all(&[1])?;
        out.write_all(self.0.as_bytes())?;
        Ok(IsNull::No)
    }
}

/// One event ready to be recorded: the event contract's fields plus the
/// serialized payload. Build it with [`EventEnvelope::new`], which checks
/// the contract and the payload cap.
#[derive(Debug, Clone, PartialEq, Eq, Insertable)]
#[diesel(table_name = outbox_events, check_for_backend(Pg))]
pub struct EventEnvelope {
    /// UUIDv7; the AMQP message id and the consumers' dedup key.
    pub event_id: Uuid,
    /// Dotted lower-case type name, also the routing key.
    pub event_type: String,
    /// Kind of aggregate (`site`).
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Owning tenant, if any.
    pub tenant_id: Option<String>,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// Who caused it; `None` for a system action.
    pub actor: Option<String>,
    /// Request or workflow the event belongs to.
    pub correlation_id: Option<String>,
    /// Event or command that caused this one.
    pub causation_id: Option<String>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Payload schema version, from 1.
    pub schema_version: i32,
    /// The serialized payload.
    pub payload: JsonPayload,
}

impl EventEnvelope {
    /// Builds the envelope of `event`: a fresh UUIDv7, the metadata, and the
    /// payload serialized once and checked against `max_payload_bytes`.
    pub fn new<E: DomainEvent + ?Sized>(
        event: &E,
        metadata: &Metadata,
        max_payload_bytes: usize,
    ) -> Result<Self> {
        let event_type = event.event_type();
        let payload = serde_json::to_string(event).map_err(|source| Error::Serialize {
            event_type: event_type.to_owned(),
            source,
        })?;
        let envelope = Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            aggregate_type: event.aggregate_type().to_owned(),
            aggregate_id: event.aggregate_id(),
            tenant_id: event.tenant_id(),
            occurred_at: metadata.occurred_at.unwrap_or_else(Utc::now),
            actor: metadata.actor.clone(),
            correlation_id: metadata.correlation_id.clone(),
            causation_id: metadata.causation_id.clone(),
            // Without one from the caller: the current span's context
            // (feature `otel`, while exporting).
            traceparent: metadata.traceparent.clone().or_else(current_traceparent),
            schema_version: event.schema_version(),
            payload: JsonPayload(payload),
        };
        envelope.validate(max_payload_bytes)?;
        Ok(envelope)
    }

    /// Deserializes the payload into the event type it came from.
    pub fn payload_as<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        self.payload.deserialize()
    }

    /// Checks every field against the event contract and the payload
    /// against `max_payload_bytes`.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<()> {
        if !is_valid_event_type(&self.event_type) {
            return Err(Error::InvalidEvent(format!(
                "event type {:?} is not a dotted lower-case name such as site.created",
                self.event_type
            )));
        }
        check_identifier("aggregate_type", &self.aggregate_type)?;
        check_identifier("aggregate_id", &self.aggregate_id)?;
        for (name, value) in [
            ("tenant_id", &self.tenant_id),
            ("actor", &self.actor),
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
        ] {
            if let Some(value) = value {
                check_identifier(name, value)?;
            }
        }
        if let Some(traceparent) = &self.traceparent
            && !is_valid_traceparent(traceparent)
        {
            return Err(Error::InvalidEvent(format!(
                "traceparent {traceparent:?} is not W3C trace context (00-<32 hex>-<16 hex>-<2 hex>)"
            )));
        }
        if self.schema_version < 1 {
            return Err(Error::InvalidEvent(format!(
                "schema_version must be at least 1, not {}",
                self.schema_version
            )));
        }
        if self.payload.len() > max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                event_type: self.event_type.clone(),
                size: self.payload.len(),
                limit: max_payload_bytes,
            });
        }
        if has_nul_escape(self.payload.as_str()) {
            // Postgres jsonb cannot store U+0000; fail here with a clear
            // error instead of at COMMIT time with a driver message.
            return Err(Error::InvalidEvent(format!(
                "payload of {} event contains a NUL character (\\u0000), which Postgres jsonb cannot store",
                self.event_type
            )));
        }
        Ok(())
    }
}

fn check_identifier(name: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidEvent(format!("{name} must not be empty")));
    }
    if value.len() > MAX_FIELD_LEN {
        return Err(Error::InvalidEvent(format!(
            "{name} is {} bytes long, over the limit of {MAX_FIELD_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// `site.created`: at least two dot-separated segments, each a lower-case
/// letter followed by lower-case letters, digits or underscores.
pub(crate) fn is_valid_event_type(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_FIELD_LEN {
        return false;
    }
    let mut segments = 0;
    for segment in name.split('.') {
        segments += 1;
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() => {}
            _ => return false,
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return false;
        }
    }
    segments >= 2
}

fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// Whether compact JSON text contains the escape `\u0000` (an escaped NUL,
/// as opposed to an escaped backslash followed by `u0000`).
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut from = 0;
    while let Some(pos) = json[from..].find("\\u0000") {
        let at = from + pos;
        let backslashes = bytes[..=at].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 1 {
            return true;
        }
        from = at + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_names() {
        for ok in [
            "site.created",
            "site.provisioning_failed",
            "a.b.c",
            "backup2.done",
        ] {
            assert!(is_valid_event_type(ok), "{ok}");
        }
        for bad in [
            "site",
            "Site.created",
            "site.",
            ".site",
            "site..x",
            "site.1x",
            "site-x.y",
            "",
        ] {
            assert!(!is_valid_event_type(bad), "{bad}");
        }
    }

    #[test]
    fn traceparents() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent("00-4bf92f35-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
    }

    #[test]
    fn nul_escapes() {
        assert!(has_nul_escape(r#"{"a":"x\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"x\\u0000"}"#));
        assert!(has_nul_escape(r#"{"a":"x\\\u0000"}"#));
        assert!(!has_nul_escape(r#"{"a":"x"}"#));
    }
}
