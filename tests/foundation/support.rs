//! A tiny domain for the tests: widgets, and the events about them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
pub use outbox::testing::count;
use outbox::{DomainEvent, TestDatabase};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WidgetCreated {
    pub widget_id: i64,
    pub name: String,
    pub tenant: Option<String>,
}

impl DomainEvent for WidgetCreated {
    fn event_type(&self) -> &'static str {
        "widget.created"
    }
    fn aggregate_type(&self) -> &'static str {
        "widget"
    }
    fn aggregate_id(&self) -> String {
        self.widget_id.to_string()
    }
    fn tenant_id(&self) -> Option<String> {
        self.tenant.clone()
    }
    fn schema_version(&self) -> i32 {
        2
    }
}

/// An event whose payload is `size` bytes of filler.
#[derive(Debug, Clone, Serialize)]
pub struct Blob {
    pub filler: String,
}

impl Blob {
    /// A blob whose serialized payload is exactly `bytes` long.
    pub fn of_serialized_len(bytes: usize) -> Self {
        // {"filler":"..."} has 13 bytes of framing.
        Self {
            filler: "x".repeat(bytes - 13),
        }
    }
}

impl DomainEvent for Blob {
    fn event_type(&self) -> &'static str {
        "blob.stored"
    }
    fn aggregate_type(&self) -> &'static str {
        "blob"
    }
    fn aggregate_id(&self) -> String {
        "1".into()
    }
}

/// A migrated test database with a `widgets` domain table.
pub fn database() -> (TestDatabase, PgConnection) {
    let db = TestDatabase::create().expect("create test database");
    let mut conn = db.connect().expect("connect");
    diesel::sql_query(
        "CREATE TABLE widgets (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name TEXT NOT NULL)",
    )
    .execute(&mut conn)
    .expect("create widgets");
    (db, conn)
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The domain write of the tests.
pub fn insert_widget(conn: &mut PgConnection, name: &str) -> QueryResult<i64> {
    diesel::sql_query("INSERT INTO widgets (name) VALUES ($1) RETURNING id")
        .bind::<Text, _>(name)
        .get_result::<Id>(conn)
        .map(|row| row.id)
}

/// One stored row, read back as the relay will read it.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = outbox::schema::outbox_events)]
pub struct StoredRow {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub tenant_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub actor: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub published_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub failed_at: Option<DateTime<Utc>>,
}

pub fn stored_rows(conn: &mut PgConnection) -> Vec<StoredRow> {
    use outbox::schema::outbox_events::dsl::*;
    outbox_events
        .order(seq)
        .select(StoredRow::as_select())
        .load(conn)
        .expect("load outbox rows")
}
