//! Writer threads: transactions of 1 to 3 events on hot-skewed aggregates,
//! each event with its domain write (a per-aggregate counter), a random
//! pause before the commit so commits land out of id order, 20% rolled
//! back and 2% killed from the server side before the commit.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// Aggregates the writers spread over (few are hot).
pub const AGGREGATES: usize = 200;

/// What one writer did, by outcome; the database has the last word on
/// `in_doubt` (the connection broke before the commit was acknowledged).
#[derive(Default, Debug)]
pub struct WriterLog {
    pub committed: Vec<Uuid>,
    pub rolled_back: Vec<Uuid>,
    pub killed: Vec<Uuid>,
    pub in_doubt: Vec<Uuid>,
    pub transactions: usize,
    /// The last error a transaction ended with, for the report.
    pub last_error: Option<String>,
}

enum WriteError {
    Rollback,
    Database(diesel::result::Error),
    Outbox(outbox::Error),
}

impl From<diesel::result::Error> for WriteError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

impl From<outbox::Error> for WriteError {
    fn from(error: outbox::Error) -> Self {
        Self::Outbox(error)
    }
}

pub fn aggregate_name(index: usize) -> String {
    format!("agg-{index:03}")
}

/// Creates the domain table (one counter per aggregate) and the effects
/// table the listeners write to.
pub fn create_tables(conn: &mut PgConnection) {
    use diesel::connection::SimpleConnection;
    conn.batch_execute(
        "CREATE TABLE chaos_counters (aggregate text PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
         INSERT INTO chaos_counters (aggregate) SELECT 'agg-' || lpad(i::text, 3, '0') FROM generate_series(0, 199) i;
         -- No unique key on purpose: a doubled effect must be countable.
         CREATE TABLE chaos_effects (id bigserial PRIMARY KEY, listener text NOT NULL, event_id uuid NOT NULL,
                                     aggregate text NOT NULL, n bigint NOT NULL,
                                     at timestamptz NOT NULL DEFAULT clock_timestamp());",
    )
    .expect("chaos tables");
}

fn connect_until(url: &str, deadline: Instant) -> PgConnection {
    loop {
        match PgConnection::establish(url) {
            Ok(conn) => return conn,
            Err(error) => {
                assert!(Instant::now() < deadline, "writer cannot reconnect: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Tick {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs `transactions` transactions spread evenly over `spread`, or fewer
/// if `stop` is set (the test failed and is unwinding).
pub fn run_writer(
    url: &str,
    seed: u64,
    transactions: usize,
    spread: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> WriterLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = WriterLog::default();
    let give_up = Instant::now() + spread + Duration::from_secs(180);
    let mut conn = connect_until(url, give_up);
    let mut admin = connect_until(url, give_up);
    // Every commit wakes the relays: the relay SIGKILLs of the run land in
    // a steady storm of wake-ups.
    let waker = outbox::Outbox::builder()
        .wake_relays(url)
        .build()
        .expect("an outbox that wakes relays");
    let started = Instant::now();
    for i in 0..transactions {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let due = started + spread.mul_f64(i as f64 / transactions as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let events = rng.random_range(1..=3);
        let mut aggregates: Vec<usize> = (0..events)
            .map(|_| (AGGREGATES as f64 * rng.random::<f64>().powi(3)) as usize)
            .collect();
        // Locks in one order: no deadlocks between writers.
        aggregates.sort_unstable();
        let pause = Duration::from_micros(rng.random_range(0..3000));
        let roll = rng.random_range(0..100);
        let (rollback, kill) = (roll < 20, (20..22).contains(&roll));
        let mut ids = Vec::new();
        let result = conn.transaction::<(), WriteError, _>(|conn| {
            for &index in &aggregates {
                let aggregate = aggregate_name(index);
                let tick =
                    diesel::sql_query("UPDATE chaos_counters SET n = n + 1 WHERE aggregate = $1 RETURNING n")
                        .bind::<Text, _>(&aggregate)
                        .get_result::<Tick>(conn)?;
                ids.push(outbox::record(
                    conn,
                    &outbox::testing::Ticked { aggregate, n: tick.n },
                )?);
            }
            std::thread::sleep(pause);
            if rollback {
                return Err(WriteError::Rollback);
            }
            if kill {
                let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result::<Pid>(conn)?;
                // Waits (up to 5 s) until the backend is gone: the COMMIT
                // below cannot reach it.
                let terminated = diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
                    .bind::<Integer, _>(pid.pid)
                    .execute(&mut admin);
                if terminated.is_err() {
                    admin = connect_until(url, give_up);
                }
            }
            Ok(())
        });
        log.transactions += 1;
        match result {
            Ok(()) => {
                waker.wake_relays();
                log.committed.extend(ids);
            }
            Err(WriteError::Rollback) => log.rolled_back.extend(ids),
            Err(error @ (WriteError::Database(_) | WriteError::Outbox(_))) => {
                log.last_error = Some(match error {
                    WriteError::Database(e) => e.to_string(),
                    WriteError::Outbox(e) => e.to_string(),
                    WriteError::Rollback => String::new(),
                });
                if kill {
                    log.killed.extend(ids);
                } else {
                    log.in_doubt.extend(ids);
                }
                conn = connect_until(url, give_up);
            }
        }
    }
    log
}
