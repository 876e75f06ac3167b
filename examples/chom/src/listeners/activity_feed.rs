//! The tenant activity feed (a projection, `tenant_activity`): one line
//! per event of a tenant ("site shop.example.com created by user:7"),
//! written from the events alone, so `outbox projection rebuild
//! tenant_activity` recreates it from the event log.

use diesel::prelude::*;
use outbox::projection::Projection;
use outbox::{ListenerError, ReceivedEvent};

use crate::events::EVENT_TYPES;
use crate::listeners::tenant_id;
use crate::schema::tenant_activity;

/// The projection's name (its listener and queue).
pub const TENANT_ACTIVITY: &str = "tenant_activity";

/// Feeds `tenant_activity`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TenantActivity;

/// One line of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Insertable, serde::Serialize)]
#[diesel(table_name = tenant_activity)]
pub struct ActivityLine {
    /// The event.
    pub event_id: uuid::Uuid,
    /// Its tenant.
    pub tenant_id: i64,
    /// Its type.
    pub event_type: String,
    /// When it happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// Who did it (`None`: the system).
    pub actor: Option<String>,
    /// What it is about (`site 12`).
    pub subject: String,
    /// The line shown.
    pub summary: String,
}

fn line(event: &ReceivedEvent) -> Result<ActivityLine, ListenerError> {
    let data: serde_json::Value = event.data_as()?;
    let domain = data["domain"].as_str().unwrap_or("?");
    let (what, verb) = event
        .event_type
        .split_once('.')
        .unwrap_or((&event.event_type, "happened"));
    let by = event
        .actor
        .as_deref()
        .map(|a| format!(" by {a}"))
        .unwrap_or_default();
    Ok(ActivityLine {
        event_id: event.event_id,
        tenant_id: tenant_id(event)?,
        event_type: event.event_type.clone(),
        occurred_at: event.occurred_at,
        actor: event.actor.clone(),
        subject: format!("{} {}", event.aggregate_type, event.aggregate_id),
        summary: format!("{what} {domain} {}{by}", verb.replace('_', " ")),
    })
}

impl Projection for TenantActivity {
    fn name(&self) -> &str {
        TENANT_ACTIVITY
    }

    fn event_types(&self) -> Vec<String> {
        EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect()
    }

    fn reset(&self, conn: &mut PgConnection) -> Result<(), ListenerError> {
        diesel::delete(tenant_activity::table).execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut PgConnection, events: &[ReceivedEvent]) -> Result<(), ListenerError> {
        let lines = events.iter().map(line).collect::<Result<Vec<_>, _>>()?;
        for chunk in lines.chunks(1000) {
            diesel::insert_into(tenant_activity::table)
                .values(chunk)
                .on_conflict_do_nothing()
                .execute(conn)?;
        }
        Ok(())
    }
}

/// The newest `limit` lines of `tenant`'s feed.
pub fn recent(conn: &mut PgConnection, tenant: i64, limit: i64) -> QueryResult<Vec<ActivityLine>> {
    tenant_activity::table
        .filter(tenant_activity::tenant_id.eq(tenant))
        .order(tenant_activity::occurred_at.desc())
        .limit(limit.clamp(1, 1000))
        .load(conn)
}
