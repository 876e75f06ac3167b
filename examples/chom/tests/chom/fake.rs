//! The seed's "fake events" style: assert what a service recorded through
//! `Outbox::fake()`, with the domain writes still real.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chom::ChomError;
use chom::events::{BackupCompleted, SiteCreated, SiteProvisioningFailed};
use chom::services::backups::{complete_backup, create_backup};
use chom::services::sites::{create_site, provision_site};
use outbox::{BoxError, EventEnvelope, Metadata, Outbox, Registry, SyncListener};

use crate::support::{event_count, setup, tenant_with_user};

#[test]
fn fake_outbox_sees_the_site_created_event() {
    let (_db, mut conn) = setup();
    let (outbox, fake) = Outbox::fake();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");

    let site = create_site(&outbox, &mut conn, Metadata::by("user:1"), tenant.id, "a.test")
        .unwrap()
        .value;

    fake.assert_recorded_times("site.created", 1);
    fake.assert_not_recorded("site.provisioned");
    assert_eq!(
        fake.payloads::<SiteCreated>("site.created"),
        [SiteCreated {
            site_id: site.id,
            tenant_id: tenant.id,
            domain: "a.test".into()
        }]
    );
    let envelope = &fake.recorded()[0];
    assert_eq!(envelope.actor.as_deref(), Some("user:1"));
    assert_eq!(envelope.tenant_id, Some(tenant.id.to_string()));
    assert_eq!(event_count(&mut conn), 0, "a fake outbox writes no outbox rows");
}

#[test]
fn fake_outbox_sees_nothing_from_a_failed_call() {
    let (_db, mut conn) = setup();
    let (outbox, fake) = Outbox::fake();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    fake.clear();

    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id);

    assert!(
        matches!(backup, Err(ChomError::InvalidState { .. })),
        "{backup:?}"
    );
    fake.assert_nothing_recorded();

    let failed = provision_site(&outbox, &mut conn, Metadata::system(), site.id, Err("dns".into())).unwrap();
    assert_eq!(failed.event_type, "site.provisioning_failed");
    assert_eq!(
        fake.payloads::<SiteProvisioningFailed>("site.provisioning_failed")[0].error,
        "dns"
    );
}

/// Counts the events it sees, like the seed's RecordMetrics.
struct Counter(Arc<AtomicUsize>);

impl SyncListener for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn handle(&self, _event: &EventEnvelope) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn sync_listeners_run_after_commit_only() {
    let (_db, mut conn) = setup();
    let seen = Arc::new(AtomicUsize::new(0));
    let registry = Registry::new()
        .sync_listener(&chom::events::EVENT_TYPES, Counter(seen.clone()))
        .unwrap();
    let (outbox, fake) = Outbox::fake_with(registry);
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    provision_site(&outbox, &mut conn, Metadata::system(), site.id, Ok(())).unwrap();
    let backup = create_backup(&outbox, &mut conn, Metadata::system(), site.id)
        .unwrap()
        .value;
    complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, 100, 7).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 4);

    let rejected = complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, 100, 7);
    assert!(rejected.is_err());
    assert_eq!(
        seen.load(Ordering::SeqCst),
        4,
        "no listener runs for a rolled-back call"
    );
    assert_eq!(
        fake.event_types(),
        [
            "site.created",
            "site.provisioned",
            "backup.created",
            "backup.completed"
        ]
    );
    assert_eq!(
        fake.payloads::<BackupCompleted>("backup.completed")[0].size_bytes,
        100
    );
}
