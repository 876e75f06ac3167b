//! Shared setup and read-back helpers.

use chom::{Tenant, User};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::schema::outbox_events;
pub use outbox::testing::count;
use uuid::Uuid;

/// A fresh, migrated database and a connection to it. Keep the
/// `TestDatabase` alive for the test: dropping it drops the database.
pub fn setup() -> (TestDatabase, PgConnection) {
    let db = TestDatabase::create_empty().expect("create test database");
    let mut conn = db.connect().expect("connect to test database");
    chom::migrate(&mut conn).expect("run chom migrations");
    (db, conn)
}

/// A tenant with one user.
pub fn tenant_with_user(conn: &mut PgConnection, name: &str) -> (Tenant, User) {
    let tenant = chom::services::tenants::create_tenant(conn, name).unwrap();
    let email = format!("owner@{}.test", name.to_lowercase().replace(' ', "-"));
    let user = chom::services::tenants::create_user(conn, tenant.id, &email, "Owner").unwrap();
    (tenant, user)
}

/// One row of `outbox_events`, the columns the tests check.
#[derive(Debug, Queryable)]
#[allow(dead_code)] // every field is printed on failure, not all are asserted
pub struct EventRow {
    pub seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub tenant_id: Option<String>,
    pub actor: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
}

/// Every row of `outbox_events`, in seq order.
pub fn events(conn: &mut PgConnection) -> Vec<EventRow> {
    use outbox::schema::outbox_events::dsl::*;
    outbox_events
        .order(seq)
        .select((
            seq,
            event_id,
            event_type,
            aggregate_type,
            aggregate_id,
            tenant_id,
            actor,
            correlation_id,
            causation_id,
            schema_version,
            payload,
            occurred_at,
        ))
        .load(conn)
        .unwrap()
}

/// The single event row, failing the test if there is not exactly one.
pub fn only_event(conn: &mut PgConnection) -> EventRow {
    let mut rows = events(conn);
    assert_eq!(rows.len(), 1, "expected exactly one event: {rows:#?}");
    rows.remove(0)
}

/// Number of rows in `outbox_events`.
pub fn event_count(conn: &mut PgConnection) -> i64 {
    outbox_events::table.count().get_result(conn).unwrap()
}

/// Checks the envelope fields every CHOM event shares.
#[track_caller]
pub fn assert_envelope(
    row: &EventRow,
    event_id: Uuid,
    event_type: &str,
    aggregate_type: &str,
    aggregate_id: i64,
    tenant_id: i64,
    actor: Option<&str>,
) {
    assert_eq!(row.event_id, event_id, "event id returned by the service");
    assert_eq!(row.event_id.get_version_num(), 7, "event ids are UUIDv7");
    assert_eq!(row.event_type, event_type);
    assert_eq!(row.aggregate_type, aggregate_type);
    assert_eq!(row.aggregate_id, aggregate_id.to_string());
    assert_eq!(row.tenant_id.as_deref(), Some(tenant_id.to_string().as_str()));
    assert_eq!(row.actor.as_deref(), actor, "actor (NULL for a system action)");
    assert_eq!(row.schema_version, 1);
}

/// The stored event `event_id` as a worker would receive it: encoded by
/// the relay's CloudEvents encoder, decoded by the consumer's decoder.
pub fn received(conn: &mut PgConnection, id: Uuid) -> outbox::ReceivedEvent {
    use outbox::schema::outbox_events::dsl;
    #[allow(clippy::type_complexity)]
    let row: (
        String,
        String,
        String,
        Option<String>,
        DateTime<Utc>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i32,
        serde_json::Value,
    ) = dsl::outbox_events
        .filter(dsl::event_id.eq(id))
        .select((
            dsl::event_type,
            dsl::aggregate_type,
            dsl::aggregate_id,
            dsl::tenant_id,
            dsl::occurred_at,
            dsl::actor,
            dsl::correlation_id,
            dsl::causation_id,
            dsl::traceparent,
            dsl::schema_version,
            dsl::payload,
        ))
        .first(conn)
        .unwrap();
    let payload = row.10.to_string();
    let event = outbox::cloudevents::EventRef {
        event_id: id,
        event_type: &row.0,
        aggregate_type: &row.1,
        aggregate_id: &row.2,
        tenant_id: row.3.as_deref(),
        occurred_at: row.4,
        actor: row.5.as_deref(),
        correlation_id: row.6.as_deref(),
        causation_id: row.7.as_deref(),
        traceparent: row.8.as_deref(),
        schema_version: row.9,
        payload_json: &payload,
    };
    outbox::consumer::decode(&outbox::cloudevents::encode_body(&event, "/chom").unwrap()).unwrap()
}

/// Runs queued `listener` on `event` as the worker would with the inbox:
/// claim, handle, commit together. Returns false for a duplicate.
pub fn run_in_inbox(
    conn: &mut PgConnection,
    listener: &dyn outbox::QueuedListener,
    event: &outbox::ReceivedEvent,
) -> Result<bool, outbox::ListenerError> {
    conn.transaction(|conn| {
        if !outbox::inbox::claim(conn, listener.name(), event.event_id)? {
            return Ok(false);
        }
        let mut ctx = outbox::HandlerContext::with_transaction(conn, 1, 3);
        listener.handle(event, &mut ctx)?;
        Ok(true)
    })
}

/// Runs queued `listener` on `event` without the inbox (a plain
/// connection).
pub fn run_plain(
    conn: &mut PgConnection,
    listener: &dyn outbox::QueuedListener,
    event: &outbox::ReceivedEvent,
) -> Result<(), outbox::ListenerError> {
    let mut ctx = outbox::HandlerContext::with_transaction(conn, 1, 3);
    listener.handle(event, &mut ctx)
}

/// Metadata whose actor is over the contract's 255 bytes: `record()` fails
/// with it, after the service's domain writes ran in the same transaction,
/// so the whole transaction rolls back.
pub fn failing_metadata() -> outbox::Metadata {
    outbox::Metadata::by("x".repeat(300))
}

/// Checks a service failed because its event could not be recorded.
#[track_caller]
pub fn assert_rolled_back<T: std::fmt::Debug>(result: chom::Result<T>) {
    assert!(
        matches!(
            result,
            Err(chom::ChomError::Outbox(outbox::Error::InvalidEvent(_)))
        ),
        "{result:?}"
    );
}

/// The rows of `outbox_events` of type `event_type`, in seq order.
pub fn events_of(conn: &mut PgConnection, event_type: &str) -> Vec<EventRow> {
    events(conn)
        .into_iter()
        .filter(|row| row.event_type == event_type)
        .collect()
}

/// The sorted keys of a JSON object.
pub fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}
