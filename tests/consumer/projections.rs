//! Projections (`src/projection.rs`): a read model fed live by its listener
//! and rebuilt from the event log while writers keep writing ends equal to
//! a recompute from the stored events; a rebuild stopped half way resumes
//! and ends equal too; v1 payloads reach the v2 projection through its
//! upcaster in a rebuild.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox::consumer::{ListenerError, ReceivedEvent};
use outbox::projection::{self, Projection};
use outbox::{DomainEvent, Registry, TestDatabase};
use serde::{Deserialize, Serialize};

use crate::broker::TestBroker;
use crate::harness::{Running, eventually};

const LIMIT: Duration = Duration::from_secs(60);

/// `score.added`: v1 `{player, points}`, v2 adds `multiplier`.
#[derive(Serialize)]
struct ScoreAdded {
    #[serde(skip)]
    version: i32,
    player: String,
    points: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    multiplier: Option<i64>,
}

impl DomainEvent for ScoreAdded {
    fn event_type(&self) -> &'static str {
        "score.added"
    }
    fn aggregate_type(&self) -> &'static str {
        "player"
    }
    fn aggregate_id(&self) -> String {
        self.player.clone()
    }
    fn schema_version(&self) -> i32 {
        self.version
    }
}

#[derive(Deserialize)]
struct ScoreAddedV2 {
    player: String,
    points: i64,
    multiplier: i64,
}

/// Totals per player; fails its nth batch when told (a rebuild "killed"
/// half way).
#[derive(Clone, Default)]
struct Scores {
    fail_at_batch: Option<usize>,
    batches: Arc<AtomicUsize>,
}

impl Projection for Scores {
    fn name(&self) -> &str {
        "scores"
    }
    fn event_types(&self) -> Vec<String> {
        vec!["score.added".into()]
    }
    fn reset(&self, conn: &mut PgConnection) -> Result<(), ListenerError> {
        diesel::sql_query("DELETE FROM scores").execute(conn)?;
        Ok(())
    }
    fn apply(&self, conn: &mut PgConnection, events: &[ReceivedEvent]) -> Result<(), ListenerError> {
        let batch = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_at_batch == Some(batch) {
            return Err(ListenerError::transient("killed half way"));
        }
        // A batch aggregated in memory: one upsert a player.
        let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
        for event in events {
            let score: ScoreAddedV2 = event.data_as()?;
            *totals.entry(score.player).or_default() += score.points * score.multiplier;
        }
        for (player, total) in totals {
            diesel::sql_query(
                "INSERT INTO scores (player, total) VALUES ($1, $2)
                 ON CONFLICT (player) DO UPDATE SET total = scores.total + EXCLUDED.total",
            )
            .bind::<Text, _>(player)
            .bind::<BigInt, _>(total)
            .execute(conn)?;
        }
        Ok(())
    }
}

fn registry(scores: Scores) -> Registry {
    Registry::new()
        .projection(scores)
        .unwrap()
        .upcaster("score.added", 1, |mut v| {
            v["multiplier"] = serde_json::json!(1);
            Ok(v)
        })
        .unwrap()
}

fn database() -> (TestDatabase, PgConnection) {
    let (db, mut conn) = crate::support::database();
    diesel::sql_query("CREATE TABLE scores (player TEXT PRIMARY KEY, total BIGINT NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    (db, conn)
}

/// Records `n` scores round-robin over 10 players, odd ones as v1.
fn record_scores(conn: &mut PgConnection, from: usize, n: usize) {
    conn.transaction::<_, outbox::Error, _>(|conn| {
        for i in from..from + n {
            let v1 = i % 2 == 1;
            outbox::record(
                conn,
                &ScoreAdded {
                    version: if v1 { 1 } else { 2 },
                    player: format!("p{}", i % 10),
                    points: (i % 7) as i64 + 1,
                    multiplier: (!v1).then_some(2),
                },
            )?;
        }
        Ok(())
    })
    .unwrap();
}

#[derive(QueryableByName, Debug, PartialEq, Eq)]
struct Total {
    #[diesel(sql_type = Text)]
    player: String,
    #[diesel(sql_type = BigInt)]
    total: i64,
}

fn read_model(conn: &mut PgConnection) -> Vec<Total> {
    diesel::sql_query("SELECT player, total FROM scores ORDER BY player")
        .load(conn)
        .unwrap()
}

/// The totals recomputed from every stored event (log and outbox).
fn recompute(conn: &mut PgConnection) -> Vec<Total> {
    diesel::sql_query(
        "SELECT aggregate_id AS player,
                sum((payload->>'points')::bigint * COALESCE((payload->>'multiplier')::bigint, 1))::bigint AS total
         FROM (SELECT aggregate_id, payload FROM outbox_event_log
               UNION ALL SELECT aggregate_id, payload FROM outbox_events) stored
         GROUP BY aggregate_id ORDER BY aggregate_id",
    )
    .load(conn)
    .unwrap()
}

fn status(conn: &mut PgConnection) -> projection::ProjectionStatus {
    projection::statuses(conn)
        .unwrap()
        .into_iter()
        .find(|s| s.name == "scores")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_traffic_ends_equal_to_the_live_model_and_a_recompute() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    record_scores(&mut conn, 0, 300);
    let worker = Running::start(&db, &mut broker, &registry(Scores::default())).await;
    // Published rows move into the log at once, so the rebuild reads both.
    let relay = outbox::Relay::new(outbox::RelayConfig {
        database_url: db.url().to_owned(),
        amqp_url: crate::broker::amqp_url(),
        exchange: broker.exchange.clone(),
        poll_max: Duration::from_millis(20),
        retention: Duration::ZERO,
        prune_interval: Duration::from_millis(50),
        ..outbox::RelayConfig::default()
    })
    .unwrap();
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(async move {
        relay
            .run(async {
                let _ = relay_stopped.await;
            })
            .await
    });
    eventually("the first 300 applied live", LIMIT, || {
        read_model(&mut conn).iter().map(|t| t.total).sum::<i64>() > 0
            && read_model(&mut conn) == recompute(&mut conn)
    })
    .await;

    // Writers keep writing while the rebuild runs.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (url, writing) = (db.url().to_owned(), Arc::clone(&writing));
        tokio::task::spawn_blocking(move || {
            let mut conn = outbox::connect(&url).unwrap();
            let mut next = 300;
            while writing.load(Ordering::SeqCst) {
                record_scores(&mut conn, next, 10);
                next += 10;
            }
            next
        })
    };
    projection::request_rebuild(&mut conn, "scores").unwrap();
    assert!(
        projection::request_rebuild(&mut conn, "scores").is_err(),
        "a second request while one is pending is refused"
    );
    eventually("the rebuild done", LIMIT, || {
        let s = status(&mut conn);
        s.state == "live" && s.rebuild_finished_at.is_some()
    })
    .await;
    writing.store(false, Ordering::SeqCst);
    let written = writer.await.unwrap();
    assert!(written > 300, "writes went on during the rebuild");
    eventually("the live model equal to a recompute", LIMIT, || {
        read_model(&mut conn) == recompute(&mut conn)
    })
    .await;
    let s = status(&mut conn);
    assert!(s.rebuilt_events >= 300, "{s:?}");
    let total_points: i64 = read_model(&mut conn).iter().map(|t| t.total).sum();
    assert!(total_points > 0);

    let _ = stop_relay.send(());
    relay.await.unwrap().unwrap();
    worker.stop().await;
}

#[test]
fn a_rebuild_stopped_half_way_resumes_and_upcasts_v1_payloads() {
    let (_db, mut conn) = database();
    record_scores(&mut conn, 0, 1000);
    diesel::sql_query("UPDATE outbox_events SET published_at = now()")
        .execute(&mut conn)
        .unwrap();
    let moved = outbox::event_log::move_published(&mut conn, 0.0, 10_000).unwrap();
    assert_eq!(moved, 1000);
    record_scores(&mut conn, 1000, 37); // not yet published
    let upcasters = registry(Scores::default()).upcasters().clone();
    let failing = Scores {
        fail_at_batch: Some(4),
        ..Scores::default()
    };
    let stopped = projection::rebuild(&mut conn, &failing, &upcasters, 100);
    assert!(stopped.is_err(), "the fourth batch fails");
    let half = status(&mut conn);
    assert_eq!(half.state, "rebuilding");
    assert!(half.position > 0 && half.rebuild_lag() > 0, "{half:?}");
    let report = projection::rebuild(&mut conn, &Scores::default(), &upcasters, 100).unwrap();
    assert!(report.resumed);
    assert_eq!(
        report.events, 1037,
        "each event once: the log and the 37 not yet logged"
    );
    assert_eq!(read_model(&mut conn), recompute(&mut conn));
    assert_eq!(status(&mut conn).state, "live");
    // The 37 will still be delivered live: the inbox has them.
    assert_eq!(
        outbox::testing::count(
            &mut conn,
            "SELECT count(*) AS n FROM processed_events WHERE listener = 'scores'"
        ),
        37
    );
}
