//! The seed's integration list end to end: services write, the relay
//! publishes, RabbitMQ routes, the worker's listeners act.

use std::time::Duration;

use chom::schema::tenant_stats;
use chom::services::{backups, sites, tenants};
use diesel::prelude::*;
use outbox::Metadata;
use outbox::failed_jobs::{self, Filter};

use crate::pipeline::{Pipeline, wait_for_count, wait_for_messages};
use crate::support::{count, tenant_with_user};

type Stats = (i64, i64, i64, i64, i64);

fn stats(conn: &mut PgConnection, tenant: i64) -> Option<Stats> {
    tenant_stats::table
        .find(tenant)
        .select((
            tenant_stats::site_count,
            tenant_stats::active_site_count,
            tenant_stats::storage_bytes,
            tenant_stats::backup_count,
            tenant_stats::failed_backup_count,
        ))
        .first(conn)
        .optional()
        .unwrap()
}

async fn wait_for_stats(conn: &mut PgConnection, tenant: i64, expected: Stats) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = stats(conn, tenant);
        if now == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tenant stats {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn audit_trail(conn: &mut PgConnection, tenant: i64) -> Vec<(String, Option<String>)> {
    use chom::schema::audit_logs::dsl;
    dsl::audit_logs
        .filter(dsl::tenant_id.eq(tenant))
        .order((dsl::occurred_at, dsl::id))
        .select((dsl::action, dsl::actor))
        .load(conn)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn site_created_provisioned_deleted() {
    let mut p = Pipeline::start(true).await;
    let (tenant, user) = tenant_with_user(&mut p.conn, "Acme");
    let actor = format!("user:{}", user.id);
    let site = sites::create_site(
        &p.outbox,
        &mut p.conn,
        Metadata::by(&actor),
        tenant.id,
        "shop.test",
    )
    .unwrap()
    .value;
    wait_for_stats(&mut p.conn, tenant.id, (1, 0, 0, 0, 0)).await;
    sites::provision_site(&p.outbox, &mut p.conn, Metadata::system(), site.id, Ok(())).unwrap();
    wait_for_stats(&mut p.conn, tenant.id, (1, 1, 0, 0, 0)).await;
    sites::delete_site(&p.outbox, &mut p.conn, Metadata::by(&actor), site.id).unwrap();
    wait_for_stats(&mut p.conn, tenant.id, (0, 0, 0, 0, 0)).await;

    let sql = format!(
        "SELECT count(*) AS n FROM audit_logs WHERE tenant_id = {}",
        tenant.id
    );
    wait_for_count(&mut p.conn, &sql, 3).await;
    assert_eq!(
        audit_trail(&mut p.conn, tenant.id),
        [
            ("site.created".to_owned(), Some(actor.clone())),
            ("site.provisioned".to_owned(), None),
            ("site.deleted".to_owned(), Some(actor.clone())),
        ]
    );
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM notifications"),
        0,
        "nothing failed"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        3,
        "no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn site_provisioning_failed_notifies_the_tenants_users() {
    let mut p = Pipeline::start(true).await;
    let (tenant, _) = tenant_with_user(&mut p.conn, "Acme");
    tenants::create_user(&mut p.conn, tenant.id, "ops@acme.test", "Ops").unwrap();
    let site = sites::create_site(&p.outbox, &mut p.conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    sites::provision_site(
        &p.outbox,
        &mut p.conn,
        Metadata::system(),
        site.id,
        Err("certificate issuance timed out".into()),
    )
    .unwrap();
    let sql = format!(
        "SELECT count(*) AS n FROM notifications WHERE tenant_id = {} AND kind = 'site.provisioning_failed' AND body LIKE '%certificate issuance timed out%'",
        tenant.id
    );
    wait_for_count(&mut p.conn, &sql, 2).await;
    wait_for_stats(&mut p.conn, tenant.id, (1, 0, 0, 0, 0)).await;
    let audit = format!(
        "SELECT count(*) AS n FROM audit_logs WHERE tenant_id = {}",
        tenant.id
    );
    wait_for_count(&mut p.conn, &audit, 2).await;
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM notifications"),
        2,
        "once per user"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_created_completed_and_failed() {
    let mut p = Pipeline::start(true).await;
    let (tenant, _) = tenant_with_user(&mut p.conn, "Acme");
    let site = sites::create_site(&p.outbox, &mut p.conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    sites::provision_site(&p.outbox, &mut p.conn, Metadata::system(), site.id, Ok(())).unwrap();
    let first = backups::create_backup(&p.outbox, &mut p.conn, Metadata::by("user:7"), site.id)
        .unwrap()
        .value;
    wait_for_stats(&mut p.conn, tenant.id, (1, 1, 0, 1, 0)).await;
    backups::complete_backup(
        &p.outbox,
        &mut p.conn,
        Metadata::system(),
        first.id,
        123_456,
        2_000,
    )
    .unwrap();
    wait_for_stats(&mut p.conn, tenant.id, (1, 1, 123_456, 1, 0)).await;
    let second = backups::create_backup(&p.outbox, &mut p.conn, Metadata::system(), site.id)
        .unwrap()
        .value;
    backups::fail_backup(
        &p.outbox,
        &mut p.conn,
        Metadata::system(),
        second.id,
        "storage bucket unreachable",
    )
    .unwrap();
    wait_for_stats(&mut p.conn, tenant.id, (1, 1, 123_456, 2, 1)).await;

    let notified = format!(
        "SELECT count(*) AS n FROM notifications WHERE kind = 'backup.failed' AND body LIKE '%storage bucket unreachable%' AND tenant_id = {}",
        tenant.id
    );
    wait_for_count(&mut p.conn, &notified, 1).await;
    let audit = format!(
        "SELECT count(*) AS n FROM audit_logs WHERE tenant_id = {}",
        tenant.id
    );
    wait_for_count(&mut p.conn, &audit, 6).await;
    let trail = audit_trail(&mut p.conn, tenant.id);
    let actions: Vec<&str> = trail.iter().map(|(action, _)| action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "site.created",
            "site.provisioned",
            "backup.created",
            "backup.completed",
            "backup.created",
            "backup.failed"
        ]
    );
    assert_eq!(trail[2].1.as_deref(), Some("user:7"));
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM notifications"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notifier_outage_that_outlasts_the_retries_ends_in_failed_jobs() {
    let mut p = Pipeline::start(true).await;
    let (tenant, _) = tenant_with_user(&mut p.conn, "Acme");
    let site = sites::create_site(&p.outbox, &mut p.conn, Metadata::system(), tenant.id, "a.test")
        .unwrap()
        .value;
    p.notifier.down();
    let failed = sites::provision_site(
        &p.outbox,
        &mut p.conn,
        Metadata::system(),
        site.id,
        Err("no capacity".into()),
    )
    .unwrap();
    let dead = p.broker.queue("send_notification").dead.clone();
    wait_for_messages(&dead, 1).await;

    let jobs = failed_jobs::list(&mut p.conn, &Filter::default()).unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    let job = &jobs[0];
    assert_eq!(job.listener, "send_notification");
    assert_eq!(job.event_id, Some(failed.event_id));
    assert_eq!(job.event_type.as_deref(), Some("site.provisioning_failed"));
    assert_eq!(job.attempts, 3, "the configured tries");
    assert_eq!(job.errors.len(), 3);
    assert!(
        job.exception.contains("notifier unavailable"),
        "{}",
        job.exception
    );
    assert_eq!(job.payload["data"]["error"], "no capacity");
    // The other listeners were not held up by the outage.
    let audit = format!(
        "SELECT count(*) AS n FROM audit_logs WHERE tenant_id = {}",
        tenant.id
    );
    wait_for_count(&mut p.conn, &audit, 2).await;
    wait_for_stats(&mut p.conn, tenant.id, (1, 0, 0, 0, 0)).await;
    assert_eq!(count(&mut p.conn, "SELECT count(*) AS n FROM notifications"), 0);

    // The notifier is back: an operator retries the job, which goes to the
    // notification queue only.
    p.notifier.up();
    let connection = outbox::amqp::connect(&crate::pipeline::amqp_url(), "chom test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let pool = p.db.pool(2).unwrap();
    failed_jobs::retry(&pool, &channel, job.id, Duration::from_secs(10))
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    wait_for_count(&mut p.conn, "SELECT count(*) AS n FROM notifications", 1).await;
    p.stop().await;
    let mut conn = p.db.connect().unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        2,
        "audit not repeated"
    );
}
