//! Quotas: the site quota refuses creations (and records the refusal),
//! storage and bandwidth record their events when usage crosses the limit,
//! and rolled-back writes record nothing.

use chom::ChomError;
use chom::schema::{bandwidth_usage, quota_breaches, sites as sites_table};
use chom::services::quotas::{Limits, list_breaches, plan, report_bandwidth, set_quota, usage};
use chom::services::{backups, sites};
use chrono::{TimeZone, Utc};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use serde_json::json;

use crate::support::{
    assert_envelope, assert_rolled_back, events_of, failing_metadata, setup, tenant_with_user,
};

fn limits(max_sites: Option<i64>, storage: Option<i64>, bandwidth: Option<i64>) -> Limits {
    Limits {
        max_sites,
        max_storage_bytes: storage,
        monthly_bandwidth_bytes: bandwidth,
    }
}

fn breaches(conn: &mut PgConnection) -> i64 {
    quota_breaches::table.count().get_result(conn).unwrap()
}

fn live_site(outbox: &Outbox, conn: &mut PgConnection, tenant: i64, domain: &str) -> i64 {
    let site = sites::create_site(outbox, conn, Metadata::system(), tenant, domain)
        .unwrap()
        .value;
    sites::provision_site(outbox, conn, Metadata::system(), site.id, Ok(())).unwrap();
    site.id
}

/// Runs a backup of `site` to completion with `size` bytes.
fn backup(outbox: &Outbox, conn: &mut PgConnection, site: i64, size: i64) -> chom::Recorded<chom::Backup> {
    let backup = backups::create_backup(outbox, conn, Metadata::system(), site).unwrap();
    backups::complete_backup(outbox, conn, Metadata::system(), backup.value.id, size, 10).unwrap()
}

#[test]
fn the_site_quota_refuses_a_creation_and_records_the_refusal() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    set_quota(&mut conn, tenant.id, "custom", &limits(Some(2), None, None)).unwrap();
    let first = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
    sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "b.test").unwrap();
    let actor = format!("user:{}", user.id);

    let refused = sites::create_site(&outbox, &mut conn, Metadata::by(&actor), tenant.id, "c.test");

    let Err(ChomError::QuotaExceeded {
        tenant_id,
        quota: "sites",
        limit: 2,
        used: 2,
        event_id,
    }) = refused
    else {
        panic!("{refused:?}");
    };
    assert_eq!(tenant_id, tenant.id);
    let rows = events_of(&mut conn, "quota.site_quota_exceeded");
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        event_id,
        "quota.site_quota_exceeded",
        "quota",
        tenant.id,
        tenant.id,
        Some(&actor),
    );
    assert_eq!(
        rows[0].payload,
        json!({"tenant_id": tenant.id, "plan": "custom", "max_sites": 2, "sites": 2, "domain": "c.test"})
    );
    let breach = list_breaches(&mut conn, Some(tenant.id)).unwrap();
    assert_eq!(breach.len(), 1);
    assert_eq!(
        (
            breach[0].quota.as_str(),
            breach[0].limit,
            breach[0].used,
            breach[0].event_id
        ),
        ("sites", 2, 2, event_id)
    );
    let site_rows: i64 = sites_table::table.count().get_result(&mut conn).unwrap();
    assert_eq!(site_rows, 2, "no site for the refused creation");
    assert!(events_of(&mut conn, "site.created").len() == 2);

    // A deleted site frees its slot.
    sites::delete_site(&outbox, &mut conn, Metadata::system(), first.value.id).unwrap();
    sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "c.test").unwrap();
    // Tenants without limits are never refused.
    let (other, _) = tenant_with_user(&mut conn, "Globex");
    for n in 0..4 {
        sites::create_site(
            &outbox,
            &mut conn,
            Metadata::system(),
            other.id,
            &format!("g{n}.test"),
        )
        .unwrap();
    }
    assert_eq!(breaches(&mut conn), 1);
}

#[test]
fn storage_over_the_plan_records_storage_quota_exceeded_once_per_crossing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    set_quota(&mut conn, tenant.id, "custom", &limits(None, Some(1_000), None)).unwrap();
    let a = live_site(&outbox, &mut conn, tenant.id, "a.test");
    let b = live_site(&outbox, &mut conn, tenant.id, "b.test");

    assert!(backup(&outbox, &mut conn, a, 600).also.is_empty(), "600 of 1000");
    assert!(
        backup(&outbox, &mut conn, b, 400).also.is_empty(),
        "exactly the limit"
    );
    let over = backup(&outbox, &mut conn, b, 500);
    assert_eq!(over.also.len(), 1, "1100 of 1000");
    assert_eq!(over.also[0].event_type, "quota.storage_quota_exceeded");
    let rows = events_of(&mut conn, "quota.storage_quota_exceeded");
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        over.also[0].event_id,
        "quota.storage_quota_exceeded",
        "quota",
        tenant.id,
        tenant.id,
        None,
    );
    assert_eq!(
        rows[0].payload,
        json!({
            "tenant_id": tenant.id,
            "plan": "custom",
            "max_storage_bytes": 1000,
            "storage_bytes": 1100,
            "site_id": b,
            "backup_id": over.value.id,
        })
    );
    // Recorded after backup.completed, in the same transaction.
    let completed = events_of(&mut conn, "backup.completed");
    assert!(completed.last().unwrap().seq < rows[0].seq);
    assert_eq!(completed.last().unwrap().event_id, over.event_id);

    assert!(
        backup(&outbox, &mut conn, a, 700).also.is_empty(),
        "still over: no new crossing"
    );
    assert!(
        backup(&outbox, &mut conn, a, 100).also.is_empty(),
        "back under: 600"
    );
    assert_eq!(
        backup(&outbox, &mut conn, a, 900).also.len(),
        1,
        "over again: 1400"
    );
    assert_eq!(events_of(&mut conn, "quota.storage_quota_exceeded").len(), 2);
    assert_eq!(
        usage(&mut conn, tenant.id, Utc::now()).unwrap().storage_bytes,
        1_400
    );
}

#[test]
fn bandwidth_reaching_the_plan_records_bandwidth_limit_reached_once_a_month() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    set_quota(&mut conn, tenant.id, "custom", &limits(None, None, Some(1_000))).unwrap();
    let a = live_site(&outbox, &mut conn, tenant.id, "a.test");
    let b = live_site(&outbox, &mut conn, tenant.id, "b.test");
    let december = Utc.with_ymd_and_hms(2026, 12, 10, 12, 0, 0).unwrap();
    let january = Utc.with_ymd_and_hms(2027, 1, 2, 0, 0, 0).unwrap();
    let report = |conn: &mut PgConnection, site, bytes, at| {
        report_bandwidth(&outbox, conn, Metadata::system(), site, bytes, at).unwrap()
    };

    assert!(report(&mut conn, a, 400, december).event.is_none());
    assert!(report(&mut conn, b, 500, december).event.is_none());
    let reached = report(&mut conn, a, 100, december);
    assert_eq!((reached.site_bytes, reached.tenant_bytes), (500, 1_000));
    let event = reached.event.expect("1000 of 1000 reaches the limit");
    let rows = events_of(&mut conn, "quota.bandwidth_limit_reached");
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        event.event_id,
        "quota.bandwidth_limit_reached",
        "quota",
        tenant.id,
        tenant.id,
        None,
    );
    assert_eq!(
        rows[0].payload,
        json!({
            "tenant_id": tenant.id,
            "plan": "custom",
            "month": "2026-12",
            "monthly_bandwidth_bytes": 1000,
            "bandwidth_bytes": 1000,
            "site_id": a,
        })
    );
    assert!(
        report(&mut conn, b, 5_000, december).event.is_none(),
        "already reached"
    );
    assert!(report(&mut conn, b, 999, january).event.is_none(), "a new month");
    assert!(report(&mut conn, a, 1, january).event.is_some());
    assert_eq!(events_of(&mut conn, "quota.bandwidth_limit_reached").len(), 2);
    assert_eq!(
        usage(&mut conn, tenant.id, december).unwrap().bandwidth_bytes,
        6_000
    );

    let negative = report_bandwidth(&outbox, &mut conn, Metadata::system(), a, -1, december);
    assert!(
        matches!(negative, Err(ChomError::InvalidInput { .. })),
        "{negative:?}"
    );
}

#[test]
fn quota_writes_that_cannot_be_recorded_roll_back() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    set_quota(
        &mut conn,
        tenant.id,
        "custom",
        &limits(Some(1), Some(100), Some(100)),
    )
    .unwrap();
    let site = live_site(&outbox, &mut conn, tenant.id, "a.test");

    assert_rolled_back(sites::create_site(
        &outbox,
        &mut conn,
        failing_metadata(),
        tenant.id,
        "b.test",
    ));
    let running = backups::create_backup(&outbox, &mut conn, Metadata::system(), site).unwrap();
    assert_rolled_back(backups::complete_backup(
        &outbox,
        &mut conn,
        failing_metadata(),
        running.value.id,
        500,
        10,
    ));
    assert_rolled_back(report_bandwidth(
        &outbox,
        &mut conn,
        failing_metadata(),
        site,
        500,
        Utc::now(),
    ));

    assert_eq!(breaches(&mut conn), 0);
    let now = usage(&mut conn, tenant.id, Utc::now()).unwrap();
    assert_eq!((now.sites, now.storage_bytes, now.bandwidth_bytes), (1, 0, 0));
    let usage_rows: i64 = bandwidth_usage::table.count().get_result(&mut conn).unwrap();
    assert_eq!(usage_rows, 0);
    assert_eq!(
        backups::get_backup(&mut conn, running.value.id).unwrap().status,
        chom::BackupStatus::Running
    );
    for event_type in [
        "quota.site_quota_exceeded",
        "quota.storage_quota_exceeded",
        "quota.bandwidth_limit_reached",
    ] {
        assert!(events_of(&mut conn, event_type).is_empty(), "{event_type}");
    }
}

#[test]
fn plans_and_limits_are_checked() {
    let (_db, mut conn) = setup();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let starter = plan("starter").unwrap();
    let set = set_quota(&mut conn, tenant.id, starter.name, &starter.limits).unwrap();
    assert_eq!((set.plan.as_str(), set.max_sites), ("starter", Some(3)));
    assert!(plan("platinum").is_none());
    let negative = set_quota(&mut conn, tenant.id, "custom", &limits(Some(-1), None, None));
    assert!(
        matches!(negative, Err(ChomError::InvalidInput { .. })),
        "{negative:?}"
    );
    let unknown = set_quota(&mut conn, 999, "starter", &starter.limits);
    assert!(matches!(unknown, Err(ChomError::NotFound { .. })), "{unknown:?}");
    let nameless = set_quota(&mut conn, tenant.id, " ", &starter.limits);
    assert!(
        matches!(nameless, Err(ChomError::InvalidInput { field: "plan", .. })),
        "{nameless:?}"
    );
    let replaced = set_quota(&mut conn, tenant.id, "custom", &limits(None, None, None)).unwrap();
    assert_eq!((replaced.plan.as_str(), replaced.max_sites), ("custom", None));
}
