//! The worker's own AMQP headers, and the header arithmetic of retry and
//! dead-letter copies (a copy must still fit one frame).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

/// Header marking a message this worker sent to a retry queue. Only a
/// hint that Postgres holds an attempt count for it; never trusted as one.
pub const RETRY_HEADER: &str = "x-outbox-retry";
/// Header naming the failed job of a dead-lettered message.
pub const FAILED_JOB_HEADER: &str = "x-outbox-failed-job";
/// Header with the (cut) final error of a dead-lettered message.
pub const ERROR_HEADER: &str = "x-outbox-error";
/// Header counting the publisher's headers left off a retry or
/// dead-letter copy because the table was too large.
pub const HEADERS_DROPPED_HEADER: &str = "x-outbox-headers-dropped";
/// Longest error text put in [`ERROR_HEADER`].
pub(crate) const MAX_ERROR_HEADER_BYTES: usize = 1024;
/// Largest header table (on the wire) of the publisher's kept on a retry
/// or dead-letter copy. A content header must fit one frame (RabbitMQ's
/// default frame_max is 128 KiB): a message whose headers only just fit
/// would not fit with the worker's own headers added, the copy could never
/// be published, and the message would be held and redelivered for ever.
const MAX_COPIED_HEADER_BYTES: usize = 64 * 1024;

/// The message's headers for a retry or dead-letter copy: entries are kept
/// while the table stays within [`MAX_COPIED_HEADER_BYTES`]; the number
/// left off, if any, goes in [`HEADERS_DROPPED_HEADER`].
pub(crate) fn copied_headers(properties: &BasicProperties) -> FieldTable {
    let mut kept = FieldTable::default();
    let Some(original) = properties.headers().as_ref() else {
        return kept;
    };
    let (mut size, mut dropped) = (0usize, 0u32);
    for (key, value) in original.inner() {
        let entry = 1 + key.as_str().len() + encoded_size(value);
        if size + entry <= MAX_COPIED_HEADER_BYTES {
            kept.insert(key.clone(), value.clone());
            size += entry;
        } else {
            dropped = dropped.saturating_add(1);
        }
    }
    if dropped > 0 {
        kept.insert(HEADERS_DROPPED_HEADER.into(), AMQPValue::LongUInt(dropped));
    }
    kept
}

/// Bytes `value` takes in an AMQP field table (type octet included).
pub(crate) fn encoded_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => {
            4 + t
                .inner()
                .iter()
                .map(|(k, v)| 1 + k.as_str().len() + encoded_size(v))
                .sum::<usize>()
        }
    }
}

pub(crate) fn has_header(properties: &BasicProperties, name: &str) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.contains_key(name))
}

/// The broker's `x-delivery-count` (quorum queues), clamped to 0..=1000.
/// Only consulted together with the broker's `redelivered` flag.
pub(crate) fn delivery_count(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    let value = headers.inner().get("x-delivery-count");
    let count: i64 = match value {
        Some(AMQPValue::ShortShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortShortUInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortInt(v)) => i64::from(*v),
        Some(AMQPValue::ShortUInt(v)) => i64::from(*v),
        Some(AMQPValue::LongInt(v)) => i64::from(*v),
        Some(AMQPValue::LongUInt(v)) => i64::from(*v),
        Some(AMQPValue::LongLongInt(v)) => *v,
        _ => 0,
    };
    u32::try_from(count.clamp(0, 1000)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_counts_are_clamped() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(i64::MAX));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(delivery_count(&properties), 1000);
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(-5));
        assert_eq!(
            delivery_count(&BasicProperties::default().with_headers(headers)),
            0
        );
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
    }

    #[test]
    fn copies_keep_headers_up_to_a_bound() {
        let mut headers = FieldTable::default();
        headers.insert("small".into(), AMQPValue::LongInt(1));
        for i in 0..200 {
            headers.insert(
                format!("x-bulk-{i:04}").into(),
                AMQPValue::LongString("v".repeat(990).as_str().into()),
            );
        }
        let kept = copied_headers(&BasicProperties::default().with_headers(headers));
        let size: usize = kept
            .inner()
            .iter()
            .map(|(k, v)| 1 + k.as_str().len() + encoded_size(v))
            .sum();
        assert!(size <= MAX_COPIED_HEADER_BYTES + 64, "{size}");
        assert!(kept.contains_key("small"));
        assert!(matches!(
            kept.inner().get(HEADERS_DROPPED_HEADER),
            Some(AMQPValue::LongUInt(n)) if *n > 100
        ));
        let few = copied_headers(&BasicProperties::default());
        assert!(few.inner().is_empty());
    }
}
