//! The account events' listeners: the registry maps the twelve events, RecordAuditLog
//! writes a row for each, SendNotification tells the current team about the
//! six that need a person, RecordMetrics counts them. [`flow`] drives all
//! twelve (the secret scan runs it too).

use std::sync::Arc;
use std::time::Duration;

use chom::listeners::{self, DatabaseNotifier, ListenerConfig, RecordAuditLog, SendNotification};
use chom::models::Role;
use chom::secret::Secret;
use chom::services::quotas::{self, Limits};
use chom::services::security::{self, FailedLoginPolicy};
use chom::services::{backups, sites, ssl, team, tenants};
use chrono::Utc;
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use uuid::Uuid;

use crate::support::{count, events, received, run_in_inbox, setup};

/// What [`flow`] did.
pub struct Flow {
    pub tenant_id: i64,
    /// The member removed from the team (notified of nothing after).
    pub removed_user_id: i64,
    /// Every event id the services returned.
    pub event_ids: Vec<Uuid>,
    /// Every secret handed out: the VPS's first credential and its
    /// rotation, the API token and its rotation.
    pub secrets: Vec<Secret>,
}

/// Drives all twelve account events for a new tenant with three users,
/// each once.
pub fn flow(outbox: &Outbox, conn: &mut PgConnection) -> Flow {
    let tenant = tenants::create_tenant(conn, "Accounts Tenant").unwrap();
    let owner = tenants::create_user(conn, tenant.id, "owner@accounts.test", "Olive").unwrap();
    let admin = tenants::create_user(conn, tenant.id, "ada@accounts.test", "Ada").unwrap();
    let leaver = tenants::create_user(conn, tenant.id, "max@accounts.test", "Max").unwrap();
    let by_owner = Metadata::by(format!("user:{}", owner.id));
    let mut ids = Vec::new();
    let mut push = |id: Uuid| ids.push(id);

    // team.*
    push(
        team::change_role(outbox, conn, by_owner.clone(), admin.id, Role::Admin)
            .unwrap()
            .event_id,
    );
    push(
        team::remove_member(outbox, conn, by_owner.clone(), leaver.id)
            .unwrap()
            .event_id,
    );
    push(
        team::transfer_ownership(outbox, conn, by_owner.clone(), tenant.id, admin.id)
            .unwrap()
            .event_id,
    );

    // ssl.*
    let site = sites::create_site(outbox, conn, by_owner.clone(), tenant.id, "shop.accounts.test").unwrap();
    push(site.event_id);
    let site_id = site.value.id;
    push(
        sites::provision_site(outbox, conn, Metadata::system(), site_id, Ok(()))
            .unwrap()
            .event_id,
    );
    let requested = ssl::request_certificate(outbox, conn, by_owner.clone(), site_id).unwrap();
    push(requested.event_id);
    push(
        ssl::issue_certificate(
            outbox,
            conn,
            Metadata::system(),
            requested.value.id,
            "Test CA",
            Utc::now() + chrono::Duration::days(3),
        )
        .unwrap()
        .event_id,
    );
    let expiring = ssl::check_expiring(outbox, conn, Metadata::system(), 7).unwrap();
    assert_eq!(expiring.len(), 1);
    push(expiring[0].event_id);

    // security.*
    let mut secrets = Vec::new();
    let (vps, first_credential) = security::add_vps(conn, tenant.id, "vps1.accounts.test").unwrap();
    secrets.push(first_credential);
    let rotated = security::rotate_vps_credentials(outbox, conn, by_owner.clone(), vps.id).unwrap();
    push(rotated.recorded.event_id);
    secrets.push(rotated.secret);
    let (token, first_token) = security::create_api_token(conn, tenant.id, "deploy").unwrap();
    secrets.push(first_token);
    let rotated = security::rotate_api_token(outbox, conn, by_owner.clone(), token.id).unwrap();
    push(rotated.recorded.event_id);
    secrets.push(rotated.secret);
    let policy = FailedLoginPolicy {
        threshold: 3,
        window: Duration::from_secs(600),
    };
    for _ in 0..3 {
        let outcome =
            security::record_failed_login(outbox, conn, Metadata::system(), owner.id, "203.0.113.5", &policy)
                .unwrap();
        if let Some(incident) = outcome.incident {
            push(incident.event_id);
        }
    }

    // quota.*
    quotas::set_quota(
        conn,
        tenant.id,
        "starter",
        &Limits {
            max_sites: Some(1),
            max_storage_bytes: Some(1_000),
            monthly_bandwidth_bytes: Some(1_000),
        },
    )
    .unwrap();
    match sites::create_site(outbox, conn, by_owner.clone(), tenant.id, "second.accounts.test") {
        Err(chom::ChomError::QuotaExceeded { event_id, .. }) => push(event_id),
        other => panic!("{other:?}"),
    }
    let backup = backups::create_backup(outbox, conn, Metadata::system(), site_id).unwrap();
    push(backup.event_id);
    let completed =
        backups::complete_backup(outbox, conn, Metadata::system(), backup.value.id, 2_000, 50).unwrap();
    for event in completed.events() {
        push(event.event_id);
    }
    let report =
        quotas::report_bandwidth(outbox, conn, Metadata::system(), site_id, 1_500, Utc::now()).unwrap();
    push(report.event.unwrap().event_id);

    Flow {
        tenant_id: tenant.id,
        removed_user_id: leaver.id,
        event_ids: ids,
        secrets,
    }
}

#[test]
fn the_registry_maps_the_account_events() {
    let registry = listeners::registry(&ListenerConfig::default()).unwrap();
    for event_type in chom::events::ACCOUNT_EVENT_TYPES {
        // The activity feed (a projection) has every tenant event.
        let mut expected = vec!["record_metrics (sync)", "tenant_activity", "record_audit_log"];
        if listeners::NOTIFIED_EVENT_TYPES.contains(&event_type) {
            expected.push("send_notification");
        }
        let names: Vec<String> = registry
            .listeners_for(event_type)
            .into_iter()
            .map(|(name, queued)| format!("{name}{}", if queued { "" } else { " (sync)" }))
            .collect();
        assert_eq!(names, expected, "{event_type}");
    }
    let notified: Vec<&str> = listeners::NOTIFIED_EVENT_TYPES
        .iter()
        .copied()
        .filter(|t| chom::events::ACCOUNT_EVENT_TYPES.contains(t))
        .collect();
    assert_eq!(
        notified,
        [
            "team.ownership_transferred",
            "ssl.certificate_expiring",
            "security.suspicious_activity_detected",
            "quota.site_quota_exceeded",
            "quota.storage_quota_exceeded",
            "quota.bandwidth_limit_reached"
        ]
    );
}

#[test]
fn audit_notifications_and_metrics_for_all_twelve() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let (_db, mut conn) = setup();
    let registry = listeners::registry(&ListenerConfig::default()).unwrap();
    let outbox = Outbox::builder().registry(registry).build().unwrap();
    let flow = metrics::with_local_recorder(&recorder, || flow(&outbox, &mut conn));

    let rows = events(&mut conn);
    assert_eq!(rows.len(), flow.event_ids.len(), "every event returned is stored");
    let mut types: Vec<&str> = rows
        .iter()
        .map(|r| r.event_type.as_str())
        .filter(|t| t.contains('.') && !t.starts_with("site.") && !t.starts_with("backup."))
        .collect();
    types.sort_unstable();
    let mut all = chom::events::ACCOUNT_EVENT_TYPES.to_vec();
    all.sort_unstable();
    assert_eq!(types, all, "each of the twelve once");

    let notify = SendNotification::new(Arc::new(DatabaseNotifier));
    for row in &rows {
        let event = received(&mut conn, row.event_id);
        assert!(run_in_inbox(&mut conn, &RecordAuditLog, &event).unwrap());
        if listeners::NOTIFIED_EVENT_TYPES.contains(&row.event_type.as_str()) {
            assert!(
                run_in_inbox(&mut conn, &notify, &event).unwrap(),
                "{}",
                row.event_type
            );
        }
    }
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        rows.len() as i64,
        "one audit row per event"
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM audit_logs WHERE action LIKE 'security.%' AND actor IS NOT NULL"
        ),
        2,
        "rotations by the owner; the failed logins' incident is a system action"
    );
    // Two current members, six notified account events.
    let notified: Vec<(String, String, i64)> = chom::schema::notifications::table
        .order((
            chom::schema::notifications::kind,
            chom::schema::notifications::user_id,
        ))
        .select((
            chom::schema::notifications::kind,
            chom::schema::notifications::subject,
            chom::schema::notifications::user_id,
        ))
        .load(&mut conn)
        .unwrap();
    assert_eq!(notified.len(), 12, "{notified:#?}");
    assert!(
        notified.iter().all(|(_, _, user)| *user != flow.removed_user_id),
        "a removed member hears nothing"
    );
    let subjects: Vec<String> = notified.iter().step_by(2).map(|(_, s, _)| s.clone()).collect();
    assert_eq!(
        subjects,
        [
            "Bandwidth limit of the starter plan reached for ".to_owned()
                + &Utc::now().format("%Y-%m").to_string(),
            "Site quota of the starter plan reached".to_owned(),
            "Storage quota of the starter plan exceeded".to_owned(),
            "Suspicious sign-in attempts on owner@accounts.test".to_owned(),
            "The SSL certificate of shop.accounts.test expires in 2 day(s)".to_owned(),
            "ada@accounts.test now owns your team".to_owned(),
        ]
    );

    let text = handle.render();
    for (_, counter, _) in listeners::ACCOUNT_COUNTERS {
        assert!(text.contains(&format!("{counter} 1")), "{counter} in:\n{text}");
    }
    assert_eq!(
        flow.tenant_id,
        rows[0].tenant_id.as_deref().unwrap().parse::<i64>().unwrap()
    );
}
