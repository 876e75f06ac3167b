//! The listener registry in the database (`outbox_listeners`): a worker
//! records the listeners it runs and their queues when it starts, so
//! operators' tools find every listener without flags.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::consumer::topology::ListenerQueues;
use crate::error::Result;
use crate::schema::outbox_listeners::dsl;

/// A queued listener as its worker registered it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = crate::schema::outbox_listeners)]
pub struct RegisteredListener {
    /// Queue-name prefix of the worker's app.
    pub app: String,
    /// The listener's name.
    pub listener: String,
    /// The exchange its queue is bound to.
    pub exchange: String,
    /// `<app>.<listener>`.
    pub queue: String,
    /// Its retry queues, one per distinct backoff delay.
    pub retry_queues: Vec<String>,
    /// Its dead-letter queue.
    pub dead_queue: String,
    /// The event types its queue is bound to.
    pub event_types: Vec<String>,
    /// The worker that registered it last.
    pub worker_id: String,
    /// When.
    pub registered_at: DateTime<Utc>,
    /// Whether it records handled events in the inbox (`processed_events`);
    /// `None` when registered by an earlier release.
    pub inbox: Option<bool>,
}

/// One `outbox_listeners` row as a worker writes it.
#[derive(Insertable, AsChangeset)]
#[diesel(table_name = crate::schema::outbox_listeners)]
struct Registration<'a> {
    app: &'a str,
    listener: &'a str,
    exchange: &'a str,
    queue: &'a str,
    retry_queues: Vec<String>,
    dead_queue: &'a str,
    event_types: &'a [String],
    worker_id: &'a str,
    inbox: Option<bool>,
}

/// Records (or refreshes) the listeners a worker of `app` runs.
pub(crate) fn register(
    conn: &mut PgConnection,
    exchange: &str,
    app: &str,
    worker_id: &str,
    listeners: &[(ListenerQueues, bool)],
) -> Result<()> {
    for (queues, inbox) in listeners {
        let row = Registration {
            app,
            listener: &queues.listener,
            exchange,
            queue: &queues.queue,
            retry_queues: queues.retries.iter().map(|(_, name)| name.clone()).collect(),
            dead_queue: &queues.dead,
            event_types: &queues.event_types,
            worker_id,
            inbox: Some(*inbox),
        };
        diesel::insert_into(dsl::outbox_listeners)
            .values(&row)
            .on_conflict((dsl::app, dsl::listener))
            .do_update()
            .set((&row, dsl::registered_at.eq(diesel::dsl::now)))
            .execute(conn)?;
    }
    Ok(())
}

/// Every registered listener, by app and name.
pub fn registered_listeners(conn: &mut PgConnection) -> Result<Vec<RegisteredListener>> {
    Ok(dsl::outbox_listeners
        .select(RegisteredListener::as_select())
        .order((dsl::app, dsl::listener))
        .load(conn)?)
}

/// Removes the registrations of `listeners` of `app` (their queues were
/// deleted); returns how many rows went.
pub fn forget_registered_listeners(
    conn: &mut PgConnection,
    app: &str,
    listeners: &[String],
) -> Result<usize> {
    Ok(diesel::delete(
        dsl::outbox_listeners
            .filter(dsl::app.eq(app))
            .filter(dsl::listener.eq_any(listeners)),
    )
    .execute(conn)?)
}
