//! The chaos run: writers, two relay processes and two worker processes
//! under crashes, a zombie relay, broker and database restarts and a
//! faulty network, then a verdict from the database (see `verify`).
//!
//! A test binary of its own: RabbitMQ and Postgres are restarted during
//! the run, and cargo runs test binaries one after another, so no other
//! test sees them go away.
//!
//! Settings (environment):
//! - `OUTBOX_CHAOS_SEED`: replay a run (every failed run prints its seed);
//! - `OUTBOX_CHAOS_SECS` (default 60) and `OUTBOX_CHAOS_TRANSACTIONS`
//!   (default 5,000): the soak is `OUTBOX_CHAOS_SECS=600
//!   OUTBOX_CHAOS_TRANSACTIONS=15000`; the fault cycle repeats every 60 s;
//! - `OUTBOX_CHAOS_SOAK=1`: a soak (see `soak`): faults every few minutes
//!   instead of seconds, one relay and one worker never killed so their
//!   memory can be watched, and a report of RSS and commit -> handled p99
//!   per minute; e.g. `OUTBOX_CHAOS_SOAK=1 OUTBOX_CHAOS_SECS=1800
//!   OUTBOX_CHAOS_TRANSACTIONS=36000`;
//! - `OUTBOX_CHAOS_SERVICE_FAULTS=0`: no broker or database restarts (for
//!   runs beside other tests);
//! - `OUTBOX_CHAOS_KEEP_LOGS=1`: keep the processes' logs of a passing
//!   run too (a failing one always keeps them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod listeners;
mod processes;
mod services;
mod soak;
mod verify;
mod writers;

use std::time::{Duration, Instant};

use diesel::prelude::*;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox::TestDatabase;
use outbox::consumer::ListenerQueues;
use outbox::testing::{Fault, TcpProxy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::processes::{Role, Slot};

/// The worker processes: this test binary started again.
#[test]
#[ignore = "a chaos worker process, started by chaos_run"]
fn worker_process() {
    listeners::run_worker_process();
}

struct Plan {
    seed: u64,
    spread: Duration,
    transactions: usize,
    writers: usize,
    service_faults: bool,
    soak: bool,
}

impl Plan {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seed = var("OUTBOX_CHAOS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
        Self {
            seed,
            spread: Duration::from_secs(var("OUTBOX_CHAOS_SECS").unwrap_or(60)),
            transactions: var("OUTBOX_CHAOS_TRANSACTIONS").unwrap_or(5_000) as usize,
            writers: 8,
            service_faults: var("OUTBOX_CHAOS_SERVICE_FAULTS") != Some(0),
            soak: var("OUTBOX_CHAOS_SOAK") == Some(1),
        }
    }
}

/// Prints the seed if the run fails, so it can be replayed.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("chaos run FAILED; replay with OUTBOX_CHAOS_SEED={}", self.0);
        }
    }
}

/// Sets the flag when dropped: the writers stop when the test unwinds.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The run's exchange, tap queue and listener queues, deleted at the end
/// (also when the test fails).
struct BrokerNames {
    exchange: String,
    tap: String,
    listeners: Vec<ListenerQueues>,
}

impl BrokerNames {
    fn all_queues(&self) -> Vec<String> {
        let mut queues = vec![self.tap.clone()];
        for listener in &self.listeners {
            queues.extend(listener.all_queues().into_iter().map(str::to_owned));
        }
        queues
    }
}

impl Drop for BrokerNames {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(
            outbox::DEFAULT_AMQP_URL,
            &self.all_queues(),
            std::slice::from_ref(&self.exchange),
        );
    }
}

/// Declares the exchange, the listeners' queues (so nothing published
/// before the workers start is unroutable) and a durable tap queue bound to
/// everything, which counts what the relays published.
async fn declare_broker(names: &BrokerNames, app: &str, seed: u64) {
    let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "chaos setup")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    outbox::consumer::topology::declare(&channel, &names.exchange, app, &listeners::registry(seed))
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            names.tap.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            names.tap.as_str().into(),
            names.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "ok".into()).await;
}

/// Reads the whole tap queue: (messages, distinct event ids).
/// Prints each listener's delivery report; returns the promises broken.
fn print_delivery_reports(
    conn: &mut PgConnection,
    seed: u64,
    writers: &[writers::WriterLog],
    logs: &std::path::Path,
) -> Vec<String> {
    match verify::delivery_reports(conn, seed, writers, logs) {
        Ok(reports) => reports
            .iter()
            .flat_map(|report| {
                eprintln!("chaos seed {seed}: {report}");
                report.broken_promises()
            })
            .collect(),
        Err(e) => {
            eprintln!("chaos seed {seed}: no delivery report: {e}");
            Vec::new()
        }
    }
}

async fn drain_tap(tap: &str) -> (usize, usize) {
    let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "chaos tap")
        .await
        .unwrap();
    let depth = outbox::amqp::queue_depth(&connection, tap)
        .await
        .unwrap()
        .unwrap_or(0) as usize;
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            tap.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..depth {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the tap queue holds what it reported")
            .unwrap()
            .unwrap();
        if let Some(id) = delivery.properties.message_id() {
            ids.insert(id.to_string());
        }
    }
    let _ = connection.close(200, "ok".into()).await;
    (depth, ids.len())
}

/// Runs an observation, reconnecting the test's own connection while a
/// restart or reset breaks it (bounded).
fn observe<T>(
    db: &TestDatabase,
    conn: &mut PgConnection,
    query: impl Fn(&mut PgConnection) -> QueryResult<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match query(conn) {
            Ok(value) => return value,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot observe the database for 60 s: {error}"
                );
                std::thread::sleep(Duration::from_millis(200));
                if let Ok(fresh) = db.connect() {
                    *conn = fresh;
                }
            }
        }
    }
}

/// Records what the SIGKILLed relay `relay_id` still held, and when it died.
fn record_kill_holds(db: &TestDatabase, conn: &mut PgConnection, relay_id: &str) {
    let record = format!(
        "INSERT INTO chaos_kill_holds (relay, seq, killed_at)
         SELECT l.owner, e.seq, clock_timestamp()
           FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
           JOIN outbox_events e ON e.seq = s.seq
          WHERE l.owner = '{relay_id}' AND l.expires_at > now() AND e.published_at IS NULL"
    );
    observe(db, conn, |c| diesel::sql_query(&record).execute(c));
}

/// How long after a fault step relay kills count for the takeover bound.
const CALM_AFTER_FAULT: Duration = Duration::from_secs(4);
/// A dead relay's rows are published by another within this: the chaos
/// relays' lease (2 s) plus room for a loaded 2-core machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(8);

/// The faults of one cycle, at fractions of the cycle.
#[derive(Debug, Clone, Copy)]
enum Step {
    Zombie,
    /// Once calm, SIGKILL a relay while it holds rows: a timed takeover.
    KillRelay,
    Latency,
    AmqpBlackhole,
    PostgresBlackhole,
    ResetLinks,
    /// Every Postgres backend of the run's database but the test's own
    /// terminated from the server side.
    TerminateBackends,
    StopBroker,
    RestartPostgres,
    KillBroker,
}

const CYCLE: [(f64, Step); 10] = [
    (0.08, Step::Zombie),
    (0.18, Step::KillRelay),
    (0.25, Step::Latency),
    (0.35, Step::AmqpBlackhole),
    (0.42, Step::PostgresBlackhole),
    (0.50, Step::ResetLinks),
    (0.53, Step::TerminateBackends),
    (0.58, Step::StopBroker),
    (0.70, Step::RestartPostgres),
    (0.80, Step::KillBroker),
];

struct Chaos {
    relays: Vec<Slot>,
    workers: Vec<Slot>,
    amqp: TcpProxy,
    postgres: TcpProxy,
    rng: StdRng,
    unexpected_exits: Vec<String>,
    relay_rss_broker_down_kib: u64,
    /// Rows each frozen relay held (the marks are audited in the database).
    zombies: Vec<usize>,
    /// When the last fault step ended: relay kills well after it are
    /// timed (takeover bound), kills in a fault's wake are not.
    calm_since: Instant,
    /// Relay kills whose held rows were recorded for the takeover bound.
    timed_kills: usize,
    /// A soak: see `kill_due`.
    soak: bool,
}

impl Chaos {
    /// Restarts any process that died on its own (and notes it).
    fn check_exits(&mut self) {
        for slot in self.relays.iter_mut().chain(self.workers.iter_mut()) {
            if let Some(status) = slot.exited() {
                self.unexpected_exits
                    .push(format!("{} exited with {status}", slot.id));
                slot.kill_and_restart();
            }
        }
    }

    fn sample_relay_rss(&mut self) {
        for relay in &self.relays {
            if let Some(rss) = relay.rss_kib() {
                self.relay_rss_broker_down_kib = self.relay_rss_broker_down_kib.max(rss);
            }
        }
    }

    /// Holds a fault for `duration` while processes keep being checked.
    async fn hold(&mut self, duration: Duration, sample_rss: bool) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if sample_rss {
                self.sample_relay_rss();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run_step(&mut self, step: Step, db: &TestDatabase, conn: &mut PgConnection, services: bool) {
        eprintln!("chaos: {step:?}");
        self.run_fault(step, db, conn, services).await;
        self.calm_since = Instant::now();
    }

    async fn run_fault(&mut self, step: Step, db: &TestDatabase, conn: &mut PgConnection, services: bool) {
        match step {
            Step::Zombie => self.make_zombie(db, conn).await,
            Step::Latency => {
                self.amqp.set_fault(Fault::Latency(Duration::from_millis(30)));
                self.postgres.set_fault(Fault::Latency(Duration::from_millis(10)));
                self.hold(Duration::from_secs(3), false).await;
                self.amqp.heal();
                self.postgres.heal();
            }
            Step::AmqpBlackhole => {
                self.amqp.set_fault(Fault::Blackhole);
                self.hold(Duration::from_secs(3), false).await;
                self.amqp.heal();
            }
            Step::PostgresBlackhole => {
                self.postgres.set_fault(Fault::Blackhole);
                self.hold(Duration::from_secs(3), false).await;
                self.postgres.heal();
            }
            Step::ResetLinks => {
                self.amqp.cut(false);
                self.postgres.cut(false);
            }
            Step::TerminateBackends => {
                let terminated = observe(db, conn, |c| {
                    verify::try_count(
                        c,
                        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
                          WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    )
                });
                eprintln!("chaos: {terminated} backends terminated");
            }
            Step::StopBroker if services => {
                services::stop_rabbitmq_app();
                self.hold(Duration::from_secs(4), true).await;
                services::start_rabbitmq_app();
                services::wait_for_rabbitmq(Duration::from_secs(60)).await;
            }
            Step::RestartPostgres if services => services::restart_postgres().await,
            Step::KillBroker if services => {
                services::kill_rabbitmq_node().await;
                self.hold(Duration::from_secs(2), true).await;
                services::start_rabbitmq_node();
                self.hold(Duration::from_secs(2), true).await;
                services::wait_for_rabbitmq(Duration::from_secs(120)).await;
            }
            Step::KillRelay => self.kill_relay_holding_rows(db, conn).await,
            Step::StopBroker | Step::RestartPostgres | Step::KillBroker => {}
        }
    }

    /// Waits until the last fault is [`CALM_AFTER_FAULT`] behind, then
    /// SIGKILLs relay 1 as soon as it holds rows (within 10 s) and records
    /// them for the takeover bound.
    async fn kill_relay_holding_rows(&mut self, db: &TestDatabase, conn: &mut PgConnection) {
        if let Some(wait) = (self.calm_since + CALM_AFTER_FAULT).checked_duration_since(Instant::now()) {
            self.hold(wait, false).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let relay_id = self.relays[1].id.clone();
            let held = observe(db, conn, |c| {
                verify::try_count(
                    c,
                    &format!(
                        "SELECT count(*) AS n FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
                           JOIN outbox_events e ON e.seq = s.seq
                          WHERE l.owner = '{relay_id}' AND l.expires_at > now() AND e.published_at IS NULL"
                    ),
                )
            });
            if held > 0 {
                self.relays[1].kill_and_restart();
                record_kill_holds(db, conn, &relay_id);
                self.timed_kills += 1;
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!("chaos: relay 1 held no rows for 10 s; no timed kill this cycle");
    }

    /// SIGSTOPs relay 0 while it holds a lease, waits until the other relay
    /// has published those rows (the lease expired), then resumes it.
    async fn make_zombie(&mut self, db: &TestDatabase, conn: &mut PgConnection) {
        #[derive(QueryableByName)]
        struct Seq {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            seq: i64,
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let relay_id = self.relays[0].id.clone();
            let held_sql = format!(
                "SELECT e.seq FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
                   JOIN outbox_events e ON e.seq = s.seq
                  WHERE l.owner = '{relay_id}' AND e.published_at IS NULL"
            );
            let busy = !observe(db, conn, |c| diesel::sql_query(&held_sql).load::<Seq>(c)).is_empty();
            if !busy {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            self.relays[0].freeze(true);
            let hold_sql = format!(
                "INSERT INTO chaos_zombie_holds (relay, seq, expires_at)
                 SELECT l.owner, e.seq, l.expires_at
                   FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
                   JOIN outbox_events e ON e.seq = s.seq
                  WHERE l.owner = '{relay_id}' AND e.published_at IS NULL
                 RETURNING seq"
            );
            let held: Vec<i64> = observe(db, conn, |c| diesel::sql_query(&hold_sql).load::<Seq>(c))
                .into_iter()
                .map(|s| s.seq)
                .collect();
            if held.is_empty() {
                self.relays[0].freeze(false);
                continue;
            }
            let list = held.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let pending = format!(
                "SELECT count(*) AS n FROM outbox_events WHERE seq IN ({list}) AND published_at IS NULL"
            );
            let until = Instant::now() + Duration::from_secs(60);
            while observe(db, conn, |c| verify::try_count(c, &pending)) > 0 {
                assert!(
                    Instant::now() < until,
                    "rows of the frozen relay not taken over within 60 s"
                );
                self.check_exits();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.relays[0].freeze(false);
            eprintln!(
                "chaos: relay {relay_id} frozen past its lease holding {} rows, resumed",
                held.len()
            );
            self.zombies.push(held.len());
            return;
        }
        eprintln!("chaos: relay 0 held no lease for 15 s; no zombie this cycle");
    }

    /// SIGKILLs (and restarts) every process whose time has come; each
    /// slot draws its next kill from its own range: relays every 2 to 8 s,
    /// workers every 3 to 6 s. A soak kills only the second relay and
    /// worker, every 1 to 3 minutes: the first ones live the whole run, so
    /// their memory over time means something.
    fn kill_due(
        &mut self,
        relay_kills: &mut [Instant],
        worker_kills: &mut [Instant],
        db: &TestDatabase,
        conn: &mut PgConnection,
    ) {
        let now = Instant::now();
        // Past a fault's aftermath (reconnect backoff up to 30 s is not
        // what the takeover bound is about).
        let calm = self.calm_since.elapsed() > CALM_AFTER_FAULT;
        let survivors = usize::from(self.soak);
        let (relay_every, worker_every) = if self.soak {
            (60_000..180_000, 60_000..180_000)
        } else {
            (2000..8000, 3000..6000)
        };
        for (slot, due) in self.relays.iter_mut().zip(relay_kills.iter_mut()).skip(survivors) {
            if now >= *due {
                let killed_id = slot.id.clone();
                slot.kill_and_restart();
                if calm {
                    record_kill_holds(db, conn, &killed_id);
                    self.timed_kills += 1;
                }
                *due = now + Duration::from_millis(self.rng.random_range(relay_every.clone()));
            }
        }
        for (slot, due) in self
            .workers
            .iter_mut()
            .zip(worker_kills.iter_mut())
            .skip(survivors)
        {
            if now >= *due {
                slot.kill_and_restart();
                *due = now + Duration::from_millis(self.rng.random_range(worker_every.clone()));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run() {
    let plan = Plan::from_env();
    let _seed = SeedOnFailure(plan.seed);
    // Dropped last: the services are up again whatever happens below.
    let _restore = services::RestoreServices;
    eprintln!(
        "chaos seed {} ({} transactions over {:?}, service faults {})",
        plan.seed, plan.transactions, plan.spread, plan.service_faults
    );
    services::wait_for_rabbitmq(Duration::from_secs(60)).await;
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    writers::create_tables(&mut conn);
    verify::install_mark_log(&mut conn);

    let id = uuid::Uuid::now_v7().simple().to_string();
    let app = format!("outbox_test_chaos_{}", &id[20..]);
    let names = BrokerNames {
        exchange: format!("outbox_test.chaos.{id}"),
        tap: format!("outbox_test.chaos.{id}.tap"),
        listeners: outbox::consumer::topology::plan(&app, &listeners::registry(plan.seed)).unwrap(),
    };
    declare_broker(&names, &app, plan.seed).await;

    let amqp = TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let postgres = TcpProxy::start("127.0.0.1:5432").await.unwrap();
    let logs = std::env::temp_dir().join(format!("outbox-chaos-{id}"));
    std::fs::create_dir_all(&logs).unwrap();
    let relay = Role::Relay {
        database_url: postgres.postgres_url(db.name()),
        amqp_url: amqp.amqp_url(),
        exchange: names.exchange.clone(),
    };
    let worker = Role::Worker {
        spec: serde_json::json!({
            "database_url": postgres.postgres_url(db.name()),
            "amqp_url": amqp.amqp_url(),
            "exchange": names.exchange,
            "app": app,
            "seed": plan.seed,
        }),
    };
    let mut chaos = Chaos {
        relays: vec![
            Slot::start("chaos-relay-a", relay.clone(), logs.clone()),
            Slot::start("chaos-relay-b", relay, logs.clone()),
        ],
        workers: vec![
            Slot::start("chaos-worker-a", worker.clone(), logs.clone()),
            Slot::start("chaos-worker-b", worker, logs.clone()),
        ],
        amqp,
        postgres,
        rng: StdRng::seed_from_u64(plan.seed),
        unexpected_exits: Vec::new(),
        relay_rss_broker_down_kib: 0,
        zombies: Vec::new(),
        // The start counts as calm.
        calm_since: Instant::now()
            .checked_sub(CALM_AFTER_FAULT)
            .unwrap_or_else(Instant::now),
        timed_kills: 0,
        soak: plan.soak,
    };
    let mut memory = soak::MemorySampler::new(Duration::from_secs(30));

    // Writers on the blocking pool, each with its own share and seed; they
    // stop early if the test fails (the runtime waits for them otherwise).
    let stop_writers = StopOnDrop(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let started = Instant::now();
    let writer_tasks: Vec<_> = (0..plan.writers)
        .map(|w| {
            let url = db.url().to_owned();
            let share = plan.transactions / plan.writers + usize::from(w < plan.transactions % plan.writers);
            let (seed, spread) = (plan.seed.wrapping_add(w as u64 + 1), plan.spread);
            let stop = std::sync::Arc::clone(&stop_writers.0);
            tokio::task::spawn_blocking(move || writers::run_writer(&url, seed, share, spread, &stop))
        })
        .collect();

    // Faults while the writers write.
    // A soak's cycle is 10 minutes: one fault a minute or so.
    let cycle = Duration::from_secs(if plan.soak { 600 } else { 60 }).min(plan.spread);
    let cycles = plan.spread.as_secs_f64() / cycle.as_secs_f64();
    let mut schedule: std::collections::VecDeque<(Duration, Step)> = (0..cycles.ceil() as u32)
        .flat_map(|c| {
            CYCLE
                .iter()
                .map(move |&(at, step)| (cycle * c + cycle.mul_f64(at), step))
        })
        .filter(|(at, _)| *at < plan.spread)
        .collect();
    let mut relay_kills: Vec<Instant> = (0..chaos.relays.len())
        .map(|_| started + Duration::from_millis(chaos.rng.random_range(2000..8000)))
        .collect();
    let mut worker_kills: Vec<Instant> = (0..chaos.workers.len())
        .map(|_| started + Duration::from_millis(chaos.rng.random_range(3000..6000)))
        .collect();
    while writer_tasks.iter().any(|t| !t.is_finished()) {
        if schedule.front().is_some_and(|(at, _)| started.elapsed() >= *at)
            && let Some((_, step)) = schedule.pop_front()
        {
            chaos.run_step(step, &db, &mut conn, plan.service_faults).await;
            if matches!(step, Step::Zombie) {
                // Leave the resumed zombie alive long enough to try marking
                // what it held: the trigger would catch a mark that got through.
                relay_kills[0] = Instant::now() + Duration::from_secs(3);
            }
        }
        chaos.kill_due(&mut relay_kills, &mut worker_kills, &db, &mut conn);
        chaos.check_exits();
        memory.sample(&chaos.relays[0], &chaos.workers[0]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was outstanding when the writers stopped: stuck unless drained.
    let outstanding_at_stop = observe(&db, &mut conn, verify::outstanding);
    let mut logs_of_writers = Vec::new();
    for task in writer_tasks {
        logs_of_writers.push(task.await.unwrap());
    }
    let writing = started.elapsed();

    // Faults stop; the pipeline drains (bounded).
    chaos.amqp.heal();
    chaos.postgres.heal();
    let drain_started = Instant::now();
    // Bounded by progress: the backlog must shrink at least every 90 s
    // (a soak leaves a long one), and everything is over within 30 min.
    let give_up = drain_started + Duration::from_secs(1800);
    let (mut best, mut last_progress) = (i64::MAX, Instant::now());
    let mut next_report = Instant::now() + Duration::from_secs(15);
    loop {
        chaos.check_exits();
        let left = observe(&db, &mut conn, verify::outstanding);
        if left == 0 {
            break;
        }
        if left < best {
            (best, last_progress) = (left, Instant::now());
        }
        let stalled = last_progress.elapsed() >= Duration::from_secs(90) || Instant::now() >= give_up;
        if stalled || Instant::now() >= next_report {
            // Where the backlog is: the database's view and the broker's.
            let backlog = observe(&db, &mut conn, verify::backlog);
            let queues = tokio::task::spawn_blocking({
                let app = app.clone();
                move || services::queue_report(&app)
            })
            .await
            .unwrap_or_default();
            eprintln!(
                "chaos: draining for {:.0?}: {left} outstanding: {backlog}; queues: {queues}",
                drain_started.elapsed()
            );
            next_report = Instant::now() + Duration::from_secs(15);
            if stalled {
                print_delivery_reports(&mut conn, plan.seed, &logs_of_writers, &logs);
            }
            assert!(
                !stalled,
                "pipeline stopped draining {:?} after the faults stopped: {left} outstanding ({backlog}); queues: {queues}; logs in {}",
                drain_started.elapsed(),
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = drain_started.elapsed();
    let (relay_kills, worker_kills) = (
        chaos.relays.iter().map(|s| s.kills).sum::<u32>(),
        chaos.workers.iter().map(|s| s.kills).sum::<u32>(),
    );
    let unexpected = std::mem::take(&mut chaos.unexpected_exits);
    let rss = chaos.relay_rss_broker_down_kib;
    let zombies = std::mem::take(&mut chaos.zombies);
    let timed_kills = chaos.timed_kills;
    drop(chaos);

    // The report first, so a run that breaks a promise prints it too.
    let broken = print_delivery_reports(&mut conn, plan.seed, &logs_of_writers, &logs);
    if plan.soak {
        let minutes = observe(&db, &mut conn, |c| soak::per_minute(c, listeners::ORDERED));
        eprintln!("{}", soak::report(&memory, &minutes, outstanding_at_stop, drain));
    }
    let figures = verify::verify(&mut conn, plan.seed, &logs_of_writers);
    assert!(broken.is_empty(), "broken promises: {broken:?}");
    if plan.soak {
        let growth = memory.growth();
        assert!(growth.is_empty(), "memory grew during the soak: {growth:?}");
    }
    let takeover = verify::takeover_after_kills(&mut conn);
    eprintln!(
        "chaos: {timed_kills} relay SIGKILLs away from other faults (writers waking the relays on every commit): \
         {} rows held, all published at most {:.2} s after their relay's death (lease 2 s)",
        takeover.rows, takeover.worst_seconds
    );
    assert!(
        takeover.worst_seconds <= TAKEOVER_BOUND.as_secs_f64(),
        "a dead relay's rows waited {:.2} s (bound {TAKEOVER_BOUND:?})",
        takeover.worst_seconds
    );
    let zombie_rows: usize = zombies.iter().sum();
    let (published, distinct) = drain_tap(&names.tap).await;
    let transactions: usize = logs_of_writers.iter().map(|l| l.transactions).sum();
    let rolled_back: usize = logs_of_writers.iter().map(|l| l.rolled_back.len()).sum();
    let killed: usize = logs_of_writers.iter().map(|l| l.killed.len()).sum();
    let in_doubt: usize = logs_of_writers.iter().map(|l| l.in_doubt.len()).sum();
    eprintln!(
        "chaos seed {}: {transactions} transactions in {writing:.1?}; {} events committed ({} of the {in_doubt} in-doubt ones), \
         {rolled_back} rolled back, {killed} killed; {relay_kills} relay and {worker_kills} worker SIGKILLs; \
         drained {drain:.1?} after the faults stopped; {published} messages published for {distinct} events \
         ({} duplicate deliveries, {:.2}%); {} permanent failures in failed_jobs, {} events retried after transient failures; \
         relay peak RSS while the broker was down {} KiB; {} zombie relays holding {zombie_rows} rows marked none of them",
        plan.seed,
        figures.committed,
        figures.in_doubt_committed,
        published - distinct,
        100.0 * (published - distinct) as f64 / distinct.max(1) as f64,
        figures.permanent_failures,
        figures.transient_retried,
        rss,
        zombies.len()
    );
    assert_eq!(
        distinct, figures.committed,
        "the tap queue saw every committed event"
    );
    assert!(
        unexpected.is_empty(),
        "processes exited on their own: {unexpected:?}"
    );
    assert!(
        rss < 100 * 1024,
        "a relay grew to {rss} KiB while the broker was down"
    );
    // Kept on failure (the panic names the folder), or when asked.
    if std::env::var_os("OUTBOX_CHAOS_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&logs);
    } else {
        eprintln!("chaos: logs kept in {}", logs.display());
    }
    drop(names);
}
