//! Steady traffic and what the listeners saw: a writer recording
//! `counter.ticked` events at a fixed pace, an inbox listener writing one
//! effect row per event, an ordered listener (single active consumer, no
//! inbox) keeping every delivery, and the figures of a failover window.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Text, Timestamptz, Uuid as SqlUuid};
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::testing::Ticked;
use uuid::Uuid;

/// Counters the writer spreads its events over.
pub const AGGREGATES: usize = 10;

/// The table the inbox listener writes its effects to.
pub const EFFECTS_TABLE: &str = "CREATE TABLE effects (
    event_id UUID NOT NULL,
    aggregate TEXT NOT NULL,
    n BIGINT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
)";

/// Records one effect row per event, in the inbox transaction: a second
/// row for an event would be an effect applied twice.
pub struct Audit;

impl QueuedListener for Audit {
    fn name(&self) -> &str {
        "audit"
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tick: Ticked = event.data_as()?;
        diesel::sql_query("INSERT INTO effects (event_id, aggregate, n) VALUES ($1, $2, $3)")
            .bind::<SqlUuid, _>(event.event_id)
            .bind::<Text, _>(&tick.aggregate)
            .bind::<BigInt, _>(tick.n)
            .execute(ctx.conn()?)?;
        Ok(())
    }
}

pub fn audit_options() -> ListenerOptions {
    ListenerOptions {
        timeout: Duration::from_secs(10),
        ..ListenerOptions::default().retries(3, &[Duration::from_millis(200), Duration::from_millis(400)])
    }
}

/// One delivery the ordered listener got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event_id: Uuid,
    pub aggregate: String,
    pub n: i64,
    pub at: DateTime<Utc>,
}

/// Keeps every delivery, duplicates included, in arrival order.
#[derive(Clone, Default)]
pub struct Ordered {
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
}

impl QueuedListener for Ordered {
    fn name(&self) -> &str {
        "ordered"
    }

    fn handle(&self, event: &ReceivedEvent, _ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tick: Ticked = event.data_as()?;
        if let Ok(mut deliveries) = self.deliveries.lock() {
            deliveries.push(Delivery {
                event_id: event.event_id,
                aggregate: tick.aggregate,
                n: tick.n,
                at: Utc::now(),
            });
        }
        Ok(())
    }
}

pub fn ordered_options() -> ListenerOptions {
    ListenerOptions {
        single_active_consumer: true,
        concurrency: 1,
        inbox: false,
        batch_size: 1,
        timeout: Duration::from_secs(10),
        ..ListenerOptions::default().retries(1, &[Duration::from_millis(200)])
    }
}

impl Ordered {
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.deliveries.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Records ticks of counters `a0`..`a9` in turn, one transaction each,
/// every `pace`, until stopped (or dropped). A failed transaction (the
/// database restarted) is not retried: the writer reconnects and goes on
/// with the next tick, so the ticks committed are what the database says.
pub struct Writer {
    stop: Arc<AtomicBool>,
    recorded: Arc<AtomicU64>,
    /// The ids of the events whose commit the writer saw succeed.
    pub acknowledged: Arc<Mutex<Vec<Uuid>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(database_url: &str, pace: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::new(AtomicU64::new(0));
        let url = database_url.to_owned();
        let mut conn = Some(outbox::connect(&url).unwrap());
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&recorded));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::clone(&acknowledged);
        let thread = std::thread::spawn(move || {
            let mut next = std::time::Instant::now();
            let mut i: i64 = 0;
            while !flag.load(Ordering::SeqCst) {
                if conn.is_none() {
                    conn = outbox::connect(&url).ok();
                }
                if let Some(open) = conn.as_mut() {
                    let tick = Ticked {
                        aggregate: format!("a{}", i % AGGREGATES as i64),
                        n: i / AGGREGATES as i64,
                    };
                    match open.transaction::<_, outbox::Error, _>(|conn| outbox::record(conn, &tick)) {
                        Ok(event_id) => {
                            count.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut acked) = acked.lock() {
                                acked.push(event_id);
                            }
                        }
                        Err(error) => {
                            eprintln!("writer: {}; reconnecting", outbox::error_chain(&error));
                            conn = None;
                        }
                    }
                    i += 1;
                }
                // A fixed pace, not a wait for a condition.
                next += pace;
                if let Some(rest) = next.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(rest);
                }
            }
        });
        Self {
            stop,
            recorded,
            acknowledged,
            thread: Some(thread),
        }
    }

    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::SeqCst)
    }

    /// Stops and waits for the thread; returns how many it recorded.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.recorded()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(QueryableByName)]
struct Float {
    #[diesel(sql_type = Double)]
    v: f64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn float(conn: &mut PgConnection, sql: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    diesel::sql_query(sql)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .get_result::<Float>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .v
}

/// Committed events older than `age` with no effect yet.
pub fn undelivered_older_than(conn: &mut PgConnection, age: Duration) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM outbox_events e
         WHERE e.recorded_at < clock_timestamp() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM effects f WHERE f.event_id = e.event_id)",
    )
    .bind::<Double, _>(age.as_secs_f64())
    .get_result::<Count>(conn)
    .map(|c| c.n)
    .unwrap_or(i64::MAX)
}

/// Rows the relay had to publish again (a publish not confirmed).
pub fn republished(conn: &mut PgConnection) -> i64 {
    outbox::testing::count(conn, "SELECT count(*) AS n FROM outbox_events WHERE attempts > 0")
}

/// What one failover cost.
#[derive(Debug)]
pub struct Figures {
    pub phase: String,
    /// Events recorded from the fault until delivery was back.
    pub events: i64,
    /// Longest time between two consecutive deliveries (effects) around
    /// the fault.
    pub longest_gap_ms: f64,
    /// Commit to effect of the events recorded in the window.
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Deliveries at the listener without an inbox of an event it had
    /// already seen, arriving in the window.
    pub duplicates: usize,
    /// Rows published again (unconfirmed at the fault).
    pub republished: i64,
    /// The window: from the fault until every event recorded up to a
    /// second before was delivered (at least 2 s; for the rolling restart,
    /// the whole restart).
    pub window_ms: f64,
}

/// The figures of the window `[fault, recovered]`.
pub fn figures(
    conn: &mut PgConnection,
    phase: &str,
    fault: DateTime<Utc>,
    recovered: DateTime<Utc>,
    ordered: &[Delivery],
    republished_rows: i64,
) -> Figures {
    let margin = chrono::Duration::seconds(1);
    let longest_gap_ms = float(
        conn,
        "SELECT COALESCE(EXTRACT(EPOCH FROM max(at - prev)) * 1000, 0)::float8 AS v
         FROM (SELECT at, lag(at) OVER (ORDER BY at) AS prev FROM effects WHERE at BETWEEN $1 AND $2) g",
        fault - margin,
        recovered + margin,
    );
    let latency = |conn: &mut PgConnection, aggregate: &str| {
        float(
            conn,
            &format!(
                "SELECT COALESCE({aggregate}, 0)::float8 AS v FROM outbox_events e JOIN effects f USING (event_id)
                 WHERE e.recorded_at BETWEEN $1 AND $2"
            ),
            fault,
            recovered,
        )
    };
    let p99_ms = latency(
        conn,
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM f.at - e.recorded_at) * 1000)",
    );
    let max_ms = latency(conn, "max(EXTRACT(EPOCH FROM f.at - e.recorded_at) * 1000)");
    let events = float(
        conn,
        "SELECT count(*)::float8 AS v FROM outbox_events WHERE recorded_at BETWEEN $1 AND $2",
        fault,
        recovered,
    ) as i64;
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let until = recovered + chrono::Duration::seconds(5);
    for delivery in ordered {
        if !seen.insert(delivery.event_id) && delivery.at >= fault && delivery.at <= until {
            duplicates += 1;
        }
    }
    Figures {
        phase: phase.to_owned(),
        events,
        longest_gap_ms,
        p99_ms,
        max_ms,
        duplicates,
        republished: republished_rows,
        window_ms: (recovered - fault).num_milliseconds() as f64,
    }
}

pub fn print_figures(all: &[Figures]) {
    println!(
        "{:<42} {:>7} {:>12} {:>9} {:>9} {:>10} {:>11} {:>11}",
        "phase", "events", "longest gap", "p99", "max", "window", "duplicates", "republished"
    );
    for f in all {
        println!(
            "{:<42} {:>7} {:>9.0} ms {:>6.0} ms {:>6.0} ms {:>7.0} ms {:>11} {:>11}",
            f.phase, f.events, f.longest_gap_ms, f.p99_ms, f.max_ms, f.window_ms, f.duplicates, f.republished
        );
    }
}

#[derive(QueryableByName)]
struct Tick {
    #[diesel(sql_type = Text)]
    aggregate: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Per counter, its committed ticks in commit (seq) order.
pub fn committed_order(conn: &mut PgConnection) -> HashMap<String, Vec<i64>> {
    let rows: Vec<Tick> = diesel::sql_query(
        "SELECT aggregate_id AS aggregate, (payload->>'n')::bigint AS n FROM outbox_events ORDER BY seq",
    )
    .load(conn)
    .unwrap();
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for row in rows {
        order.entry(row.aggregate).or_default().push(row.n);
    }
    order
}

/// Per counter, the ticks in the order they first arrived.
pub fn first_arrival_order(deliveries: &[Delivery]) -> HashMap<String, Vec<i64>> {
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for delivery in deliveries {
        if seen.insert(delivery.event_id) {
            order
                .entry(delivery.aggregate.clone())
                .or_default()
                .push(delivery.n);
        }
    }
    order
}

/// The median and the 99th percentile of commit-to-effect latency, in
/// milliseconds, of the events recorded in `[from, to]`.
pub fn latency_percentiles(conn: &mut PgConnection, from: DateTime<Utc>, to: DateTime<Utc>) -> (f64, f64) {
    let percentile = |conn: &mut PgConnection, p: f64| {
        float(
            conn,
            &format!(
                "SELECT COALESCE(percentile_cont({p}) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM f.at - e.recorded_at) * 1000), 0)::float8 AS v
                 FROM outbox_events e JOIN effects f USING (event_id) WHERE e.recorded_at BETWEEN $1 AND $2"
            ),
            from,
            to,
        )
    };
    (percentile(conn, 0.5), percentile(conn, 0.99))
}
