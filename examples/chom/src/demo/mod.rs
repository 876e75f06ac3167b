//! `chom demo`: the whole platform in one process, on the real Postgres
//! and RabbitMQ, finishing on its own.
//!
//! 1. Creates the database if it is missing and migrates it.
//! 2. Starts a relay and a worker in this process. Retries are shortened
//!    to milliseconds (3 tries, 200 ms then 400 ms instead of the seed's
//!    30 s / 60 s / 120 s), so the demo takes seconds.
//! 3. Normal traffic: site and backup lifecycles from concurrent writers,
//!    with provisioning and backup failures, then the account events for each tenant
//!    (team changes, certificates and the expiry check, credential and
//!    token rotations, failed sign-ins, quotas met and exceeded: see
//!    [`simulate`]).
//! 4. A notifier outage that outlasts the retries: more lifecycles with
//!    failures while SendNotification's notifier is down; those
//!    notifications end in failed_jobs and the dead-letter queue. Then the
//!    notifier comes back.
//! 5. Waits until every listener has dealt with every event, stops relay
//!    and worker, and reports: events recorded and published, listener
//!    outcomes, audit rows, tenant stats, failed jobs, metrics.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use outbox::{Metadata, Outbox, PgPool, Relay, RelayConfig};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{ChomError, Result};
use crate::listeners::{self, DatabaseNotifier, ListenerConfig, SwitchableNotifier};
use crate::services::{backups, sites};
use crate::simulate::{self, SimulateConfig};
use crate::work::WorkConfig;

mod report;

pub use report::{DemoReport, EventCount, FailedJobLine, ListenerOutcome, TenantStats};
use report::{chom_counters, collect, listener_outcomes};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// CHOM's database (created if missing).
    pub database_url: String,
    /// RabbitMQ.
    pub amqp_url: String,
    /// The exchange.
    pub exchange: String,
    /// Queue prefix.
    pub app: String,
    /// Tenants of the normal traffic. Default 3.
    pub tenants: u32,
    /// Site lifecycles of the normal traffic. Default 24.
    pub sites: u64,
    /// Site lifecycles during the notifier outage. Default 6.
    pub outage_sites: u64,
    /// Probability of a provisioning or backup failure. Default 0.2.
    pub failure_rate: f64,
    /// Seed of the lifecycle mix.
    pub seed: u64,
    /// Longest wait for the listeners to finish. Default 45 s.
    pub settle_timeout: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/chom".into(),
            amqp_url: outbox::DEFAULT_AMQP_URL.into(),
            exchange: outbox::DEFAULT_EXCHANGE.into(),
            app: listeners::APP.into(),
            tenants: 3,
            sites: 24,
            outage_sites: 6,
            failure_rate: 0.2,
            seed: 7,
            settle_timeout: Duration::from_secs(45),
        }
    }
}

/// The demo's retries: 3 tries, 200 ms then 400 ms.
pub fn demo_retries() -> (u32, Vec<Duration>) {
    (3, vec![Duration::from_millis(200), Duration::from_millis(400)])
}

/// Runs the demo. `progress` gets one line per phase.
pub async fn run(config: DemoConfig, progress: impl Fn(&str)) -> Result<DemoReport> {
    let started = Instant::now();
    let url = config.database_url.clone();
    let created = blocking(move || Ok(outbox::create_database_if_missing(&url)?)).await?;
    if created {
        progress(&format!(
            "created the database {}",
            outbox::redact_url(&config.database_url)
        ));
    }
    let url = config.database_url.clone();
    blocking(move || {
        let mut conn = outbox::connect(&url)?;
        crate::migrate(&mut conn)?;
        Ok(())
    })
    .await?;
    let pool = outbox::pool(&config.database_url, 8, Duration::from_secs(10))?;
    let handle = outbox::metrics::install_recorder()?;
    listeners::describe_metrics();

    let (notifier, outage) = SwitchableNotifier::new(DatabaseNotifier);
    let (tries, backoff) = demo_retries();
    let listener_config = ListenerConfig {
        notifier: Arc::new(notifier),
        retries: Some((tries, backoff.clone())),
        concurrency: Some(4),
    };
    let registry = listeners::registry(&listener_config)?;
    let outbox = Outbox::builder()
        .registry(registry.clone())
        .wake_relays(&config.database_url)
        .build()?;
    let retry_policy = format!(
        "demo mode: {tries} tries with {} between them (the seed's default is 3 tries, 30s/60s/120s)",
        backoff
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(" then ")
    );
    progress(&retry_policy);

    let worker = crate::work::worker(&WorkConfig {
        database_url: config.database_url.clone(),
        amqp_url: config.amqp_url.clone(),
        exchange: config.exchange.clone(),
        app: config.app.clone(),
        listeners: listener_config.clone(),
        only: Vec::new(),
        metrics_addr: None,
        shutdown_timeout: Duration::from_secs(10),
        accept_sources: Vec::new(),
        webhooks: None,
        quorum_initial_group_size: None,
    })?;
    let queues = worker.queues();
    // The topology before the relay's first publish: an event no queue is
    // bound to yet would be kept as unroutable instead of delivered.
    worker.declare_topology().await?;
    let relay = Relay::new(RelayConfig {
        database_url: config.database_url.clone(),
        amqp_url: config.amqp_url.clone(),
        exchange: config.exchange.clone(),
        poll_max: Duration::from_millis(50),
        backoff_initial: Duration::from_millis(200),
        app_id: "chom-demo".into(),
        ..RelayConfig::default()
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = |rx: tokio::sync::watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay_task = tokio::spawn({
        let rx = stop_rx.clone();
        async move { relay.run(stop(rx)).await }
    });
    let worker_task = tokio::spawn({
        let rx = stop_rx.clone();
        async move { worker.run(stop(rx)).await }
    });
    progress("relay and worker running in this process");

    let outcome = drive(&config, &pool, &outbox, &outage, &progress).await;
    let settled = match &outcome {
        Ok(ids) => settle(&pool, &config, &queues, ids.clone(), &progress).await,
        Err(_) => false,
    };
    progress("stopping relay and worker");
    let _ = stop_tx.send(true);
    let _ = relay_task.await;
    let _ = worker_task.await;
    let ids = outcome?;

    let rendered = handle.render();
    let mut report = blocking({
        let pool = pool.clone();
        move || collect(&pool, &ids)
    })
    .await?;
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    report.retry_policy = retry_policy;
    report.settled = settled;
    report.listeners = listener_outcomes(&rendered, &report);
    report.metrics = chom_counters(&rendered);
    report.dead_lettered = dead_letter_counts(&config, &queues).await;
    Ok(report)
}

/// The traffic: normal lifecycles, then an outage with guaranteed
/// failures. Returns this run's event ids.
async fn drive(
    config: &DemoConfig,
    pool: &PgPool,
    outbox: &Outbox,
    outage: &listeners::OutageSwitch,
    progress: &impl Fn(&str),
) -> Result<Vec<Uuid>> {
    progress(&format!(
        "normal traffic: {} site lifecycles for {} tenants (failure rate {:.0}%)",
        config.sites,
        config.tenants,
        config.failure_rate * 100.0
    ));
    let normal = simulate_blocking(
        pool,
        outbox,
        SimulateConfig {
            tenants: config.tenants,
            sites: config.sites,
            writers: 4,
            rate: None,
            failure_rate: config.failure_rate,
            seed: config.seed,
            account_events: true,
        },
    )
    .await?;
    let mut ids = normal.event_ids;
    settle_quietly(pool, &ids, Duration::from_secs(20)).await;

    progress(&format!(
        "notifier outage: {} more lifecycles while notifications cannot be sent",
        config.outage_sites
    ));
    outage.down();
    let during = simulate_blocking(
        pool,
        outbox,
        SimulateConfig {
            tenants: 1,
            sites: config.outage_sites,
            writers: 2,
            rate: None,
            failure_rate: 0.5,
            seed: config.seed.wrapping_add(1),
            account_events: false,
        },
    )
    .await?;
    // At least one provisioning failure and one backup failure, whatever
    // the random mix did.
    let tenant = tenant_of(pool, &during.event_ids).await?;
    let forced = blocking({
        let pool = pool.clone();
        let outbox = outbox.clone();
        move || forced_failures(&pool, &outbox, tenant)
    })
    .await?;
    ids.extend(during.event_ids);
    ids.extend(forced);
    // The outage lasts until every notification of it has used up its
    // tries.
    let wanted = notifiable(pool, &ids).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let handled = notification_outcomes(pool, &ids).await?;
        if handled >= wanted || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outage.up();
    progress("notifier back up");
    Ok(ids)
}

fn forced_failures(pool: &PgPool, outbox: &Outbox, tenant: i64) -> Result<Vec<Uuid>> {
    let mut conn = pool.get().map_err(outbox::Error::Pool)?;
    let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
    let mut ids = Vec::new();
    let failing = sites::create_site(
        outbox,
        &mut conn,
        Metadata::by("user:demo"),
        tenant,
        &format!("outage-{tag}.demo.chom.test"),
    )?;
    ids.push(failing.event_id);
    ids.push(
        sites::provision_site(
            outbox,
            &mut conn,
            Metadata::system(),
            failing.value.id,
            Err("certificate issuance timed out".into()),
        )?
        .event_id,
    );
    let site = sites::create_site(
        outbox,
        &mut conn,
        Metadata::by("user:demo"),
        tenant,
        &format!("backup-{tag}.demo.chom.test"),
    )?;
    ids.push(site.event_id);
    ids.push(sites::provision_site(outbox, &mut conn, Metadata::system(), site.value.id, Ok(()))?.event_id);
    let backup = backups::create_backup(outbox, &mut conn, Metadata::system(), site.value.id)?;
    ids.push(backup.event_id);
    ids.push(
        backups::fail_backup(
            outbox,
            &mut conn,
            Metadata::system(),
            backup.value.id,
            "storage bucket unreachable",
        )?
        .event_id,
    );
    Ok(ids)
}

async fn simulate_blocking(
    pool: &PgPool,
    outbox: &Outbox,
    config: SimulateConfig,
) -> Result<simulate::SimulateReport> {
    let (pool, outbox) = (pool.clone(), outbox.clone());
    blocking(move || simulate::run(&pool, &outbox, &config)).await
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(ChomError::invalid("demo", format!("a blocking task failed: {e}"))))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count_ids(conn: &mut PgConnection, sql: &str, ids: &[Uuid]) -> Result<i64> {
    Ok(diesel::sql_query(sql)
        .bind::<Array<SqlUuid>, _>(ids)
        .get_result::<Count>(conn)?
        .n)
}

async fn tenant_of(pool: &PgPool, ids: &[Uuid]) -> Result<i64> {
    let (pool, ids) = (pool.clone(), ids.to_vec());
    blocking(move || {
        let mut conn = pool.get().map_err(outbox::Error::Pool)?;
        count_ids(
            &mut conn,
            "SELECT COALESCE(max(tenant_id::bigint), 0) AS n FROM outbox_events WHERE event_id = ANY($1)",
            &ids,
        )
    })
    .await
}

/// Events of `ids` that SendNotification handles.
fn count_notified(conn: &mut PgConnection, ids: &[Uuid]) -> Result<i64> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS n FROM outbox_events WHERE event_id = ANY($1) AND event_type = ANY($2)",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Array<Text>, _>(&listeners::NOTIFIED_EVENT_TYPES[..])
    .get_result::<Count>(conn)?
    .n)
}

/// Events of the run that SendNotification handles.
async fn notifiable(pool: &PgPool, ids: &[Uuid]) -> Result<i64> {
    let (pool, ids) = (pool.clone(), ids.to_vec());
    blocking(move || {
        let mut conn = pool.get().map_err(outbox::Error::Pool)?;
        count_notified(&mut conn, &ids)
    })
    .await
}

/// Events SendNotification is done with (sent or failed for good).
async fn notification_outcomes(pool: &PgPool, ids: &[Uuid]) -> Result<i64> {
    let (pool, ids) = (pool.clone(), ids.to_vec());
    blocking(move || {
        let mut conn = pool.get().map_err(outbox::Error::Pool)?;
        count_ids(
            &mut conn,
            "SELECT (SELECT count(*) FROM processed_events WHERE listener = 'send_notification' AND event_id = ANY($1))
                  + (SELECT count(*) FROM failed_jobs WHERE listener = 'send_notification' AND event_id = ANY($1)) AS n",
            &ids,
        )
    })
    .await
}

/// Whether the inbox listeners are done with every event of `ids`.
fn inbox_listeners_done(conn: &mut PgConnection, ids: &[Uuid]) -> Result<bool> {
    let unpublished = count_ids(
        conn,
        "SELECT count(*) AS n FROM outbox_events WHERE event_id = ANY($1) AND published_at IS NULL",
        ids,
    )?;
    let audited = count_ids(
        conn,
        "SELECT (SELECT count(*) FROM processed_events WHERE listener = 'record_audit_log' AND event_id = ANY($1))
              + (SELECT count(*) FROM failed_jobs WHERE listener = 'record_audit_log' AND event_id = ANY($1)) AS n",
        ids,
    )?;
    let notify_wanted = count_notified(conn, ids)?;
    let notified = count_ids(
        conn,
        "SELECT (SELECT count(*) FROM processed_events WHERE listener = 'send_notification' AND event_id = ANY($1))
              + (SELECT count(*) FROM failed_jobs WHERE listener = 'send_notification' AND event_id = ANY($1)) AS n",
        ids,
    )?;
    Ok(unpublished == 0 && audited == ids.len() as i64 && notified == notify_wanted)
}

/// Waits (at most `limit`) for the inbox listeners, without reporting.
async fn settle_quietly(pool: &PgPool, ids: &[Uuid], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let (pool, ids) = (pool.clone(), ids.to_vec());
        let done = blocking(move || {
            let mut conn = pool.get().map_err(outbox::Error::Pool)?;
            inbox_listeners_done(&mut conn, &ids)
        })
        .await
        .unwrap_or(false);
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every listener is done with every event: the inbox
/// listeners by their rows, UpdateTenantMetrics by its queues staying
/// empty.
async fn settle(
    pool: &PgPool,
    config: &DemoConfig,
    queues: &[outbox::consumer::ListenerQueues],
    ids: Vec<Uuid>,
    progress: &impl Fn(&str),
) -> bool {
    progress("waiting for the listeners to finish");
    let deadline = Instant::now() + config.settle_timeout;
    settle_quietly(pool, &ids, config.settle_timeout).await;
    let mut quiet = 0;
    while Instant::now() < deadline {
        let mut ready = 0;
        for listener in queues {
            for queue in std::iter::once(&listener.queue).chain(listener.retries.iter().map(|(_, q)| q)) {
                ready += queue_depth(config, queue).await.unwrap_or(1);
            }
        }
        quiet = if ready == 0 { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    false
}

async fn queue_depth(config: &DemoConfig, queue: &str) -> Option<u32> {
    use lapin::options::QueueDeclareOptions;
    let connection = outbox::amqp::connect(&config.amqp_url, "chom demo").await.ok()?;
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok();
    let _ = connection.close(200, "checked".into()).await;
    declared.map(|q| q.message_count())
}

async fn dead_letter_counts(
    config: &DemoConfig,
    queues: &[outbox::consumer::ListenerQueues],
) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for listener in queues {
        if let Some(depth) = queue_depth(config, &listener.dead).await {
            counts.insert(listener.dead.clone(), depth);
        }
    }
    counts
}
