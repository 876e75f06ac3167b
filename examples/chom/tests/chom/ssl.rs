//! SSL services: request, issue, the expiry check (once per certificate
//! and window), and that rolled-back writes record nothing.

use chom::ChomError;
use chom::models::CertificateStatus;
use chom::schema::ssl_expiry_warnings;
use chom::services::sites;
use chom::services::ssl::{check_expiring, get_certificate, issue_certificate, request_certificate};
use chrono::{Duration, Utc};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};
use serde_json::json;

use crate::support::{
    assert_envelope, assert_rolled_back, events_of, failing_metadata, keys, setup, tenant_with_user,
};

fn site(outbox: &Outbox, conn: &mut PgConnection, tenant: i64, domain: &str) -> i64 {
    let site = sites::create_site(outbox, conn, Metadata::system(), tenant, domain)
        .unwrap()
        .value;
    sites::provision_site(outbox, conn, Metadata::system(), site.id, Ok(())).unwrap();
    site.id
}

/// A certificate of `site` issued now, expiring `valid_for` from now.
fn issued(outbox: &Outbox, conn: &mut PgConnection, site: i64, valid_for: Duration) -> i64 {
    let requested = request_certificate(outbox, conn, Metadata::system(), site).unwrap();
    issue_certificate(
        outbox,
        conn,
        Metadata::system(),
        requested.value.id,
        "Test CA",
        Utc::now() + valid_for,
    )
    .unwrap();
    requested.value.id
}

fn warnings(conn: &mut PgConnection) -> i64 {
    ssl_expiry_warnings::table.count().get_result(conn).unwrap()
}

#[test]
fn request_and_issue_record_their_events() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = site(&outbox, &mut conn, tenant.id, "shop.acme.test");

    let requested = request_certificate(&outbox, &mut conn, Metadata::by("user:3"), site).unwrap();
    let certificate = requested.value.clone();
    assert_eq!(certificate.status, CertificateStatus::Requested);
    assert_eq!(certificate.domain, "shop.acme.test");
    let rows = events_of(&mut conn, "ssl.certificate_requested");
    assert_envelope(
        &rows[0],
        requested.event_id,
        "ssl.certificate_requested",
        "ssl_certificate",
        certificate.id,
        tenant.id,
        Some("user:3"),
    );
    assert_eq!(
        rows[0].payload,
        json!({"certificate_id": certificate.id, "site_id": site, "tenant_id": tenant.id, "domain": "shop.acme.test"})
    );
    let twice = request_certificate(&outbox, &mut conn, Metadata::system(), site);
    assert!(matches!(twice, Err(ChomError::Conflict(_))), "{twice:?}");

    let expires_at = Utc::now() + Duration::days(90);
    let issued = issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        certificate.id,
        "Let's Encrypt (simulated)",
        expires_at,
    )
    .unwrap();
    let certificate = issued.value;
    assert_eq!(certificate.status, CertificateStatus::Issued);
    let rows = events_of(&mut conn, "ssl.certificate_issued");
    assert_envelope(
        &rows[0],
        issued.event_id,
        "ssl.certificate_issued",
        "ssl_certificate",
        certificate.id,
        tenant.id,
        None,
    );
    let payload = &rows[0].payload;
    assert_eq!(
        keys(payload),
        [
            "certificate_id",
            "domain",
            "expires_at",
            "issued_at",
            "issuer",
            "site_id",
            "tenant_id"
        ]
    );
    assert_eq!(payload["issuer"], "Let's Encrypt (simulated)");
    let event: chom::events::SslCertificateIssued = serde_json::from_value(payload.clone()).unwrap();
    assert_eq!(Some(event.issued_at), certificate.issued_at);
    assert_eq!(Some(event.expires_at), certificate.expires_at);

    let again = issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        certificate.id,
        "Test CA",
        expires_at,
    );
    assert!(
        matches!(&again, Err(ChomError::InvalidState { action: "issue", .. })),
        "{again:?}"
    );
}

#[test]
fn a_new_certificate_supersedes_the_old_one_and_bad_input_records_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = site(&outbox, &mut conn, tenant.id, "a.test");
    let first = issued(&outbox, &mut conn, site, Duration::days(10));
    let second = issued(&outbox, &mut conn, site, Duration::days(90));
    assert_eq!(
        get_certificate(&mut conn, first).unwrap().status,
        CertificateStatus::Superseded
    );
    assert_eq!(
        get_certificate(&mut conn, second).unwrap().status,
        CertificateStatus::Issued
    );
    // The superseded one is not warned about.
    let warned = check_expiring(&outbox, &mut conn, Metadata::system(), 30).unwrap();
    assert!(warned.is_empty(), "{warned:?}");

    let requested = request_certificate(&outbox, &mut conn, Metadata::system(), site).unwrap();
    let past = issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        requested.value.id,
        "Test CA",
        Utc::now() - Duration::days(1),
    );
    assert!(
        matches!(
            past,
            Err(ChomError::InvalidInput {
                field: "expires_at",
                ..
            })
        ),
        "{past:?}"
    );
    let nobody = issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        requested.value.id,
        "  ",
        Utc::now() + Duration::days(1),
    );
    assert!(
        matches!(nobody, Err(ChomError::InvalidInput { field: "issuer", .. })),
        "{nobody:?}"
    );
    let unknown = request_certificate(&outbox, &mut conn, Metadata::system(), 999);
    assert!(
        matches!(unknown, Err(ChomError::NotFound { what: "site", .. })),
        "{unknown:?}"
    );
    assert_eq!(events_of(&mut conn, "ssl.certificate_issued").len(), 2);
    assert_eq!(events_of(&mut conn, "ssl.certificate_requested").len(), 3);
}

#[test]
fn the_expiry_check_warns_once_per_certificate_and_window() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let soon_site = site(&outbox, &mut conn, tenant.id, "soon.test");
    let later_site = site(&outbox, &mut conn, tenant.id, "later.test");
    let far_site = site(&outbox, &mut conn, tenant.id, "far.test");
    let gone_site = site(&outbox, &mut conn, tenant.id, "gone.test");
    // An hour over whole days, so the days left are exact when the check runs.
    let soon = issued(
        &outbox,
        &mut conn,
        soon_site,
        Duration::days(3) + Duration::hours(1),
    );
    let later = issued(
        &outbox,
        &mut conn,
        later_site,
        Duration::days(20) + Duration::hours(1),
    );
    issued(&outbox, &mut conn, far_site, Duration::days(60));
    issued(&outbox, &mut conn, gone_site, Duration::days(2));
    sites::delete_site(&outbox, &mut conn, Metadata::system(), gone_site).unwrap();

    let week = check_expiring(&outbox, &mut conn, Metadata::system(), 7).unwrap();
    assert_eq!(
        week.iter().map(|r| r.value.id).collect::<Vec<_>>(),
        [soon],
        "a deleted site's certificate is not warned about"
    );
    let rows = events_of(&mut conn, "ssl.certificate_expiring");
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        week[0].event_id,
        "ssl.certificate_expiring",
        "ssl_certificate",
        soon,
        tenant.id,
        None,
    );
    let expires_at = get_certificate(&mut conn, soon).unwrap().expires_at.unwrap();
    let event: chom::events::SslCertificateExpiring =
        serde_json::from_value(rows[0].payload.clone()).unwrap();
    assert_eq!(
        event,
        chom::events::SslCertificateExpiring {
            certificate_id: soon,
            site_id: soon_site,
            tenant_id: tenant.id,
            domain: "soon.test".into(),
            expires_at,
            days_remaining: 3,
            window_days: 7,
        }
    );

    assert!(
        check_expiring(&outbox, &mut conn, Metadata::system(), 7)
            .unwrap()
            .is_empty(),
        "once per certificate and window"
    );
    let month = check_expiring(&outbox, &mut conn, Metadata::system(), 30).unwrap();
    assert_eq!(
        month.iter().map(|r| r.value.id).collect::<Vec<_>>(),
        [soon, later],
        "a wider window warns again, soonest first"
    );
    assert!(
        check_expiring(&outbox, &mut conn, Metadata::system(), 30)
            .unwrap()
            .is_empty()
    );
    assert_eq!(events_of(&mut conn, "ssl.certificate_expiring").len(), 3);
    assert_eq!(warnings(&mut conn), 3);

    for bad in [0, 366] {
        let result = check_expiring(&outbox, &mut conn, Metadata::system(), bad);
        assert!(
            matches!(result, Err(ChomError::InvalidInput { .. })),
            "{bad}: {result:?}"
        );
    }
}

#[test]
fn ssl_writes_that_cannot_be_recorded_roll_back() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = site(&outbox, &mut conn, tenant.id, "a.test");

    assert_rolled_back(request_certificate(&outbox, &mut conn, failing_metadata(), site));
    assert!(
        chom::services::ssl::list_certificates(&mut conn, Some(site), None)
            .unwrap()
            .is_empty(),
        "no certificate row"
    );

    let requested = request_certificate(&outbox, &mut conn, Metadata::system(), site).unwrap();
    assert_rolled_back(issue_certificate(
        &outbox,
        &mut conn,
        failing_metadata(),
        requested.value.id,
        "Test CA",
        Utc::now() + Duration::days(2),
    ));
    assert_eq!(
        get_certificate(&mut conn, requested.value.id).unwrap().status,
        CertificateStatus::Requested,
        "still requested"
    );

    issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        requested.value.id,
        "Test CA",
        Utc::now() + Duration::days(2),
    )
    .unwrap();
    assert_rolled_back(check_expiring(&outbox, &mut conn, failing_metadata(), 7));
    assert_eq!(warnings(&mut conn), 0, "no warning row without its event");
    assert!(events_of(&mut conn, "ssl.certificate_expiring").is_empty());
    // The warning is still due.
    assert_eq!(
        check_expiring(&outbox, &mut conn, Metadata::system(), 7)
            .unwrap()
            .len(),
        1
    );
}
