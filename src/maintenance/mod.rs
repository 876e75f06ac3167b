//! Maintenance: small services that keep the library's tables bounded and
//! its gauges fresh, beside the relay's and the worker's main loops. One
//! service a file; every one is started, run and stopped the same way
//! ([`Maintenance`]).
//!
//! | service | what it does | run by | period (default) | retention (default) |
//! | --- | --- | --- | --- | --- |
//! | [`published_pruner`] | moves published `outbox_events` rows past the retention into the event log (deletes them without it); with retention 0 (rows deleted on publish) the kept unroutable rows after 7 days | relay | [`RelayConfig::prune_interval`](crate::RelayConfig::prune_interval) (60 s) | [`RelayConfig::retention`](crate::RelayConfig::retention) (7 days) |
//! | [`event_log_pruner`] | drops the event log's monthly partitions past the log retention (none by default: kept forever) | relay | [`RelayConfig::prune_interval`](crate::RelayConfig::prune_interval) (60 s) | [`RelayConfig::log_retention`](crate::RelayConfig::log_retention) (forever) |
//! | [`lease_cleaner`] | deletes `outbox_leases` rows that expired over a minute ago (their relay died) | relay | [`RelayConfig::prune_interval`](crate::RelayConfig::prune_interval) (60 s) | 1 minute past expiry |
//! | [`backlog_gauges`] | refreshes the backlog gauges (`outbox_backlog`, oldest unpublished age, failed, unroutable, paused) | relay | [`RelayConfig::stats_interval`](crate::RelayConfig::stats_interval) (5 s) | none |
//! | [`relay_heartbeat`] | upserts the relay's row in `outbox_relays` (relays alive, for the dashboard) and deletes rows of relays gone for an hour | relay | [`PRESENCE_INTERVAL`](crate::relay::presence::PRESENCE_INTERVAL) (5 s) | 1 hour after the last heartbeat |
//! | [`inbox_pruner`] | deletes `processed_events` (inbox) rows older than the retention | worker | [`WorkerConfig::prune_interval`](crate::WorkerConfig::prune_interval) (10 min) | [`WorkerConfig::inbox_retention`](crate::WorkerConfig::inbox_retention) (7 days) |
//! | [`webhook_log_pruner`] | deletes `webhook_deliveries` rows (the webhook delivery log) older than the retention; only in a worker running `webhook_delivery` | worker | [`WorkerConfig::prune_interval`](crate::WorkerConfig::prune_interval) (10 min) | [`WorkerConfig::webhook_log_retention`](crate::WorkerConfig::webhook_log_retention) (30 days) |
//! | [`projection_rebuilder`] | rebuilds a projection when `outbox projection rebuild` asked for it, or resumes one that stopped half way (one worker at a time) | worker, one a projection it runs | [`REBUILD_POLL`](crate::projection::REBUILD_POLL) (1 s) | none |
//! | [`retry_repairer`] | finds retry copies the broker did not hand back within their delay plus a grace (a retry queue whose dead-letter path broke), counts them (`outbox_retry_copies_overdue`), logs once per episode and publishes them to their listener's queue | worker, for its retrying listeners | [`WorkerConfig::retry_repair_interval`](crate::WorkerConfig::retry_repair_interval) (15 s) | [`WorkerConfig::retry_repair_grace`](crate::WorkerConfig::retry_repair_grace) (60 s past the delay) |
//! | [`attempts_pruner`] | deletes `listener_attempts` rows not touched for the retention (left behind by messages purged from their queues by hand) | worker | [`WorkerConfig::prune_interval`](crate::WorkerConfig::prune_interval) (10 min) | [`WorkerConfig::attempts_retention`](crate::WorkerConfig::attempts_retention) (7 days) |
//!
//! Pruners delete in bounded batches (the relay's
//! [`RelayConfig::prune_batch`](crate::RelayConfig::prune_batch), 5,000;
//! the worker's [`PRUNE_BATCH`], 5,000), one short statement each, until a
//! batch comes back short; the stop signal is checked between batches.
//! Several relays or workers may prune the same database at once, and
//! will: each deletes by age, so a second pruner of the same rows waits a
//! moment for the first's statement and finds them gone (a short batch
//! ends its period). Pruning more than once is harmless, only redundant.
//! Where workers sharing a database are configured with different
//! retentions, the shortest wins.
//!
//! ## One shape
//!
//! A service ([`MaintenanceService`]) has a name, a period and one step,
//! [`run_once`](MaintenanceService::run_once), that does a bounded amount
//! of work on a connection and says whether more is waiting.
//! [`Maintenance::start`] runs a service as a tokio task: every period it
//! runs steps on tokio's blocking pool (diesel blocks; it never runs on an
//! async worker thread) until one says it is done. A failing step (the
//! database is down, a role may not `DELETE`, a table is missing) is
//! logged, counted in `outbox_maintenance_failures_total{service}` and
//! tried again next period; it never stops the service or its relay or
//! worker. The first failure after a success is logged at WARN, repeats at
//! DEBUG, and the recovery at INFO, so a pruner without its grant does not
//! fill the log every period. [`Maintenance::stop`] tells every service
//! to stop (a step under way finishes; none starts after) and waits for
//! them.
//!
//! Rows removed are counted per service: `outbox_pruned_total` (published
//! rows), `outbox_expired_leases_deleted_total`, `outbox_inbox_pruned_total`,
//! `outbox_attempts_pruned_total`, `outbox_webhook_log_pruned_total` (see
//! [`crate::metrics`]).

pub(crate) mod attempts_pruner;
pub(crate) mod backlog_gauges;
pub(crate) mod event_log_pruner;
pub(crate) mod inbox_pruner;
pub(crate) mod lease_cleaner;
pub(crate) mod projection_rebuilder;
pub(crate) mod published_pruner;
pub(crate) mod relay_heartbeat;
pub(crate) mod retry_repairer;
#[cfg(feature = "webhooks")]
pub(crate) mod webhook_log_pruner;

use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;
use diesel::RunQueryDsl;
use diesel::sql_types::{BigInt, Double};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::database::{PgPool, run_blocking};
use crate::error::{Error, Result, error_chain};
use crate::metrics as m;

/// Rows a worker's pruner deletes per statement.
pub(crate) const PRUNE_BATCH: usize = 5_000;

/// What one step of a service did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    /// Rows the step deleted (0 for services that delete nothing).
    pub(crate) rows: usize,
    /// Whether more work is waiting (a full batch was deleted): the runner
    /// runs the next step at once instead of after the period.
    pub(crate) more: bool,
}

impl Step {
    /// A step that finished the period's work.
    pub(crate) fn done(rows: usize) -> Self {
        Self { rows, more: false }
    }

    /// A step that deleted `rows` of at most `batch`: more may be waiting
    /// when the batch was full.
    pub(crate) fn batch(rows: usize, batch: usize) -> Self {
        Self {
            rows,
            more: rows >= batch,
        }
    }
}

/// A maintenance service: a name, a period and one bounded step.
pub(crate) trait MaintenanceService: Send + Sync + 'static {
    /// Its name in logs and in the `service` label of
    /// `outbox_maintenance_failures_total`.
    const NAME: &'static str;
    /// The counter of the rows its steps delete, if they delete any.
    const ROWS_TOTAL: Option<&'static str>;
    /// Run the first step when started (gauges) instead of one period
    /// later (pruners: a restart loop does not prune at every start).
    const RUN_AT_START: bool = false;

    /// How long to wait between periods.
    fn period(&self) -> Duration;

    /// One bounded piece of work, on the blocking pool.
    fn run_once(&self, conn: &mut PgConnection) -> Result<Step>;
}

/// Runs maintenance services as tokio tasks and stops them together.
pub(crate) struct Maintenance {
    pool: PgPool,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("services", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// Services started here take their connections from `pool`.
    pub(crate) fn new(pool: PgPool) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            pool,
            stop,
            tasks: Vec::new(),
        }
    }

    /// Starts `service` on the current tokio runtime. Dropping the
    /// [`Maintenance`] without [`stop`](Self::stop) stops it too (at its
    /// next wait), without waiting for it.
    pub(crate) fn start<S: MaintenanceService>(&mut self, service: S) {
        let task = run(Arc::new(service), self.pool.clone(), self.stop.subscribe());
        self.tasks.push(tokio::spawn(task));
    }

    /// Stops every service and waits for them (a step under way finishes).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The runner: every period, steps until one is done, until stopped.
async fn run<S: MaintenanceService>(service: Arc<S>, pool: PgPool, mut stop: watch::Receiver<bool>) {
    // A zero period would spin; configurations refuse it, this makes sure.
    let period = service.period().max(Duration::from_millis(1));
    if !S::RUN_AT_START && !wait_or_stop(&mut stop, period).await {
        return;
    }
    let mut failing = false;
    loop {
        let mut total = 0usize;
        loop {
            let step = Arc::clone(&service);
            match run_blocking(&pool, move |conn| step.run_once(conn)).await {
                Ok(step) => {
                    total += step.rows;
                    if let Some(counter) = S::ROWS_TOTAL {
                        metrics::counter!(counter).increment(step.rows as u64);
                    }
                    if failing {
                        failing = false;
                        tracing::info!(service = S::NAME, "maintenance step succeeded again");
                    }
                    if !step.more || *stop.borrow() {
                        break;
                    }
                }
                Err(error) => {
                    metrics::counter!(m::MAINTENANCE_FAILURES_TOTAL, "service" => S::NAME).increment(1);
                    if failing {
                        tracing::debug!(service = S::NAME, error = %error_chain(&error), "maintenance step still failing; will try again");
                    } else {
                        tracing::warn!(service = S::NAME, error = %error_chain(&error), retry_in = ?period, "maintenance step failed; will try again");
                    }
                    failing = true;
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(service = S::NAME, rows = total, "maintenance deleted rows");
        }
        if !wait_or_stop(&mut stop, period).await {
            return;
        }
    }
}

/// Waits `period`, or returns false when asked to stop (or when the
/// [`Maintenance`] was dropped).
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, period: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = stop.changed() => false,
        () = tokio::time::sleep(period) => !*stop.borrow(),
    }
}

/// A table whose rows expire by age, pruned by an [`AgePruner`]: its
/// name and the column dating its rows (the library's own identifiers,
/// never input), and the pruner's name and counter.
pub(crate) trait AgedRows: Send + Sync + 'static {
    /// The pruner's name (see [`MaintenanceService::NAME`]).
    const PRUNER: &'static str;
    /// The table.
    const TABLE: &'static str;
    /// The `timestamptz` column dating a row.
    const DATED_BY: &'static str;
    /// The counter of rows pruned.
    const PRUNED_TOTAL: &'static str;
}

/// Deletes rows of `T` older than a retention, [`PRUNE_BATCH`] a
/// statement, every period.
#[derive(Debug)]
pub(crate) struct AgePruner<T> {
    retention: Duration,
    period: Duration,
    rows: std::marker::PhantomData<T>,
}

impl<T: AgedRows> AgePruner<T> {
    /// Prunes rows older than `retention` every `period`.
    pub(crate) fn new(retention: Duration, period: Duration) -> Self {
        Self {
            retention,
            period,
            rows: std::marker::PhantomData,
        }
    }
}

impl<T: AgedRows> MaintenanceService for AgePruner<T> {
    const NAME: &'static str = T::PRUNER;
    const ROWS_TOTAL: Option<&'static str> = Some(T::PRUNED_TOTAL);

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let deleted = delete_older_than::<T>(conn, self.retention.as_secs_f64(), batch_limit(PRUNE_BATCH))?;
        Ok(Step::batch(deleted, PRUNE_BATCH))
    }
}

/// Deletes up to `batch` rows of `T` dated more than `older_than_secs` ago
/// and returns how many; call again while it returns a full batch. Rows
/// another pruner deletes meanwhile are simply not counted (the statement
/// waits for it, then finds them gone). No `FOR UPDATE`: that would need
/// `UPDATE` on tables the worker only inserts into and deletes from.
pub(crate) fn delete_older_than<T: AgedRows>(
    conn: &mut PgConnection,
    older_than_secs: f64,
    batch: i64,
) -> Result<usize> {
    let (table, dated_by) = (T::TABLE, T::DATED_BY);
    if !older_than_secs.is_finite() || older_than_secs < 0.0 {
        return Err(Error::Config(format!(
            "{table} retention must be a non-negative number, not {older_than_secs} s"
        )));
    }
    if batch < 1 {
        return Err(Error::Config(format!(
            "{table} prune batch must be at least 1, not {batch}"
        )));
    }
    Ok(diesel::sql_query(format!(
        "DELETE FROM {table} WHERE ctid IN (
             SELECT ctid FROM {table}
             WHERE {dated_by} < now() - make_interval(secs => $1)
             LIMIT $2)"
    ))
    .bind::<Double, _>(older_than_secs)
    .bind::<BigInt, _>(batch)
    .execute(conn)?)
}

/// `batch` as a SQL `LIMIT`.
pub(crate) fn batch_limit(batch: usize) -> i64 {
    i64::try_from(batch).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RelayConfig, WorkerConfig};

    #[test]
    fn a_full_batch_asks_for_more() {
        assert_eq!(Step::batch(5, 5), Step { rows: 5, more: true });
        assert_eq!(Step::batch(4, 5), Step::done(4));
    }

    /// The defaults the module's table documents.
    #[test]
    fn documented_defaults() {
        let relay = RelayConfig::default();
        assert_eq!(relay.prune_interval, Duration::from_secs(60));
        assert_eq!(relay.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(relay.prune_batch, 5_000);
        assert_eq!(relay.stats_interval, Duration::from_secs(5));
        let worker = WorkerConfig::default();
        assert_eq!(worker.prune_interval, Some(Duration::from_secs(600)));
        assert_eq!(worker.inbox_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(worker.attempts_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(PRUNE_BATCH, 5_000);
        assert_eq!(
            published_pruner::UNROUTABLE_RETENTION_WITHOUT_HISTORY,
            Duration::from_secs(7 * 24 * 3600)
        );
    }
}
