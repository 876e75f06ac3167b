//! "Where is my event?": events found by event id, aggregate id or
//! correlation id, and an aggregate's timeline: each event in order,
//! whether and when it was published, and per listener bound to its type
//! whether it was handled (inbox), is being retried (attempt counts) or
//! failed (a failed job).
//!
//! Reads `outbox_events` and the event log (`outbox_event_log`), so every
//! event the log still keeps appears; an inbox row pruned past the
//! worker's inbox retention reads as not yet handled.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::consumer::RegisteredListener;
use crate::error::{Error, Result};
use crate::event_log::envelope_columns;

/// The most events [`search`] and [`aggregate_timeline`] return.
pub const MAX_EVENTS: i64 = 1_000;

/// An event as stored, with its publishing state.
#[derive(Debug, Clone, PartialEq, QueryableByName, serde::Serialize)]
pub struct StoredEvent {
    /// Commit-order position.
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    /// The event id.
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    /// Its type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Its aggregate's type.
    #[diesel(sql_type = Text)]
    pub aggregate_type: String,
    /// Its aggregate's id.
    #[diesel(sql_type = Text)]
    pub aggregate_id: String,
    /// Its tenant.
    #[diesel(sql_type = Nullable<Text>)]
    pub tenant_id: Option<String>,
    /// Who caused it.
    #[diesel(sql_type = Nullable<Text>)]
    pub actor: Option<String>,
    /// Its correlation id.
    #[diesel(sql_type = Nullable<Text>)]
    pub correlation_id: Option<String>,
    /// Its causation id.
    #[diesel(sql_type = Nullable<Text>)]
    pub causation_id: Option<String>,
    /// When it happened.
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    /// When it was committed.
    #[diesel(sql_type = Timestamptz)]
    pub recorded_at: DateTime<Utc>,
    /// When the broker confirmed it.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub published_at: Option<DateTime<Utc>>,
    /// Publish attempts that failed.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Why the last publish attempt failed.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// When it exhausted its publish attempts.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub failed_at: Option<DateTime<Utc>>,
    /// When the broker returned it as unroutable.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub unroutable_at: Option<DateTime<Utc>>,
    /// Its payload.
    #[diesel(sql_type = Jsonb)]
    pub payload: serde_json::Value,
}

const EVENT_COLUMNS: &str = concat!(
    envelope_columns!(),
    ", published_at, attempts, last_error, failed_at, unroutable_at, payload"
);

/// The same columns of an event in the event log (published, never failed).
const LOGGED_COLUMNS: &str = concat!(
    envelope_columns!(),
    ", published_at, 0 AS attempts, NULL::text AS last_error, NULL::timestamptz AS failed_at, \
     NULL::timestamptz AS unroutable_at, payload"
);

/// Events whose id, aggregate id or correlation id is `text` (an id is
/// matched only when `text` is a UUID), newest first, at most `limit`.
pub fn search(conn: &mut PgConnection, text: &str, limit: i64) -> Result<Vec<StoredEvent>> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::InvalidInput(
            "give an event id, an aggregate id or a correlation id".into(),
        ));
    }
    if text.len() > 255 {
        return Err(Error::InvalidInput("ids are at most 255 characters".into()));
    }
    let limit = checked_limit(limit)?;
    let event_id = Uuid::parse_str(text).ok();
    // Three indexed lookups (event id, aggregate id, correlation id).
    Ok(diesel::sql_query(format!(
        "SELECT {EVENT_COLUMNS} FROM outbox_events WHERE event_id = $1
         UNION
         SELECT {EVENT_COLUMNS} FROM outbox_events WHERE aggregate_id = $2
         UNION
         SELECT {EVENT_COLUMNS} FROM outbox_events WHERE correlation_id = $2
         UNION
         SELECT {LOGGED_COLUMNS} FROM outbox_event_log WHERE event_id = $1
         UNION
         SELECT {LOGGED_COLUMNS} FROM outbox_event_log WHERE aggregate_id = $2
         UNION
         SELECT {LOGGED_COLUMNS} FROM outbox_event_log WHERE correlation_id = $2
         ORDER BY seq DESC LIMIT $3"
    ))
    .bind::<Nullable<SqlUuid>, _>(event_id)
    .bind::<Text, _>(text)
    .bind::<BigInt, _>(limit)
    .load(conn)?)
}

fn checked_limit(limit: i64) -> Result<i64> {
    if (1..=MAX_EVENTS).contains(&limit) {
        Ok(limit)
    } else {
        Err(Error::InvalidInput(format!(
            "limit must be between 1 and {MAX_EVENTS}, not {limit}"
        )))
    }
}

/// Where one listener stands with one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ListenerState {
    /// Its inbox holds the event: handled once, at this time.
    Handled {
        /// When.
        at: DateTime<Utc>,
    },
    /// It failed for good: failed job `failed_job`.
    Failed {
        /// The failed job's id.
        failed_job: i64,
        /// When.
        at: DateTime<Utc>,
        /// The final error.
        error: String,
    },
    /// It failed `attempts` times and is being retried.
    Retrying {
        /// Failed tries so far.
        attempts: i32,
        /// When the last failed.
        at: DateTime<Utc>,
    },
    /// None of the above: in its queue, or the event is unpublished, or the
    /// inbox row was pruned.
    Pending,
    /// Published, neither retrying nor failed, and the listener keeps no
    /// inbox, so whether it ran yet is not recorded.
    Untracked,
}

/// One listener's state for one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ListenerOutcome {
    /// The listener's app.
    pub app: String,
    /// The listener.
    pub listener: String,
    /// Its queue (`<app>.<listener>`), whose consumers say whether a
    /// worker runs it.
    pub queue: String,
    /// Where it stands.
    pub state: ListenerState,
}

/// One event of a timeline with every bound listener's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TimelineEntry {
    /// The event.
    pub event: StoredEvent,
    /// The registered listeners bound to its type, by app and name.
    pub listeners: Vec<ListenerOutcome>,
}

/// The events of one aggregate in commit order (the first `limit`), each
/// with the state of every registered listener bound to its type.
pub fn aggregate_timeline(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    limit: i64,
) -> Result<Vec<TimelineEntry>> {
    let limit = checked_limit(limit)?;
    let events: Vec<StoredEvent> = diesel::sql_query(format!(
        "SELECT {EVENT_COLUMNS} FROM outbox_events
         WHERE aggregate_id = $1 AND aggregate_type = $2
         UNION ALL
         SELECT {LOGGED_COLUMNS} FROM outbox_event_log
         WHERE aggregate_id = $1 AND aggregate_type = $2
         ORDER BY seq LIMIT $3"
    ))
    .bind::<Text, _>(aggregate_id)
    .bind::<Text, _>(aggregate_type)
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    let listeners = crate::consumer::registered_listeners(conn)?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let marks = Marks::load(conn, &ids)?;
    Ok(events
        .into_iter()
        .map(|event| TimelineEntry {
            listeners: outcomes(&event, &listeners, &marks),
            event,
        })
        .collect())
}

/// What the inbox, the attempt counts and failed jobs say about a set of
/// events.
struct Marks {
    handled: Vec<(String, Uuid, DateTime<Utc>)>,
    retrying: Vec<crate::consumer::attempts::RetryingEvent>,
    failed: Vec<FailedMark>,
}

/// `(listener, event, failed job id, failed at, final error)`.
type FailedMark = (String, Uuid, i64, DateTime<Utc>, String);
type FailedRow = (String, Option<Uuid>, i64, DateTime<Utc>, String);

impl Marks {
    fn load(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Self> {
        use crate::schema::{failed_jobs, processed_events};
        let handled = processed_events::table
            .filter(processed_events::event_id.eq_any(ids))
            .select((
                processed_events::listener,
                processed_events::event_id,
                processed_events::processed_at,
            ))
            .load(conn)?;
        let retrying = crate::consumer::attempts::attempts_for(conn, ids)?;
        let failed: Vec<FailedRow> = failed_jobs::table
            .filter(failed_jobs::event_id.eq_any(ids))
            .select((
                failed_jobs::listener,
                failed_jobs::event_id,
                failed_jobs::id,
                failed_jobs::failed_at,
                failed_jobs::exception,
            ))
            .load(conn)?;
        Ok(Self {
            handled,
            retrying,
            failed: failed
                .into_iter()
                .filter_map(|(l, e, id, at, error)| e.map(|e| (l, e, id, at, error)))
                .collect(),
        })
    }

    fn state(&self, listener: &str, event_id: Uuid) -> ListenerState {
        if let Some((_, _, at)) = self
            .handled
            .iter()
            .find(|(l, e, _)| l == listener && *e == event_id)
        {
            return ListenerState::Handled { at: *at };
        }
        if let Some((_, _, id, at, error)) = self
            .failed
            .iter()
            .find(|(l, e, ..)| l == listener && *e == event_id)
        {
            return ListenerState::Failed {
                failed_job: *id,
                at: *at,
                error: error.clone(),
            };
        }
        if let Some((_, _, attempts, at)) = self
            .retrying
            .iter()
            .find(|(l, e, ..)| l == listener && *e == event_id)
        {
            return ListenerState::Retrying {
                attempts: *attempts,
                at: *at,
            };
        }
        ListenerState::Pending
    }
}

fn outcomes(event: &StoredEvent, listeners: &[RegisteredListener], marks: &Marks) -> Vec<ListenerOutcome> {
    listeners
        .iter()
        .filter(|l| l.event_types.contains(&event.event_type))
        .map(|l| ListenerOutcome {
            app: l.app.clone(),
            listener: l.listener.clone(),
            queue: l.queue.clone(),
            state: match marks.state(&l.listener, event.event_id) {
                ListenerState::Pending if l.inbox == Some(false) && event.published_at.is_some() => {
                    ListenerState::Untracked
                }
                state => state,
            },
        })
        .collect()
}
