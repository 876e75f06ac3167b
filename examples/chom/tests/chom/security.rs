//! Security services: VPS credential and API token rotation (hashed,
//! shown once, never in an event), the failed-login detector (once per user
//! and window), and that rolled-back writes record nothing.

use std::time::Duration;

use chom::ChomError;
use chom::schema::{failed_logins, security_incidents, vps_credentials};
use chom::secret::{Secret, sha256_hex};
use chom::services::security::{
    FailedLoginPolicy, add_vps, create_api_token, list_incidents, record_failed_login, rotate_api_token,
    rotate_vps_credentials, verify_api_token, verify_vps_credential,
};
use diesel::prelude::*;
use outbox::{Metadata, Outbox};

use crate::support::{
    assert_envelope, assert_rolled_back, count, events, events_of, failing_metadata, keys, setup,
    tenant_with_user,
};

/// Asserts `text` holds neither the secret nor its hash.
#[track_caller]
fn assert_no_secret(text: &str, secret: &Secret) {
    assert!(!text.contains(secret.expose()), "secret leaked: {text}");
    assert!(!text.contains(&secret.sha256_hex()), "hash leaked: {text}");
}

#[test]
fn rotating_vps_credentials_records_ids_and_never_the_secret() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    let (server, first) = add_vps(&mut conn, tenant.id, "VPS1.acme.test").unwrap();
    assert_eq!(server.hostname, "vps1.acme.test");
    assert!(verify_vps_credential(&mut conn, server.id, &first).unwrap());
    assert_eq!(events(&mut conn).len(), 0, "adding a server records nothing");
    let actor = format!("user:{}", user.id);

    let rotated = rotate_vps_credentials(&outbox, &mut conn, Metadata::by(&actor), server.id).unwrap();

    let second = &rotated.secret;
    assert_ne!(second, &first);
    assert!(
        !verify_vps_credential(&mut conn, server.id, &first).unwrap(),
        "old one revoked"
    );
    assert!(verify_vps_credential(&mut conn, server.id, second).unwrap());
    let stored: Vec<(i64, String, bool)> = vps_credentials::table
        .filter(vps_credentials::vps_id.eq(server.id))
        .order(vps_credentials::id)
        .select((
            vps_credentials::id,
            vps_credentials::secret_sha256,
            vps_credentials::revoked_at.is_not_null(),
        ))
        .load(&mut conn)
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].1, sha256_hex(first.expose()), "only the hash is stored");
    assert_eq!(stored[1].1, second.sha256_hex());
    assert_eq!((stored[0].2, stored[1].2), (true, false));

    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_envelope(
        row,
        rotated.recorded.event_id,
        "security.vps_credentials_rotated",
        "vps",
        server.id,
        tenant.id,
        Some(&actor),
    );
    assert_eq!(
        keys(&row.payload),
        [
            "credential_id",
            "hostname",
            "previous_credential_id",
            "rotated_at",
            "tenant_id",
            "vps_id"
        ]
    );
    assert_eq!(row.payload["credential_id"], stored[1].0);
    assert_eq!(row.payload["previous_credential_id"], stored[0].0);
    assert_eq!(row.payload["hostname"], "vps1.acme.test");
    for secret in [&first, second] {
        assert_no_secret(&row.payload.to_string(), secret);
        assert_no_secret(&format!("{rotated:?} {row:?}"), secret);
    }
    assert!(format!("{rotated:?}").contains("Secret(***)"));

    let unknown = rotate_vps_credentials(&outbox, &mut conn, Metadata::system(), 999);
    assert!(
        matches!(unknown, Err(ChomError::NotFound { what: "vps", .. })),
        "{unknown:?}"
    );
}

#[test]
fn rotating_an_api_token_records_its_name_and_never_the_token() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let (token, first) = create_api_token(&mut conn, tenant.id, "deploy").unwrap();
    assert_eq!(verify_api_token(&mut conn, &first).unwrap(), Some(token.clone()));
    let duplicate = create_api_token(&mut conn, tenant.id, "deploy");
    assert!(matches!(duplicate, Err(ChomError::Conflict(_))), "{duplicate:?}");

    let rotated = rotate_api_token(&outbox, &mut conn, Metadata::system(), token.id).unwrap();

    assert_eq!(
        verify_api_token(&mut conn, &first).unwrap(),
        None,
        "the old token is dead"
    );
    let now_valid = verify_api_token(&mut conn, &rotated.secret).unwrap().unwrap();
    assert_eq!(now_valid.id, token.id);
    assert!(now_valid.rotated_at.is_some());
    let rows = events(&mut conn);
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        rotated.recorded.event_id,
        "security.api_token_rotated",
        "api_token",
        token.id,
        tenant.id,
        None,
    );
    assert_eq!(
        keys(&rows[0].payload),
        ["name", "rotated_at", "tenant_id", "token_id"]
    );
    assert_eq!(rows[0].payload["name"], "deploy");
    let event: chom::events::ApiTokenRotated = serde_json::from_value(rows[0].payload.clone()).unwrap();
    assert_eq!(Some(event.rotated_at), now_valid.rotated_at);
    for secret in [&first, &rotated.secret] {
        assert_no_secret(&rows[0].payload.to_string(), secret);
        assert_no_secret(&format!("{rotated:?} {now_valid:?}"), secret);
    }
}

#[test]
fn rotations_that_cannot_be_recorded_keep_the_old_secrets() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let (server, credential) = add_vps(&mut conn, tenant.id, "vps1.acme.test").unwrap();
    let (token, secret) = create_api_token(&mut conn, tenant.id, "deploy").unwrap();

    assert_rolled_back(rotate_vps_credentials(
        &outbox,
        &mut conn,
        failing_metadata(),
        server.id,
    ));
    assert_rolled_back(rotate_api_token(&outbox, &mut conn, failing_metadata(), token.id));

    assert!(verify_vps_credential(&mut conn, server.id, &credential).unwrap());
    assert_eq!(
        vps_credentials::table
            .count()
            .get_result::<i64>(&mut conn)
            .unwrap(),
        1
    );
    assert!(verify_api_token(&mut conn, &secret).unwrap().is_some());
    assert_eq!(events(&mut conn).len(), 0);
}

fn policy(threshold: u32) -> FailedLoginPolicy {
    FailedLoginPolicy {
        threshold,
        window: Duration::from_secs(15 * 60),
    }
}

#[test]
fn failed_logins_raise_one_incident_per_user_and_window() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, user) = tenant_with_user(&mut conn, "Acme");
    // Two failures long ago do not count.
    diesel::sql_query(format!(
        "INSERT INTO failed_logins (user_id, tenant_id, source_ip, attempted_at)
         VALUES ({0}, {1}, '192.0.2.1', now() - interval '1 hour'), ({0}, {1}, '192.0.2.1', now() - interval '1 hour')",
        user.id, tenant.id
    ))
    .execute(&mut conn)
    .unwrap();

    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(
            record_failed_login(
                &outbox,
                &mut conn,
                Metadata::system(),
                user.id,
                "203.0.113.9",
                &policy(3),
            )
            .unwrap(),
        );
    }

    let failures: Vec<i64> = outcomes.iter().map(|o| o.failures_in_window).collect();
    assert_eq!(failures, [1, 2, 3, 4, 5]);
    let raised: Vec<bool> = outcomes.iter().map(|o| o.incident.is_some()).collect();
    assert_eq!(raised, [false, false, true, false, false], "once per window");
    let incident = outcomes[2].incident.clone().unwrap();
    assert_eq!(incident.value.attempts, 3);
    assert_eq!(incident.value.window_seconds, 900);
    let rows = events_of(&mut conn, "security.suspicious_activity_detected");
    assert_eq!(rows.len(), 1);
    assert_envelope(
        &rows[0],
        incident.event_id,
        "security.suspicious_activity_detected",
        "security_incident",
        incident.value.id,
        tenant.id,
        None,
    );
    let event: chom::events::SuspiciousActivityDetected =
        serde_json::from_value(rows[0].payload.clone()).unwrap();
    assert_eq!(event.user_id, user.id);
    assert_eq!(event.email, user.email);
    assert_eq!(event.kind, "failed_logins");
    assert_eq!(event.attempts, 3);
    assert_eq!(event.window_seconds, 900);
    assert_eq!(event.first_attempt_at, incident.value.first_attempt_at);
    assert!(event.first_attempt_at <= event.last_attempt_at);
    assert_eq!(
        keys(&rows[0].payload),
        [
            "attempts",
            "email",
            "first_attempt_at",
            "incident_id",
            "kind",
            "last_attempt_at",
            "tenant_id",
            "user_id",
            "window_seconds"
        ]
    );

    // Once the window has passed since the incident, failures raise another.
    diesel::sql_query(
        "UPDATE security_incidents SET detected_at = now() - interval '1 hour';
         ",
    )
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query("UPDATE failed_logins SET attempted_at = now() - interval '1 hour'")
        .execute(&mut conn)
        .unwrap();
    let again: Vec<bool> = (0..3)
        .map(|_| {
            record_failed_login(
                &outbox,
                &mut conn,
                Metadata::system(),
                user.id,
                "2001:db8::1",
                &policy(3),
            )
            .unwrap()
            .incident
            .is_some()
        })
        .collect();
    assert_eq!(again, [false, false, true]);
    assert_eq!(list_incidents(&mut conn, Some(tenant.id)).unwrap().len(), 2);
    assert_eq!(
        events_of(&mut conn, "security.suspicious_activity_detected").len(),
        2
    );
}

#[test]
fn a_failed_login_that_cannot_be_recorded_leaves_nothing() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (_, user) = tenant_with_user(&mut conn, "Acme");
    let login = |conn: &mut PgConnection, metadata| {
        record_failed_login(&outbox, conn, metadata, user.id, "198.51.100.7", &policy(1))
    };

    assert_rolled_back(login(&mut conn, failing_metadata()));

    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_logins"), 0);
    assert_eq!(
        security_incidents::table
            .count()
            .get_result::<i64>(&mut conn)
            .unwrap(),
        0
    );
    assert_eq!(events(&mut conn).len(), 0);
    assert!(login(&mut conn, Metadata::system()).unwrap().incident.is_some());

    for (ip, policy) in [("not an address", policy(1)), ("10.0.0.1", policy(0))] {
        let result = record_failed_login(&outbox, &mut conn, Metadata::system(), user.id, ip, &policy);
        assert!(
            matches!(result, Err(ChomError::InvalidInput { .. })),
            "{ip}: {result:?}"
        );
    }
    let unknown = record_failed_login(
        &outbox,
        &mut conn,
        Metadata::system(),
        999,
        "10.0.0.1",
        &policy(1),
    );
    assert!(
        matches!(unknown, Err(ChomError::NotFound { what: "user", .. })),
        "{unknown:?}"
    );
    assert_eq!(
        failed_logins::table.count().get_result::<i64>(&mut conn).unwrap(),
        1
    );
}
