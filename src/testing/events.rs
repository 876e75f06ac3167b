//! A small event for tests and scratch runs, and helpers that record many
//! of them: per-aggregate order is checkable from the payload's counter.

use std::ops::Range;

use diesel::{Connection, PgConnection};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::outbox::Outbox;

/// `counter.ticked`: tick number `n` of counter `aggregate` (tenant
/// `tenant-1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticked {
    /// The counter (aggregate id).
    pub aggregate: String,
    /// The tick, increasing per counter.
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

/// Records ticks `ticks` of counter `aggregate`, one transaction each, and
/// returns their event ids.
pub fn record_ticks(conn: &mut PgConnection, aggregate: &str, ticks: Range<i64>) -> Result<Vec<Uuid>> {
    ticks
        .map(|n| {
            conn.transaction::<_, Error, _>(|conn| {
                crate::record(
                    conn,
                    &Ticked {
                        aggregate: aggregate.to_owned(),
                        n,
                    },
                )
            })
        })
        .collect()
}

/// Records ticks `ticks` of counters `a0`..`a{aggregates-1}`, interleaved:
/// one transaction per tick holding that tick of every counter. Returns
/// how many events it recorded.
pub fn record_interleaved(conn: &mut PgConnection, aggregates: usize, ticks: Range<i64>) -> Result<usize> {
    let outbox = Outbox::new();
    let mut recorded = 0;
    for n in ticks {
        let envelopes = (0..aggregates)
            .map(|a| {
                outbox.envelope(
                    &Ticked {
                        aggregate: format!("a{a}"),
                        n,
                    },
                    &Metadata::system(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        recorded += envelopes.len();
        conn.transaction::<_, Error, _>(|conn| outbox.record_batch(conn, &envelopes))?;
    }
    Ok(recorded)
}

/// Takes `count` messages from `queue` with `basic.get` (acknowledged as
/// taken), waiting up to `limit` for them: each one's aggregate and tick,
/// `(subject, data.n)` of its [`Ticked`] CloudEvents body, in arrival
/// order. Panics when they do not all arrive in time or a body is not a
/// tick.
pub async fn take_ticks(
    channel: &lapin::Channel,
    queue: &str,
    count: usize,
    limit: std::time::Duration,
) -> Vec<(String, i64)> {
    let deadline = std::time::Instant::now() + limit;
    let mut ticks = Vec::new();
    while ticks.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {count} messages reached {queue} within {limit:?}",
            ticks.len()
        );
        let got = channel
            .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("cannot get from {queue}: {e}"));
        match got {
            Some(message) => {
                let body: serde_json::Value = serde_json::from_slice(&message.delivery.data)
                    .unwrap_or_else(|e| panic!("a message in {queue} is not JSON: {e}"));
                match (body["subject"].as_str(), body["data"]["n"].as_i64()) {
                    (Some(aggregate), Some(n)) => ticks.push((aggregate.to_owned(), n)),
                    _ => panic!("a message in {queue} is not a tick: {body}"),
                }
            }
            None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    ticks
}
