//! The four listeners, run directly on stored events (no broker): what
//! each writes, how it treats duplicates, gone tenants and outages.

use std::sync::Arc;

use chom::listeners::{
    self, DatabaseNotifier, ListenerConfig, RecordAuditLog, RecordMetrics, SendNotification,
    SwitchableNotifier, UpdateTenantMetrics,
};
use chom::schema::tenant_stats;
use chom::services::{backups, sites, tenants};
use diesel::prelude::*;
use outbox::{ListenerError, Metadata, Outbox, SyncListener};

use crate::support::{count, received, run_in_inbox, run_plain, setup, tenant_with_user};

#[test]
fn the_registry_maps_events_as_the_seed_does() {
    let registry = listeners::registry(&ListenerConfig::default()).unwrap();
    let names = |event_type: &str| -> Vec<String> {
        registry
            .listeners_for(event_type)
            .into_iter()
            .map(|(name, queued)| format!("{name}{}", if queued { "" } else { " (sync)" }))
            .collect()
    };
    for event_type in [
        "site.created",
        "site.provisioned",
        "site.deleted",
        "backup.created",
        "backup.completed",
    ] {
        assert_eq!(
            names(event_type),
            [
                "record_metrics (sync)",
                "update_tenant_metrics",
                "tenant_activity",
                "record_audit_log"
            ],
            "{event_type}"
        );
    }
    for event_type in ["site.provisioning_failed", "backup.failed"] {
        assert_eq!(
            names(event_type),
            [
                "record_metrics (sync)",
                "update_tenant_metrics",
                "tenant_activity",
                "record_audit_log",
                "send_notification"
            ],
            "{event_type}"
        );
    }
    let options = registry
        .queued_listener_named("record_audit_log")
        .unwrap()
        .options();
    assert_eq!(options.tries, 3, "the seed's tries");
    assert_eq!(
        options.backoff.iter().map(|d| d.as_secs()).collect::<Vec<_>>(),
        [30, 60, 120],
        "the seed's backoff"
    );
    assert!(options.inbox);
    for projection in ["update_tenant_metrics", "tenant_activity"] {
        assert!(
            registry
                .queued_listener_named(projection)
                .unwrap()
                .options()
                .inbox,
            "{projection} is a projection: the inbox is what its rebuild hands over with"
        );
    }
}

#[test]
fn update_tenant_metrics_recounts_from_the_source_tables() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let a = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
    let b = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "b.test").unwrap();
    sites::provision_site(&outbox, &mut conn, Metadata::system(), a.value.id, Ok(())).unwrap();
    sites::provision_site(&outbox, &mut conn, Metadata::system(), b.value.id, Ok(())).unwrap();
    let backup = backups::create_backup(&outbox, &mut conn, Metadata::system(), a.value.id).unwrap();
    backups::complete_backup(&outbox, &mut conn, Metadata::system(), backup.value.id, 5000, 10).unwrap();
    let failed = backups::create_backup(&outbox, &mut conn, Metadata::system(), b.value.id).unwrap();
    backups::fail_backup(
        &outbox,
        &mut conn,
        Metadata::system(),
        failed.value.id,
        "disk full",
    )
    .unwrap();
    let deleted = sites::delete_site(&outbox, &mut conn, Metadata::system(), b.value.id).unwrap();

    let event = received(&mut conn, deleted.event_id);
    // Any number of deliveries give the same row.
    for _ in 0..3 {
        run_plain(&mut conn, &UpdateTenantMetrics, &event).unwrap();
    }
    let stats: (i64, i64, i64, i64, i64) = tenant_stats::table
        .find(tenant.id)
        .select((
            tenant_stats::site_count,
            tenant_stats::active_site_count,
            tenant_stats::storage_bytes,
            tenant_stats::backup_count,
            tenant_stats::failed_backup_count,
        ))
        .first(&mut conn)
        .unwrap();
    assert_eq!(stats, (1, 1, 5000, 2, 1));
}

#[test]
fn update_tenant_metrics_skips_a_deleted_tenant() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Gone");
    let created = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "gone.test").unwrap();
    let event = received(&mut conn, created.event_id);
    diesel::delete(chom::schema::tenants::table.find(tenant.id))
        .execute(&mut conn)
        .unwrap();
    run_plain(&mut conn, &UpdateTenantMetrics, &event).unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM tenant_stats"), 0);
}

#[test]
fn record_audit_log_writes_one_row_per_event_with_or_without_actor() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    let actor = format!("user:{}", user.id);
    let created = sites::create_site(&outbox, &mut conn, Metadata::by(&actor), tenant.id, "a.test").unwrap();
    let provisioned =
        sites::provision_site(&outbox, &mut conn, Metadata::system(), created.value.id, Ok(())).unwrap();

    let by_user = received(&mut conn, created.event_id);
    let by_system = received(&mut conn, provisioned.event_id);
    assert!(run_in_inbox(&mut conn, &RecordAuditLog, &by_user).unwrap());
    assert!(
        !run_in_inbox(&mut conn, &RecordAuditLog, &by_user).unwrap(),
        "a duplicate"
    );
    assert!(run_in_inbox(&mut conn, &RecordAuditLog, &by_system).unwrap());

    #[derive(Queryable, Debug)]
    struct Audit {
        tenant_id: Option<i64>,
        actor: Option<String>,
        action: String,
        aggregate_type: String,
        aggregate_id: String,
        details: serde_json::Value,
    }
    use chom::schema::audit_logs::dsl;
    let rows: Vec<Audit> = dsl::audit_logs
        .order(dsl::id)
        .select((
            dsl::tenant_id,
            dsl::actor,
            dsl::action,
            dsl::aggregate_type,
            dsl::aggregate_id,
            dsl::details,
        ))
        .load(&mut conn)
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0].tenant_id, Some(tenant.id));
    assert_eq!(rows[0].actor.as_deref(), Some(actor.as_str()));
    assert_eq!(rows[0].action, "site.created");
    assert_eq!(rows[0].aggregate_type, "site");
    assert_eq!(rows[0].aggregate_id, created.value.id.to_string());
    assert_eq!(rows[0].details["domain"], "a.test");
    assert_eq!(rows[1].actor, None, "a system action");
    assert_eq!(rows[1].action, "site.provisioned");
}

#[test]
fn send_notification_notifies_every_user_once_and_retries_an_outage() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    tenants::create_user(&mut conn, tenant.id, "second@acme.test", "Second").unwrap();
    let (other, _) = tenant_with_user(&mut conn, "Other");
    let site = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
    let failed = sites::provision_site(
        &outbox,
        &mut conn,
        Metadata::system(),
        site.value.id,
        Err("no capacity".into()),
    )
    .unwrap();
    let event = received(&mut conn, failed.event_id);

    let (notifier, switch) = SwitchableNotifier::new(DatabaseNotifier);
    let listener = SendNotification::new(Arc::new(notifier));
    switch.down();
    let outage = run_in_inbox(&mut conn, &listener, &event).unwrap_err();
    assert!(matches!(outage, ListenerError::Transient(_)), "{outage}");
    assert!(outage.to_string().contains("notifier unavailable"), "{outage}");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM notifications"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM processed_events"),
        0,
        "rolled back"
    );

    switch.up();
    assert!(run_in_inbox(&mut conn, &listener, &event).unwrap());
    assert!(!run_in_inbox(&mut conn, &listener, &event).unwrap());
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM notifications WHERE tenant_id = {} AND kind = 'site.provisioning_failed' AND body LIKE '%no capacity%'",
                tenant.id
            )
        ),
        2,
        "both users, once"
    );
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM notifications WHERE tenant_id = {}",
                other.id
            )
        ),
        0
    );
}

#[test]
fn record_metrics_counts_committed_events() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let (_db, mut conn) = setup();
    let registry = listeners::registry(&ListenerConfig::default()).unwrap();
    let outbox = Outbox::builder().registry(registry).build().unwrap();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    metrics::with_local_recorder(&recorder, || {
        let site = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
        sites::provision_site(&outbox, &mut conn, Metadata::system(), site.value.id, Ok(())).unwrap();
        let backup = backups::create_backup(&outbox, &mut conn, Metadata::system(), site.value.id).unwrap();
        backups::fail_backup(&outbox, &mut conn, Metadata::system(), backup.value.id, "oops").unwrap();
        // A rolled-back write counts nothing.
        assert!(sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").is_err());
    });
    let text = handle.render();
    for line in [
        "chom_sites_created_total 1",
        "chom_sites_provisioned_total 1",
        "chom_backups_created_total 1",
        "chom_backups_failed_total 1",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert_eq!(RecordMetrics.name(), "record_metrics");
}
