//! Postgres with a streaming standby (`postgres.rs`): the relay, the
//! worker and a writer of CHOM traffic given the multi-host URL
//! (`target_session_attrs=read-write`); replication is paused so that the
//! primary commits what the standby lacks, the primary crashes, the
//! standby is promoted. Without the phantom guard the relay has published
//! events the new primary never saw; with it, none. Either way the
//! pipeline resumes against the new primary (once a standby follows it,
//! for the guard), and the figures are printed: the guard's latency cost
//! in steady state, phantoms, commits lost with the old primary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use diesel::sql_types::Uuid as SqlUuid;
use outbox::testing::{count, delete_broker_objects, eventually};
use outbox::{Relay, RelayConfig, Worker, WorkerConfig};
use uuid::Uuid;

use crate::postgres::PgPair;
use crate::traffic::{self, Ordered, Writer};
use crate::{Pipeline, blocking};

/// What one promotion showed.
#[derive(Debug)]
pub struct Promotion {
    pub guard: bool,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub committed_while_paused: usize,
    pub phantoms: usize,
    pub lost_commits: usize,
    /// From the promotion (with the guard: from a new standby streaming)
    /// to the first event recorded after the promotion delivered.
    pub resumed_ms: f64,
    /// With the guard: the promotion to a new standby streaming from the
    /// new primary (`pg_basebackup`).
    pub standby_rebuilt_ms: f64,
}

#[derive(QueryableByName)]
struct EventId {
    #[diesel(sql_type = SqlUuid)]
    event_id: Uuid,
}

fn event_ids(conn: &mut PgConnection) -> HashSet<Uuid> {
    diesel::sql_query("SELECT event_id FROM outbox_events")
        .load::<EventId>(conn)
        .unwrap()
        .into_iter()
        .map(|row| row.event_id)
        .collect()
}

/// Deletes the run's queues and exchange at the end, also after a panic.
struct BrokerCleanup {
    brokers: String,
    queues: Vec<String>,
    exchange: String,
}

impl Drop for BrokerCleanup {
    fn drop(&mut self) {
        delete_broker_objects(&self.brokers, &self.queues, std::slice::from_ref(&self.exchange));
    }
}

/// One run: traffic, replication paused, the primary crashed, the standby
/// promoted, a new standby for it, traffic again.
pub async fn promote_under_traffic(brokers: &str, guard: bool) -> Promotion {
    let mut pair = blocking(PgPair::start).await;
    let database = "outbox_standby";
    {
        let mut admin = outbox::connect(&pair.primary.url("postgres")).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .unwrap();
        let mut conn = outbox::connect(&pair.primary.url(database)).unwrap();
        chom::migrate(&mut conn).unwrap();
        diesel::sql_query(traffic::EFFECTS_TABLE)
            .execute(&mut conn)
            .unwrap();
    }
    let url = pair.url(database);

    let id = Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_test.{id}");
    let app = format!("outbox_test.s{}", &id[16..]);
    let ordered = Ordered::default();
    let registry = traffic::registry(&ordered);
    let worker = Worker::new(
        WorkerConfig {
            database_url: url.clone(),
            amqp_url: brokers.to_owned(),
            exchange: exchange.clone(),
            app,
            quorum_initial_group_size: Some(3),
            shutdown_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(1),
            ..WorkerConfig::default()
        },
        &registry,
    )
    .unwrap();
    let _cleanup = BrokerCleanup {
        brokers: brokers.to_owned(),
        queues: worker
            .queues()
            .iter()
            .flat_map(|q| q.all_queues().into_iter().map(str::to_owned))
            .collect(),
        exchange: exchange.clone(),
    };
    worker.declare_topology().await.unwrap();
    let relay = Relay::new(RelayConfig {
        database_url: url.clone(),
        amqp_url: brokers.to_owned(),
        exchange,
        reconnect_max: Duration::from_secs(1),
        wait_for_standby: guard.then_some(Duration::from_secs(1)),
        ..RelayConfig::default()
    })
    .unwrap();
    let pipeline = Pipeline::start(relay, worker);

    // Steady traffic, and its latency with or without the guard.
    let mut writer = Writer::start(&url, Duration::from_millis(20));
    let mut conn = outbox::connect(&url).unwrap();
    eventually("the first events delivered", Duration::from_secs(30), || {
        traffic::undelivered_older_than(&mut conn, Duration::from_secs(1)) == 0
            && count(&mut conn, "SELECT count(*) AS n FROM effects") > 0
    })
    .await;
    let steady_from = Utc::now();
    let until = writer.recorded() + 150;
    eventually("three seconds of steady traffic", Duration::from_secs(30), || {
        writer.recorded() >= until
    })
    .await;
    let steady_to = Utc::now();
    eventually("the steady window delivered", Duration::from_secs(30), || {
        traffic::undelivered_older_than(&mut conn, Duration::from_secs(1)) == 0
    })
    .await;
    let (p50_ms, p99_ms) = traffic::latency_percentiles(&mut conn, steady_from, steady_to);
    drop(conn);

    // The standby stops receiving while the primary commits 50 events
    // more; then the primary crashes and the standby is promoted.
    // (A query and a signal: quick enough for the async thread.)
    pair.pause_replication();
    let paused_at = writer.recorded();
    eventually("50 commits the standby lacks", Duration::from_secs(30), || {
        writer.recorded() >= paused_at + 50
    })
    .await;
    let committed_while_paused = (writer.recorded() - paused_at) as usize;
    let mut pair = blocking(move || {
        pair.crash_primary();
        pair.promote();
        pair
    })
    .await;
    let mut promoted = Instant::now();
    let promoted_at = Utc::now();
    let mut standby_rebuilt_ms = 0.0;
    if guard {
        // The guard publishes only what a standby has: the new primary
        // needs one before anything flows again.
        pair = blocking(move || {
            pair.rebuild_standby();
            pair
        })
        .await;
        standby_rebuilt_ms = promoted.elapsed().as_secs_f64() * 1000.0;
        promoted = Instant::now();
    }

    // The pipeline resumes against the new primary.
    let mut conn = outbox::connect(&url).unwrap();
    let delivered =
        |ordered: &Ordered| -> HashSet<Uuid> { ordered.snapshot().into_iter().map(|d| d.event_id).collect() };
    let after_promotion = |conn: &mut PgConnection| {
        diesel::sql_query("SELECT event_id FROM outbox_events WHERE recorded_at > $1")
            .bind::<diesel::sql_types::Timestamptz, _>(promoted_at)
            .load::<EventId>(conn)
            .map(|rows| rows.into_iter().map(|r| r.event_id).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut resumed_ms = 0.0;
    eventually(
        "an event recorded after the promotion delivered",
        Duration::from_secs(60),
        || {
            let seen = delivered(&ordered);
            let resumed = after_promotion(&mut conn).iter().any(|id| seen.contains(id));
            if resumed {
                resumed_ms = promoted.elapsed().as_secs_f64() * 1000.0;
            }
            resumed
        },
    )
    .await;
    let until = writer.recorded() + 50;
    eventually("traffic on the new primary", Duration::from_secs(30), || {
        writer.recorded() >= until
    })
    .await;
    writer.stop();
    eventually(
        "every event of the new primary delivered",
        Duration::from_secs(60),
        || {
            let seen = delivered(&ordered);
            event_ids(&mut conn).iter().all(|id| seen.contains(id))
        },
    )
    .await;
    // The worker's inbox transactions go on too.
    let recent = after_promotion(&mut conn);
    assert!(!recent.is_empty());
    eventually(
        "the inbox listener's effects on the new primary",
        Duration::from_secs(30),
        || {
            count(
                &mut conn,
                &format!(
                    "SELECT count(DISTINCT event_id) AS n FROM effects WHERE event_id IN ({})",
                    recent
                        .iter()
                        .map(|id| format!("'{id}'"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ) == recent.len() as i64
        },
    )
    .await;

    let surviving = event_ids(&mut conn);
    let phantoms = delivered(&ordered).difference(&surviving).count();
    let lost_commits = writer
        .acknowledged
        .lock()
        .map(|acked| acked.iter().filter(|id| !surviving.contains(id)).count())
        .unwrap_or_default();
    // After the crash either may end with an error of the old primary's.
    let _ = pipeline.stop().await;
    drop(conn);
    blocking(move || drop(pair)).await;
    Promotion {
        guard,
        p50_ms,
        p99_ms,
        committed_while_paused,
        phantoms,
        lost_commits,
        resumed_ms,
        standby_rebuilt_ms,
    }
}
