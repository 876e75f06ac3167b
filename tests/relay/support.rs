//! Test fixtures: events to record and relays running in-process (the
//! exchange and proxy fixtures are `outbox::testing`'s).

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use outbox::testing::TestExchange;
use outbox::{Relay, RelayConfig, TestDatabase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use outbox::testing::{Ticked, count, eventually};

/// Records ticks of one counter, one per transaction.
pub fn record_ticks(conn: &mut PgConnection, aggregate: &str, range: std::ops::Range<i64>) -> Vec<Uuid> {
    outbox::testing::record_ticks(conn, aggregate, range).unwrap()
}

/// Records ticks `0..per_aggregate` of `aggregates` counters, interleaved.
pub fn record_interleaved(conn: &mut PgConnection, aggregates: usize, per_aggregate: i64) -> usize {
    outbox::testing::record_interleaved(conn, aggregates, 0..per_aggregate).unwrap()
}

/// A counter reset: the event type tests leave without a queue
/// (`TestExchange::with_binding(Some("counter.ticked"))`).
#[derive(serde::Serialize)]
pub struct Reset {
    pub aggregate: String,
}

impl outbox::DomainEvent for Reset {
    fn event_type(&self) -> &'static str {
        "counter.reset"
    }
    fn aggregate_type(&self) -> &'static str {
        "counter"
    }
    fn aggregate_id(&self) -> String {
        self.aggregate.clone()
    }
}

/// Records one [`Reset`] of `aggregate` in its own transaction.
pub fn record_reset(conn: &mut PgConnection, aggregate: &str) {
    conn.transaction::<_, outbox::Error, _>(|conn| {
        outbox::record(
            conn,
            &Reset {
                aggregate: aggregate.into(),
            },
        )
    })
    .unwrap();
}

pub fn unpublished(conn: &mut PgConnection) -> i64 {
    count(
        conn,
        "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
    )
}

/// Relay settings for tests: fast polling, short retries, this test's
/// database and exchange.
pub fn relay_config(db: &TestDatabase, broker: &TestExchange) -> RelayConfig {
    RelayConfig {
        database_url: db.url().to_owned(),
        exchange: broker.exchange.clone(),
        poll_min: Duration::from_millis(2),
        poll_max: Duration::from_millis(20),
        confirm_timeout: Duration::from_secs(5),
        lease: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        reconnect_max: Duration::from_millis(500),
        stats_interval: Duration::from_millis(100),
        shutdown_timeout: Duration::from_secs(5),
        ..RelayConfig::default()
    }
}

/// A relay running in-process until stopped.
pub struct RunningRelay {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<outbox::Result<()>>>,
    pub health: Arc<outbox::Health>,
}

impl RunningRelay {
    pub fn start(config: RelayConfig) -> Self {
        let relay = Relay::new(config).unwrap();
        let health = relay.health();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Self {
            stop,
            task: Some(task),
            health,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("relay stops within 20 s")
                .expect("relay task")
                .expect("relay run");
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A transaction that has recorded one tick of `aggregate` and stays open
/// until [`OpenWriter::commit`]: its row holds a lower seq than anything
/// recorded meanwhile, and is invisible until then.
pub struct OpenWriter {
    commit: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl OpenWriter {
    /// Returns once the tick is recorded (not committed).
    pub fn start(db: &TestDatabase, aggregate: &str) -> Self {
        let (recorded_tx, recorded_rx) = std::sync::mpsc::channel();
        let (commit, commit_rx) = std::sync::mpsc::channel::<()>();
        let url = db.url().to_owned();
        let aggregate = aggregate.to_owned();
        let thread = std::thread::spawn(move || {
            let mut conn = outbox::connect(&url).unwrap();
            conn.transaction::<_, outbox::Error, _>(|conn| {
                outbox::record(conn, &outbox::testing::Ticked { aggregate, n: 0 })?;
                recorded_tx.send(()).unwrap();
                commit_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        });
        recorded_rx.recv().unwrap();
        Self { commit, thread }
    }

    /// Commits the transaction and waits for it.
    pub fn commit(self) {
        self.commit.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// Index entries read and index scans on outbox_events so far, once this
/// connection's own counts have reached the statistics views.
pub fn index_reads(conn: &mut PgConnection) -> (i64, i64) {
    let scans = count(
        conn,
        "SELECT COALESCE(sum(idx_scan), 0)::bigint AS n FROM pg_stat_user_indexes WHERE relname = 'outbox_events'",
    );
    let entries = count(
        conn,
        "SELECT COALESCE(sum(idx_tup_read), 0)::bigint AS n FROM pg_stat_user_indexes WHERE relname = 'outbox_events'",
    );
    (scans, entries)
}

/// Flushes this connection's statistics and waits until the views show at
/// least `scans` index scans on outbox_events.
pub fn index_reads_after(conn: &mut PgConnection, scans: i64) -> (i64, i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        diesel::sql_query("SELECT pg_stat_force_next_flush()")
            .execute(conn)
            .unwrap();
        diesel::sql_query("SELECT pg_stat_clear_snapshot()")
            .execute(conn)
            .unwrap();
        let now = index_reads(conn);
        if now.0 >= scans {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never showed the claim's scans"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
