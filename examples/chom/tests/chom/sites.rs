//! Site services: the events they record, and that failures record none.

use chom::ChomError;
use chom::SiteStatus;
use chom::schema::sites;
use chom::services::sites::{
    create_site, delete_site, get_site, list_sites, provision_site, start_provisioning,
};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use serde_json::json;

use crate::support::{assert_envelope, event_count, events, only_event, setup, tenant_with_user};

fn site_rows(conn: &mut PgConnection) -> i64 {
    sites::table.count().get_result(conn).unwrap()
}

#[test]
fn create_site_records_site_created() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    let actor = format!("user:{}", user.id);

    let created = create_site(
        &outbox,
        &mut conn,
        Metadata::by(&actor),
        tenant.id,
        " Shop.Example.COM. ",
    )
    .unwrap();

    let site = created.value;
    assert_eq!(site.domain, "shop.example.com", "domains are normalized");
    assert_eq!(site.status, SiteStatus::Pending);
    assert_eq!(site.tenant_id, tenant.id);
    assert_eq!(created.event_type, "site.created");
    let row = only_event(&mut conn);
    assert_envelope(
        &row,
        created.event_id,
        "site.created",
        "site",
        site.id,
        tenant.id,
        Some(&actor),
    );
    assert_eq!(
        row.payload,
        json!({"site_id": site.id, "tenant_id": tenant.id, "domain": "shop.example.com"})
    );
}

#[test]
fn provisioning_success_records_site_provisioned_as_system_action() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::by("user:1"), tenant.id, "a.test")
        .unwrap()
        .value;

    let provisioned = provision_site(&outbox, &mut conn, Metadata::system(), site.id, Ok(())).unwrap();

    assert_eq!(provisioned.value.status, SiteStatus::Active);
    assert_eq!(provisioned.value.provision_error, None);
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 2);
    let row = &rows[1];
    assert_envelope(
        row,
        provisioned.event_id,
        "site.provisioned",
        "site",
        site.id,
        tenant.id,
        None,
    );
    assert_eq!(
        row.payload,
        json!({"site_id": site.id, "tenant_id": tenant.id, "domain": "a.test"})
    );
}

#[test]
fn provisioning_failure_records_the_error() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;

    let failed = provision_site(
        &outbox,
        &mut conn,
        Metadata::system(),
        site.id,
        Err("certificate issuance timed out".into()),
    )
    .unwrap();

    assert_eq!(failed.event_type, "site.provisioning_failed");
    assert_eq!(failed.value.status, SiteStatus::Failed);
    assert_eq!(
        failed.value.provision_error.as_deref(),
        Some("certificate issuance timed out")
    );
    let rows = events(&mut conn);
    let row = &rows[1];
    assert_envelope(
        row,
        failed.event_id,
        "site.provisioning_failed",
        "site",
        site.id,
        tenant.id,
        None,
    );
    assert_eq!(
        row.payload,
        json!({
            "site_id": site.id,
            "tenant_id": tenant.id,
            "domain": "a.test",
            "error": "certificate issuance timed out",
        })
    );
}

#[test]
fn failed_site_can_be_provisioned_again_after_start_provisioning() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    provision_site(
        &outbox,
        &mut conn,
        Metadata::system(),
        site.id,
        Err("boom".into()),
    )
    .unwrap();

    let started = start_provisioning(&mut conn, site.id).unwrap();
    assert_eq!(started.status, SiteStatus::Provisioning);
    assert_eq!(started.provision_error, None, "a retry clears the old error");
    assert_eq!(event_count(&mut conn), 2, "starting records no event");

    let active = provision_site(&outbox, &mut conn, Metadata::system(), site.id, Ok(())).unwrap();
    assert_eq!(active.value.status, SiteStatus::Active);
    let types: Vec<String> = events(&mut conn).into_iter().map(|e| e.event_type).collect();
    assert_eq!(
        types,
        ["site.created", "site.provisioning_failed", "site.provisioned"]
    );
}

#[test]
fn invalid_transition_records_nothing_and_changes_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    let active = provision_site(&outbox, &mut conn, Metadata::system(), site.id, Ok(()))
        .unwrap()
        .value;

    let again = provision_site(
        &outbox,
        &mut conn,
        Metadata::system(),
        site.id,
        Err("late failure".into()),
    );
    assert!(
        matches!(
            &again,
            Err(ChomError::InvalidState { what: "site", id, status, action: "provision" })
                if *id == site.id && status == "active"
        ),
        "{again:?}"
    );
    let restart = start_provisioning(&mut conn, site.id);
    assert!(
        matches!(restart, Err(ChomError::InvalidState { .. })),
        "{restart:?}"
    );

    assert_eq!(event_count(&mut conn), 2, "only created and provisioned");
    assert_eq!(get_site(&mut conn, site.id).unwrap(), active, "row untouched");
}

#[test]
fn unknown_site_or_tenant_records_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();

    let created = create_site(&outbox, &mut conn, Metadata::system(), 999, "a.test");
    assert!(
        matches!(
            created,
            Err(ChomError::NotFound {
                what: "tenant",
                id: 999
            })
        ),
        "{created:?}"
    );
    let provisioned = provision_site(&outbox, &mut conn, Metadata::system(), 999, Ok(()));
    assert!(
        matches!(
            provisioned,
            Err(ChomError::NotFound {
                what: "site",
                id: 999
            })
        ),
        "{provisioned:?}"
    );
    let deleted = delete_site(&outbox, &mut conn, Metadata::system(), 999);
    assert!(
        matches!(
            deleted,
            Err(ChomError::NotFound {
                what: "site",
                id: 999
            })
        ),
        "{deleted:?}"
    );

    assert_eq!(event_count(&mut conn), 0);
    assert_eq!(site_rows(&mut conn), 0);
}

#[test]
fn duplicate_domain_conflicts_until_the_site_is_deleted() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let first = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;

    let second = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "A.TEST");
    assert!(matches!(second, Err(ChomError::Conflict(_))), "{second:?}");
    assert_eq!(event_count(&mut conn), 1);
    assert_eq!(site_rows(&mut conn), 1);

    delete_site(&outbox, &mut conn, Metadata::system(), first.id).unwrap();
    let reused = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
    assert_ne!(reused.value.id, first.id);
    assert_eq!(event_count(&mut conn), 3);
}

#[test]
fn invalid_domain_is_rejected_before_any_write() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    for bad in [
        "",
        "localhost",
        "-a.test",
        "a..test",
        "a b.test",
        "ünï.test",
        &format!("{}.test", "a".repeat(64)),
    ] {
        let result = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, bad);
        assert!(
            matches!(result, Err(ChomError::InvalidInput { field: "domain", .. })),
            "{bad:?}: {result:?}"
        );
    }
    assert_eq!(event_count(&mut conn), 0);
    assert_eq!(site_rows(&mut conn), 0);
}

#[test]
fn an_event_that_cannot_be_recorded_rolls_the_site_back() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");

    // An actor over the contract's 255 bytes fails in record(), after the
    // INSERT INTO sites ran in the same transaction.
    let result = create_site(
        &outbox,
        &mut conn,
        Metadata::by("x".repeat(300)),
        tenant.id,
        "a.test",
    );

    assert!(
        matches!(result, Err(ChomError::Outbox(outbox::Error::InvalidEvent(_)))),
        "{result:?}"
    );
    assert_eq!(
        site_rows(&mut conn),
        0,
        "the site insert rolled back with the event"
    );
    assert_eq!(event_count(&mut conn), 0);
}

#[test]
fn site_deleted_carries_primitive_data_only() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    let actor = format!("user:{}", user.id);
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;

    let deleted = delete_site(&outbox, &mut conn, Metadata::by(&actor), site.id).unwrap();

    let deleted_at = deleted.value.deleted_at.expect("soft-deleted");
    let rows = events(&mut conn);
    let row = &rows[1];
    assert_envelope(
        row,
        deleted.event_id,
        "site.deleted",
        "site",
        site.id,
        tenant.id,
        Some(&actor),
    );
    let payload = row.payload.as_object().unwrap();
    let mut keys: Vec<&str> = payload.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["deleted_at", "domain", "site_id", "tenant_id"]);
    assert!(
        payload.values().all(|v| v.is_number() || v.is_string()),
        "primitives only: {payload:?}"
    );
    assert_eq!(payload["site_id"], site.id);
    assert_eq!(payload["tenant_id"], tenant.id);
    assert_eq!(payload["domain"], "a.test");
    let event: chom::events::SiteDeleted = serde_json::from_value(row.payload.clone()).unwrap();
    assert_eq!(event.deleted_at, deleted_at, "the row's own deletion time");

    // Soft delete: the row stays, hidden from the live views.
    assert_eq!(site_rows(&mut conn), 1);
    assert!(matches!(
        get_site(&mut conn, site.id),
        Err(ChomError::NotFound { .. })
    ));
    assert!(list_sites(&mut conn, Some(tenant.id)).unwrap().is_empty());
    let twice = delete_site(&outbox, &mut conn, Metadata::system(), site.id);
    assert!(matches!(twice, Err(ChomError::NotFound { .. })), "{twice:?}");
    assert_eq!(event_count(&mut conn), 2);
}

#[test]
fn lifecycle_records_events_in_seq_order() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let created = create_site(&outbox, &mut conn, Metadata::by("user:1"), tenant.id, "a.test").unwrap();
    let site_id = created.value.id;
    let provisioned = provision_site(&outbox, &mut conn, Metadata::system(), site_id, Ok(())).unwrap();
    let deleted = delete_site(&outbox, &mut conn, Metadata::by("user:1"), site_id).unwrap();

    let rows = events(&mut conn);
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.event_type.as_str(), r.aggregate_id.as_str()))
        .collect();
    let id = site_id.to_string();
    assert_eq!(
        summary,
        [
            ("site.created", id.as_str()),
            ("site.provisioned", id.as_str()),
            ("site.deleted", id.as_str())
        ]
    );
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    let ids: Vec<_> = rows.iter().map(|r| r.event_id).collect();
    assert_eq!(ids, [created.event_id, provisioned.event_id, deleted.event_id]);
    // UUIDv7 ids of one aggregate sort in recording order too.
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn list_sites_filters_by_tenant_and_hides_deleted() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (acme, _) = tenant_with_user(&mut conn, "Acme");
    let (globex, _) = tenant_with_user(&mut conn, "Globex");
    let a = create_site(&outbox, &mut conn, Metadata::system(), acme.id, "a.test")
        .unwrap()
        .value;
    let b = create_site(&outbox, &mut conn, Metadata::system(), acme.id, "b.test")
        .unwrap()
        .value;
    let g = create_site(&outbox, &mut conn, Metadata::system(), globex.id, "g.test")
        .unwrap()
        .value;
    delete_site(&outbox, &mut conn, Metadata::system(), b.id).unwrap();

    let ids = |sites: Vec<chom::Site>| sites.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(list_sites(&mut conn, Some(acme.id)).unwrap()), [a.id]);
    assert_eq!(ids(list_sites(&mut conn, None).unwrap()), [a.id, g.id]);
}
