//! CHOM's projections rebuilt while `chom simulate` traffic runs:
//! `update_tenant_metrics` ends equal to a recompute from the source
//! tables, and the activity feed holds one line per tenant event, each
//! once.

use std::time::Duration;

use chom::simulate::SimulateConfig;
use diesel::prelude::*;
use outbox::projection;

use crate::pipeline::Pipeline;

const LIMIT: Duration = Duration::from_secs(90);

fn state(conn: &mut PgConnection, name: &str) -> projection::ProjectionStatus {
    projection::statuses(conn)
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// `tenant_stats` as the listener would write it, recomputed from the
/// source tables, differing rows counted.
fn stats_differing_from_a_recompute(conn: &mut PgConnection) -> i64 {
    outbox::testing::count(
        conn,
        "SELECT count(*) AS n FROM tenants t
         LEFT JOIN tenant_stats ts ON ts.tenant_id = t.id
         LEFT JOIN (SELECT tenant_id, count(*) AS sites,
                           count(*) FILTER (WHERE status = 'active') AS active,
                           COALESCE(sum(storage_bytes), 0)::bigint AS storage
                    FROM sites WHERE deleted_at IS NULL GROUP BY tenant_id) s ON s.tenant_id = t.id
         LEFT JOIN (SELECT tenant_id, count(*) AS backups,
                           count(*) FILTER (WHERE status = 'failed') AS failed
                    FROM backups GROUP BY tenant_id) b ON b.tenant_id = t.id
         WHERE ts.tenant_id IS NULL
            OR ts.site_count <> COALESCE(s.sites, 0)
            OR ts.active_site_count <> COALESCE(s.active, 0)
            OR ts.storage_bytes <> COALESCE(s.storage, 0)
            OR ts.backup_count <> COALESCE(b.backups, 0)
            OR ts.failed_backup_count <> COALESCE(b.failed, 0)",
    )
}

/// Tenant events stored (log and outbox) without their feed line, plus
/// feed lines of no stored event.
fn feed_mismatches(conn: &mut PgConnection) -> i64 {
    outbox::testing::count(
        conn,
        "WITH stored AS (SELECT event_id FROM outbox_event_log WHERE tenant_id IS NOT NULL
                         UNION ALL SELECT event_id FROM outbox_events WHERE tenant_id IS NOT NULL)
         SELECT ((SELECT count(*) FROM stored s WHERE NOT EXISTS
                     (SELECT 1 FROM tenant_activity a WHERE a.event_id = s.event_id))
               + (SELECT count(*) FROM tenant_activity a WHERE NOT EXISTS
                     (SELECT 1 FROM stored s WHERE s.event_id = a.event_id)))::bigint AS n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_under_simulated_traffic_end_equal_to_a_recompute() {
    let mut pipeline = Pipeline::start(true).await;
    let (url, outbox) = (pipeline.db.url().to_owned(), pipeline.outbox.clone());
    let simulate = |sites, seed| {
        let (url, outbox) = (url.clone(), outbox.clone());
        tokio::task::spawn_blocking(move || {
            let pool = outbox::pool(&url, 4, Duration::from_secs(5)).unwrap();
            chom::simulate::run(
                &pool,
                &outbox,
                &SimulateConfig {
                    tenants: 4,
                    sites,
                    writers: 2,
                    seed,
                    ..SimulateConfig::default()
                },
            )
            .unwrap()
        })
    };
    simulate(40, 1).await.unwrap();
    // More traffic while both projections are rebuilt.
    let traffic = simulate(120, 2);
    for name in [
        chom::listeners::UPDATE_TENANT_METRICS,
        chom::listeners::TENANT_ACTIVITY,
    ] {
        outbox::testing::eventually("the worker recorded the projection", LIMIT, || {
            projection::statuses(&mut pipeline.conn)
                .unwrap()
                .iter()
                .any(|s| s.name == name)
        })
        .await;
        projection::request_rebuild(&mut pipeline.conn, name).unwrap();
    }
    for name in [
        chom::listeners::UPDATE_TENANT_METRICS,
        chom::listeners::TENANT_ACTIVITY,
    ] {
        outbox::testing::eventually("the rebuild done", LIMIT, || {
            let s = state(&mut pipeline.conn, name);
            s.state == "live" && s.rebuild_finished_at.is_some()
        })
        .await;
    }
    traffic.await.unwrap();
    outbox::testing::eventually("tenant_stats equal to a recompute", LIMIT, || {
        stats_differing_from_a_recompute(&mut pipeline.conn) == 0
    })
    .await;
    outbox::testing::eventually("one feed line per tenant event", LIMIT, || {
        feed_mismatches(&mut pipeline.conn) == 0
    })
    .await;
    let stats = state(&mut pipeline.conn, chom::listeners::UPDATE_TENANT_METRICS);
    assert!(stats.rebuilt_events > 0, "{stats:?}");
    let lines = chom::listeners::activity_feed::recent(&mut pipeline.conn, 1, 5).unwrap();
    assert!(!lines.is_empty());
    assert!(
        lines.windows(2).all(|w| w[0].occurred_at >= w[1].occurred_at),
        "newest first"
    );
    pipeline.stop().await;
}
