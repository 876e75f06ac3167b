//! Backup services: the events they record, and that failures record none.

use chom::schema::backups;
use chom::services::backups::{complete_backup, create_backup, fail_backup, get_backup, list_backups};
use chom::services::sites::{create_site, delete_site, get_site, provision_site};
use chom::{BackupStatus, ChomError, Site, Tenant};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use serde_json::json;

use crate::support::{assert_envelope, event_count, events, setup, tenant_with_user};

/// A tenant with an active site; two events recorded so far.
fn active_site(conn: &mut PgConnection, outbox: &Outbox) -> (Tenant, Site) {
    let (tenant, _) = tenant_with_user(conn, "Acme");
    let site = create_site(outbox, conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    let site = provision_site(outbox, conn, Metadata::system(), site.id, Ok(()))
        .unwrap()
        .value;
    (tenant, site)
}

fn backup_rows(conn: &mut PgConnection) -> i64 {
    backups::table.count().get_result(conn).unwrap()
}

#[test]
fn create_backup_records_backup_created() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, site) = active_site(&mut conn, &outbox);

    let created = create_backup(&outbox, &mut conn, Metadata::by("user:5"), site.id).unwrap();

    let backup = created.value;
    assert_eq!(backup.status, BackupStatus::Running);
    assert_eq!((backup.site_id, backup.tenant_id), (site.id, tenant.id));
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 3);
    assert_envelope(
        &rows[2],
        created.event_id,
        "backup.created",
        "backup",
        backup.id,
        tenant.id,
        Some("user:5"),
    );
    assert_eq!(
        rows[2].payload,
        json!({"backup_id": backup.id, "site_id": site.id, "tenant_id": tenant.id, "domain": "a.test"})
    );
}

#[test]
fn complete_backup_records_size_and_duration() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, site) = active_site(&mut conn, &outbox);
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;

    let completed = complete_backup(
        &outbox,
        &mut conn,
        Metadata::system(),
        backup.id,
        52_428_800,
        1234,
    )
    .unwrap();

    let backup = completed.value;
    assert_eq!(backup.status, BackupStatus::Completed);
    assert_eq!(
        (backup.size_bytes, backup.duration_ms),
        (Some(52_428_800), Some(1234))
    );
    assert!(backup.completed_at.is_some());
    assert_eq!(get_backup(&mut conn, backup.id).unwrap(), backup);
    assert_eq!(
        get_site(&mut conn, site.id).unwrap().storage_bytes,
        52_428_800,
        "measured storage"
    );
    let rows = events(&mut conn);
    assert_envelope(
        &rows[3],
        completed.event_id,
        "backup.completed",
        "backup",
        backup.id,
        tenant.id,
        None,
    );
    assert_eq!(
        rows[3].payload,
        json!({
            "backup_id": backup.id,
            "site_id": site.id,
            "tenant_id": tenant.id,
            "domain": "a.test",
            "size_bytes": 52_428_800,
            "duration_ms": 1234,
        })
    );
}

#[test]
fn fail_backup_records_the_error() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, site) = active_site(&mut conn, &outbox);
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;

    let failed = fail_backup(
        &outbox,
        &mut conn,
        Metadata::system(),
        backup.id,
        "storage bucket unreachable",
    )
    .unwrap();

    assert_eq!(failed.value.status, BackupStatus::Failed);
    assert_eq!(failed.value.error.as_deref(), Some("storage bucket unreachable"));
    assert_eq!(failed.value.size_bytes, None);
    let rows = events(&mut conn);
    assert_envelope(
        &rows[3],
        failed.event_id,
        "backup.failed",
        "backup",
        backup.id,
        tenant.id,
        None,
    );
    assert_eq!(
        rows[3].payload,
        json!({
            "backup_id": backup.id,
            "site_id": site.id,
            "tenant_id": tenant.id,
            "domain": "a.test",
            "error": "storage bucket unreachable",
        })
    );
}

#[test]
fn backup_of_a_site_that_is_not_active_records_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let pending = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "p.test")
        .unwrap()
        .value;
    let failed = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "f.test")
        .unwrap()
        .value;
    provision_site(
        &outbox,
        &mut conn,
        Metadata::system(),
        failed.id,
        Err("boom".into()),
    )
    .unwrap();
    let gone = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "g.test")
        .unwrap()
        .value;
    provision_site(&outbox, &mut conn, Metadata::system(), gone.id, Ok(())).unwrap();
    delete_site(&outbox, &mut conn, Metadata::system(), gone.id).unwrap();
    let before = event_count(&mut conn);

    for (site_id, status) in [(pending.id, "pending"), (failed.id, "failed")] {
        let result = create_backup(&outbox, &mut conn, Metadata::system(), site_id);
        assert!(
            matches!(&result, Err(ChomError::InvalidState { status: s, action: "back up", .. }) if s == status),
            "{result:?}"
        );
    }
    let deleted = create_backup(&outbox, &mut conn, Metadata::system(), gone.id);
    assert!(
        matches!(deleted, Err(ChomError::NotFound { what: "site", .. })),
        "{deleted:?}"
    );
    let unknown = create_backup(&outbox, &mut conn, Metadata::system(), 999);
    assert!(
        matches!(
            unknown,
            Err(ChomError::NotFound {
                what: "site",
                id: 999
            })
        ),
        "{unknown:?}"
    );

    assert_eq!(event_count(&mut conn), before);
    assert_eq!(backup_rows(&mut conn), 0);
}

#[test]
fn finished_or_unknown_backups_record_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (_, site) = active_site(&mut conn, &outbox);
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;
    let done = complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, 10, 20)
        .unwrap()
        .value;
    let before = event_count(&mut conn);

    let again = complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, 99, 99);
    assert!(
        matches!(
            again,
            Err(ChomError::InvalidState {
                what: "backup",
                action: "complete",
                ..
            })
        ),
        "{again:?}"
    );
    let fail = fail_backup(&outbox, &mut conn, Metadata::system(), backup.id, "late");
    assert!(
        matches!(
            fail,
            Err(ChomError::InvalidState {
                what: "backup",
                action: "fail",
                ..
            })
        ),
        "{fail:?}"
    );
    let unknown = complete_backup(&outbox, &mut conn, Metadata::system(), 999, 1, 1);
    assert!(
        matches!(
            unknown,
            Err(ChomError::NotFound {
                what: "backup",
                id: 999
            })
        ),
        "{unknown:?}"
    );
    let negative = complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, -1, 1);
    assert!(
        matches!(
            negative,
            Err(ChomError::InvalidInput {
                field: "size_bytes",
                ..
            })
        ),
        "{negative:?}"
    );
    let empty = fail_backup(&outbox, &mut conn, Metadata::system(), backup.id, "  ");
    assert!(
        matches!(empty, Err(ChomError::InvalidInput { field: "error", .. })),
        "{empty:?}"
    );

    assert_eq!(event_count(&mut conn), before);
    assert_eq!(get_backup(&mut conn, backup.id).unwrap(), done, "row untouched");
}

#[test]
fn backup_finishing_after_its_site_was_deleted_still_names_the_domain() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (_, site) = active_site(&mut conn, &outbox);
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;
    delete_site(&outbox, &mut conn, Metadata::system(), site.id).unwrap();

    let failed = fail_backup(&outbox, &mut conn, Metadata::system(), backup.id, "site removed").unwrap();

    assert_eq!(failed.event_type, "backup.failed");
    let rows = events(&mut conn);
    assert_eq!(rows.last().unwrap().payload["domain"], "a.test");
    assert_eq!(list_backups(&mut conn, site.id).unwrap().len(), 1);
}

#[test]
fn long_error_text_is_cut_to_the_column_limit() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (_, site) = active_site(&mut conn, &outbox);
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;

    let long = "é".repeat(5000); // 10,000 bytes of two-byte characters
    let failed = fail_backup(&outbox, &mut conn, Metadata::system(), backup.id, &long).unwrap();

    let kept = failed.value.error.unwrap();
    assert_eq!(kept.len(), chom::services::MAX_ERROR_BYTES);
    assert!(long.starts_with(&kept));
    assert_eq!(events(&mut conn).last().unwrap().payload["error"], kept.as_str());
}
