//! Steady CHOM traffic and what the listeners saw: a writer driving site
//! lifecycles through CHOM's services at a fixed pace (`site.created`,
//! now and then `site.provisioning_failed`, `site.provisioned`,
//! `backup.created`, `backup.completed`, `site.deleted`), the listeners
//! `chom work` runs (RecordAuditLog, SendNotification and the two
//! projections), two probes of the test's own beside them, and the
//! figures of a failover window.
//!
//! The probes see what CHOM's own tables cannot show: CHOM's effects have
//! unique backstops (an audit row per event id, a notification per event
//! and member), which would hide a second delivery the inbox let through.
//! [`Effects`] writes one unconstrained row per event in the inbox
//! transaction, so a second row is an effect applied twice; [`Ordered`]
//! (single active consumer, no inbox) keeps every delivery, duplicates
//! included, for the per-aggregate order and the duplicate count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chom::events::EVENT_TYPES;
use chom::listeners::ListenerConfig;
use chom::services::{backups, sites, tenants};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Text, Timestamptz, Uuid as SqlUuid};
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};
use outbox::testing::{DeliveryReport, RunRecord};
use outbox::{Metadata, Outbox, Registry};
use uuid::Uuid;

/// Sites the writer keeps going at once, one step of one of them a tick.
pub const SITES: usize = 10;

/// The probes' table, created beside CHOM's.
pub const EFFECTS_TABLE: &str = "CREATE TABLE effects (
    event_id UUID NOT NULL,
    aggregate TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
)";

/// `<aggregate_type>:<aggregate_id>`, the unit of ordering.
fn aggregate_of(event: &ReceivedEvent) -> String {
    format!("{}:{}", event.aggregate_type, event.aggregate_id)
}

/// CHOM's registry (retries in milliseconds, as `chom demo` has them)
/// with the two probes on every CHOM event type.
pub fn registry(ordered: &Ordered) -> Registry {
    let config = ListenerConfig {
        retries: Some((3, vec![Duration::from_millis(200), Duration::from_millis(400)])),
        concurrency: Some(2),
        ..ListenerConfig::default()
    };
    chom::listeners::registry(&config)
        .and_then(|registry| registry.queued_listener_with(&EVENT_TYPES, Effects, effects_options()))
        .and_then(|registry| registry.queued_listener_with(&EVENT_TYPES, ordered.clone(), ordered_options()))
        .expect("the cluster test's listeners register")
}

/// Writes one effect row per event, in the inbox transaction.
pub struct Effects;

impl QueuedListener for Effects {
    fn name(&self) -> &str {
        "effects"
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        diesel::sql_query("INSERT INTO effects (event_id, aggregate) VALUES ($1, $2)")
            .bind::<SqlUuid, _>(event.event_id)
            .bind::<Text, _>(aggregate_of(event))
            .execute(ctx.conn()?)?;
        Ok(())
    }
}

fn effects_options() -> ListenerOptions {
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
        if let Ok(mut deliveries) = self.deliveries.lock() {
            deliveries.push(Delivery {
                event_id: event.event_id,
                aggregate: aggregate_of(event),
                at: Utc::now(),
            });
        }
        Ok(())
    }
}

fn ordered_options() -> ListenerOptions {
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

/// Where one of the writer's sites is in its lifecycle.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// No site yet: create one.
    New,
    /// Created (or failed to provision): provision it.
    Pending { site: i64, failed_once: bool },
    /// Live with `backups` completed backups: back it up, or delete it
    /// after two.
    Active { site: i64, backups: u32 },
    /// A backup running: complete it.
    BackingUp { site: i64, backup: i64, backups: u32 },
}

/// One writer site: its stage, its tenant and the actor of its requests.
struct Lane {
    stage: Stage,
    tenant: i64,
    actor: String,
}

/// Runs `lane`'s next step, one service transaction; returns the ids of
/// the events it recorded.
fn step(
    outbox: &Outbox,
    conn: &mut PgConnection,
    lane: &mut Lane,
    created: &mut u64,
) -> chom::Result<Vec<Uuid>> {
    let by = || Metadata::by(lane.actor.clone());
    let (next, events) = match lane.stage {
        Stage::New => {
            *created += 1;
            let domain = format!("site{created}.cluster.test");
            let recorded = sites::create_site(outbox, conn, by(), lane.tenant, &domain)?;
            let events = recorded.events().map(|e| e.event_id).collect();
            (
                Stage::Pending {
                    site: recorded.value.id,
                    failed_once: false,
                },
                events,
            )
        }
        Stage::Pending { site, failed_once } => {
            // One site in seven fails its first provisioning (a
            // notification), then succeeds.
            let fail = !failed_once && site % 7 == 3;
            sites::start_provisioning(conn, site)?;
            let outcome = if fail {
                Err("no capacity on the web node pool".to_owned())
            } else {
                Ok(())
            };
            let recorded = sites::provision_site(outbox, conn, Metadata::system(), site, outcome)?;
            let next = if fail {
                Stage::Pending {
                    site,
                    failed_once: true,
                }
            } else {
                Stage::Active { site, backups: 0 }
            };
            (next, recorded.events().map(|e| e.event_id).collect())
        }
        Stage::Active { site, backups } if backups < 2 => {
            let recorded = backups::create_backup(outbox, conn, by(), site)?;
            let next = Stage::BackingUp {
                site,
                backup: recorded.value.id,
                backups,
            };
            (next, recorded.events().map(|e| e.event_id).collect())
        }
        Stage::Active { site, .. } => {
            let recorded = sites::delete_site(outbox, conn, by(), site)?;
            (Stage::New, recorded.events().map(|e| e.event_id).collect())
        }
        Stage::BackingUp {
            site,
            backup,
            backups,
        } => {
            let recorded =
                backups::complete_backup(outbox, conn, Metadata::system(), backup, 50_000_000, 1_200)?;
            let next = Stage::Active {
                site,
                backups: backups + 1,
            };
            (next, recorded.events().map(|e| e.event_id).collect())
        }
    };
    lane.stage = next;
    Ok(events)
}

/// Drives [`SITES`] site lifecycles of two tenants through CHOM's
/// services, one step (one transaction, one event) every `pace`, until
/// stopped (or dropped). A failed transaction (the database restarted)
/// is not retried: the writer reconnects and starts that lane over with a
/// new site, so what committed is what the database says.
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
        let mut first = outbox::connect(&url).unwrap();
        let owners: Vec<(i64, String)> = (0..2)
            .map(|t| {
                let tenant = tenants::create_tenant(&mut first, &format!("Cluster {t}")).unwrap();
                let user =
                    tenants::create_user(&mut first, tenant.id, &format!("owner{t}@cluster.test"), "Owner")
                        .unwrap();
                (tenant.id, format!("user:{}", user.id))
            })
            .collect();
        let mut lanes: Vec<Lane> = owners
            .into_iter()
            .cycle()
            .take(SITES)
            .map(|(tenant, actor)| Lane {
                stage: Stage::New,
                tenant,
                actor,
            })
            .collect();
        let outbox = Outbox::builder()
            .registry(chom::listeners::registry(&ListenerConfig::default()).unwrap())
            .build()
            .unwrap();
        let mut conn = Some(first);
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&recorded));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::clone(&acknowledged);
        let thread = std::thread::spawn(move || {
            let mut next = std::time::Instant::now();
            let (mut turn, mut created) = (0usize, 0u64);
            while !flag.load(Ordering::SeqCst) {
                if conn.is_none() {
                    conn = outbox::connect(&url).ok();
                }
                if let Some(open) = conn.as_mut() {
                    let lane = &mut lanes[turn % SITES];
                    match step(&outbox, open, lane, &mut created) {
                        Ok(events) => {
                            count.fetch_add(events.len() as u64, Ordering::SeqCst);
                            if let Ok(mut acked) = acked.lock() {
                                acked.extend(events);
                            }
                        }
                        // The database went away: reconnect. The lane's site
                        // may be lost with the old primary, or its last step
                        // committed unseen: start the lane over either way.
                        Err(chom::ChomError::Database(error)) => {
                            eprintln!("writer: {error}; reconnecting, lane {} starts over", turn % SITES);
                            lane.stage = Stage::New;
                            conn = None;
                        }
                        // A site lost with the old primary (not found), or
                        // behind its step (its last one committed unseen).
                        Err(error) => {
                            eprintln!("writer: {error}; lane {} starts over", turn % SITES);
                            lane.stage = Stage::New;
                        }
                    }
                    turn += 1;
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

    /// Stops and waits for the thread; returns how many events it saw
    /// committed.
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
struct Committed {
    #[diesel(sql_type = SqlUuid)]
    event_id: Uuid,
    #[diesel(sql_type = Text)]
    aggregate: String,
}

/// Per aggregate, its committed events in commit (seq) order: CHOM's
/// services lock the aggregate's row, so its events commit in turn.
pub fn committed_order(conn: &mut PgConnection) -> HashMap<String, Vec<Uuid>> {
    let rows: Vec<Committed> = diesel::sql_query(
        "SELECT event_id, aggregate_type || ':' || aggregate_id AS aggregate FROM outbox_events ORDER BY seq",
    )
    .load(conn)
    .unwrap();
    let mut order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for row in rows {
        order.entry(row.aggregate).or_default().push(row.event_id);
    }
    order
}

/// Per aggregate, its events in the order they first arrived.
pub fn first_arrival_order(deliveries: &[Delivery]) -> HashMap<String, Vec<Uuid>> {
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<Uuid>> = HashMap::new();
    for delivery in deliveries {
        if seen.insert(delivery.event_id) {
            order
                .entry(delivery.aggregate.clone())
                .or_default()
                .push(delivery.event_id);
        }
    }
    order
}

/// Committed events CHOM's listeners have not all applied yet: an audit
/// row and an activity line each, and a notification of the tenant's
/// owner for each failed provisioning.
pub fn chom_backlog(conn: &mut PgConnection) -> i64 {
    outbox::testing::try_count(
        conn,
        "SELECT (SELECT count(*) FROM outbox_events e
                  WHERE NOT EXISTS (SELECT 1 FROM audit_logs a WHERE a.event_id = e.event_id))
              + (SELECT count(*) FROM outbox_events e
                  WHERE NOT EXISTS (SELECT 1 FROM tenant_activity t WHERE t.event_id = e.event_id))
              + (SELECT count(*) FROM outbox_events e
                  WHERE e.event_type = 'site.provisioning_failed'
                    AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.event_id = e.event_id)) AS n",
    )
    .unwrap_or(i64::MAX)
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

/// The Jepsen-style delivery reports of the two probes: `effects` (inbox:
/// each row an effect) and `ordered` (no inbox, single active consumer:
/// every delivery kept, its first arrivals taken as what it applied).
pub fn delivery_reports(conn: &mut PgConnection, ordered: &Ordered) -> Vec<DeliveryReport> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = SqlUuid)]
        event_id: Uuid,
    }
    let committed: Vec<(Uuid, String)> = diesel::sql_query(
        "SELECT event_id, aggregate_type || ':' || aggregate_id AS aggregate FROM outbox_events ORDER BY seq",
    )
    .load::<Committed>(conn)
    .unwrap()
    .into_iter()
    .map(|c| (c.event_id, c.aggregate))
    .collect();
    let effects: Vec<Uuid> = diesel::sql_query("SELECT event_id FROM effects ORDER BY at")
        .load::<Id>(conn)
        .unwrap()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    let deliveries: Vec<Uuid> = ordered.snapshot().iter().map(|d| d.event_id).collect();
    let mut seen = HashSet::new();
    let first_arrivals: Vec<Uuid> = deliveries.iter().copied().filter(|id| seen.insert(*id)).collect();
    vec![
        DeliveryReport::check(
            "effects",
            &RunRecord {
                committed: committed.clone(),
                deliveries: effects.clone(),
                applied: effects,
                ..RunRecord::default()
            },
        ),
        DeliveryReport::check(
            "ordered",
            &RunRecord {
                committed,
                deliveries,
                applied: first_arrivals,
                ordered: true,
                ..RunRecord::default()
            },
        ),
    ]
}
