//! The session's database lanes on the blocking pool: the claim lane
//! (flush failures and released leases, then claim), the mark lane (mark
//! acked rows published) and the lease heartbeat, each one job at a time
//! with its own connection.

use diesel::connection::SimpleConnection;

use super::*;

/// Database work waiting for the next lane job.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) to_mark: Vec<LeasedSeq>,
    /// Returned by the broker as unroutable: marked, kept, flagged.
    pub(super) to_mark_unroutable: Vec<LeasedSeq>,
    pub(super) failures: Vec<PublishFailure>,
    pub(super) releases: Vec<LeasedSeq>,
    /// Leases whose rows are all settled and flushed.
    pub(super) finished_leases: Vec<i64>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.to_mark.is_empty()
            && self.to_mark_unroutable.is_empty()
            && self.failures.is_empty()
            && self.releases.is_empty()
            && self.finished_leases.is_empty()
    }

    pub(super) fn absorb(&mut self, mut other: Pending) {
        self.to_mark.append(&mut other.to_mark);
        self.to_mark_unroutable.append(&mut other.to_mark_unroutable);
        self.failures.append(&mut other.failures);
        self.releases.append(&mut other.releases);
        self.finished_leases.append(&mut other.finished_leases);
    }
}

pub(super) struct LaneResult {
    /// Handed back when the job failed, to be retried.
    pub(super) unflushed: Option<Pending>,
    /// What the job settled with the database, when it succeeded.
    pub(super) flushed: Option<Pending>,
    pub(super) attempted_marks: usize,
    pub(super) marked: usize,
    pub(super) newly_failed: usize,
    pub(super) claimed: Option<(u64, Instant, Vec<ClaimedEvent>)>,
    pub(super) error: Option<Error>,
    /// The lane's connection, handed back for its next job (dropped after
    /// an error, so the next job opens a fresh one).
    pub(super) conn: Option<LaneConnection>,
}

/// A lane's connection, kept between its jobs.
pub(super) struct LaneConnection {
    conn: PgConnection,
    /// The server it reaches ([`store::server_identity`]), once a claim
    /// needed it.
    server: Option<i64>,
}

/// Which lane a job runs on: it decides whether the job takes commit
/// ticks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    /// Flushes failures and released leases, then claims.
    Claim,
    /// Marks acked rows, then takes a commit tick when one is due: off the
    /// path from a commit to its publish, which waits for claims only.
    Mark,
    /// The session's last settling.
    Settle,
}

impl Session<'_> {
    pub(super) fn maybe_start_lane(&mut self) {
        if self.lane.is_some() {
            return;
        }
        let config = &self.shared.config;
        let now = Instant::now();
        let claim =
            !self.stopping && now >= self.next_poll && self.held + config.batch_size <= config.max_in_flight;
        if !claim && self.pending.failures.is_empty() && self.pending.releases.is_empty() {
            return;
        }
        // Marks go to the mark lane.
        let pending = Pending {
            failures: std::mem::take(&mut self.pending.failures),
            releases: std::mem::take(&mut self.pending.releases),
            ..Pending::default()
        };
        let claim_job = if claim {
            // This claim's snapshot is taken after every wake-up so far.
            self.wake_pending = false;
            self.generation += 1;
            // Cuts recorded before this claim are flushed by this very job
            // before it claims, so they no longer need guarding.
            let current = self.generation;
            self.blocked.retain(|_, generation| *generation >= current);
            // Only this session's leases are its own to claim behind.
            let held: Vec<i64> = self.lease_deadlines.keys().copied().collect();
            Some((current, held))
        } else {
            None
        };
        let shared = self.shared.clone_for_lane();
        let conn = self.claim_conn.take();
        self.lane = Some(tokio::task::spawn_blocking(move || {
            run_lane_job(&shared, Lane::Claim, conn, pending, claim_job)
        }));
    }

    /// Starts a lease renewal when one is due and this session holds leases.
    pub(super) fn maybe_start_heartbeat(&mut self) {
        let now = Instant::now();
        if self.heartbeat.is_some() || self.lease_deadlines.is_empty() || now < self.next_heartbeat {
            return;
        }
        self.next_heartbeat = now + self.shared.config.heartbeat_interval();
        let shared = self.shared.clone_for_lane();
        let held: Vec<i64> = self.lease_deadlines.keys().copied().collect();
        self.heartbeat = Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let renewed = shared.pool.get().map_err(Error::from).and_then(|mut conn| {
                store::renew_leases(
                    &mut conn,
                    &shared.config.relay_id,
                    &held,
                    shared.config.lease.as_secs_f64(),
                )
            });
            HeartbeatResult { started, renewed }
        }));
    }

    /// Moves the deadline of every renewed lease. A lease the renewal did
    /// not find has ended: its deadline stays, so its rows are given back
    /// instead of published (another relay may hold them now).
    pub(super) fn on_heartbeat_done(
        &mut self,
        joined: std::result::Result<HeartbeatResult, tokio::task::JoinError>,
    ) {
        match joined {
            Ok(HeartbeatResult {
                started,
                renewed: Ok(ids),
            }) => {
                let deadline = started + self.shared.config.lease;
                for id in ids {
                    if let Some(current) = self.lease_deadlines.get_mut(&id) {
                        *current = (*current).max(deadline);
                    }
                }
            }
            Ok(HeartbeatResult {
                renewed: Err(error), ..
            }) => {
                self.shared.health.set_database_ok(false);
                tracing::warn!(error = %error_chain(&error), "cannot renew leases; rows whose lease ends are given back");
            }
            Err(e) => tracing::error!(error = %e, "relay heartbeat job panicked"),
        }
    }

    /// Starts a mark job if none runs and rows wait to be marked: once a
    /// batch of them waits, or the first of them has waited `mark_delay`
    /// (marking many rows in one statement costs little more than one; the
    /// messages are already confirmed, so only bookkeeping waits).
    pub(super) fn maybe_start_mark_lane(&mut self) {
        if self.mark_lane.is_some() {
            return;
        }
        let waiting = self.pending.to_mark.len() + self.pending.to_mark_unroutable.len();
        if waiting == 0 && self.pending.finished_leases.is_empty() {
            self.mark_at = None;
            return;
        }
        let due = *self
            .mark_at
            .get_or_insert_with(|| Instant::now() + self.shared.config.mark_delay);
        if waiting < self.shared.config.batch_size && !self.stopping && Instant::now() < due {
            return;
        }
        self.mark_at = None;
        let pending = Pending {
            to_mark: std::mem::take(&mut self.pending.to_mark),
            to_mark_unroutable: std::mem::take(&mut self.pending.to_mark_unroutable),
            finished_leases: std::mem::take(&mut self.pending.finished_leases),
            ..Pending::default()
        };
        let shared = self.shared.clone_for_lane();
        let conn = self.mark_conn.take();
        self.mark_lane = Some(tokio::task::spawn_blocking(move || {
            run_lane_job(&shared, Lane::Mark, conn, pending, None)
        }));
    }

    pub(super) async fn on_lane_done(
        &mut self,
        joined: std::result::Result<LaneResult, tokio::task::JoinError>,
    ) -> std::result::Result<(), SessionLost> {
        let config = Arc::clone(&self.shared.config);
        let result = match joined {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "relay database job panicked");
                self.next_poll = Instant::now() + self.db_backoff.upcoming();
                return Ok(());
            }
        };
        if let Some(unflushed) = result.unflushed {
            // Keep the work for the next job; order within each list does
            // not matter.
            let mut again = unflushed;
            again.absorb(std::mem::take(&mut self.pending));
            self.pending = again;
        }
        if let Some(error) = result.error {
            self.shared.health.set_database_ok(false);
            let retry_in = self.db_backoff.next_delay();
            tracing::warn!(error = %error_chain(&error), ?retry_in, "relay database work failed");
            self.next_poll = Instant::now() + retry_in;
            return Ok(());
        }
        self.shared.health.set_database_ok(true);
        self.db_backoff.reset();
        if let Some(flushed) = &result.flushed {
            let settled = flushed
                .to_mark
                .iter()
                .chain(flushed.to_mark_unroutable.iter())
                .chain(flushed.releases.iter())
                .map(|(_, lease)| *lease)
                .chain(flushed.failures.iter().map(|f| f.lease_id));
            for lease in settled {
                if let Some(count) = self.lease_rows.get_mut(&lease) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.lease_rows.remove(&lease);
                        self.lease_deadlines.remove(&lease);
                        self.pending.finished_leases.push(lease);
                    }
                }
            }
        }
        if result.marked > 0 {
            metrics::counter!(m::PUBLISHED_TOTAL).increment(result.marked as u64);
        }
        if result.attempted_marks > result.marked {
            let lost = result.attempted_marks - result.marked;
            metrics::counter!(m::LEASES_LOST_TOTAL).increment(lost as u64);
            tracing::warn!(
                rows = lost,
                "lease ran out before marking: rows will be published again by whoever holds them now"
            );
        }
        if result.newly_failed > 0 {
            tracing::error!(
                rows = result.newly_failed,
                "rows exhausted their publish attempts and are marked failed; their aggregates wait"
            );
        }
        if let Some((generation, claim_started, rows)) = result.claimed {
            let claimed = rows.len();
            metrics::counter!(m::CLAIMED_TOTAL).increment(claimed as u64);
            let now = Instant::now();
            self.next_poll = if claimed >= config.batch_size {
                now
            } else if claimed > 0 {
                self.idle_delay = config.poll_min;
                now + config.poll_min
            } else {
                self.idle_delay = (self.idle_delay * 2).min(config.poll_max);
                now + self.idle_delay
            };
            if self.wake_pending {
                self.next_poll = now;
            }
            self.accept_claimed(generation, claim_started, rows).await?;
        }
        Ok(())
    }
}

/// Sleeps until `at`, or forever when there is none.
pub(super) async fn sleep_until_instant(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A lease renewal's outcome: when it started (the new deadlines count
/// from then) and the leases it renewed.
pub(super) struct HeartbeatResult {
    pub(super) started: Instant,
    pub(super) renewed: Result<Vec<i64>>,
}

pub(super) async fn wait_heartbeat(
    heartbeat: &mut Option<JoinHandle<HeartbeatResult>>,
) -> std::result::Result<HeartbeatResult, tokio::task::JoinError> {
    match heartbeat {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

pub(super) async fn wait_lane(
    lane: &mut Option<JoinHandle<LaneResult>>,
) -> std::result::Result<LaneResult, tokio::task::JoinError> {
    match lane {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// What a lane job needs, owned, for the blocking pool.
pub(crate) struct LaneContext {
    pub(crate) config: Arc<crate::relay::RelayConfig>,
    pub(crate) pool: crate::database::PgPool,
    /// How far the claim floor may rise (`floor.rs`); claims run one at a
    /// time, so the lock is never contended.
    pub(crate) frontier: Arc<std::sync::Mutex<CommitFrontier>>,
}

/// The phantom guard (`standby.rs`), when configured: waits until a
/// standby has the claimed rows; if none does in time, gives their leases
/// back (the rows are claimed again after the database backoff) and
/// fails the job.
fn guard(conn: &mut PgConnection, config: &crate::relay::RelayConfig, rows: &[ClaimedEvent]) -> Result<()> {
    let Some(limit) = config.wait_for_standby else {
        return Ok(());
    };
    if rows.is_empty() {
        return Ok(());
    }
    match crate::relay::standby::wait_until_flushed(conn, limit) {
        Ok(waited) => {
            tracing::trace!(
                rows = rows.len(),
                waited_us = waited.as_micros() as u64,
                "a standby has the claimed rows"
            );
            Ok(())
        }
        Err(error) => {
            let mut leases: Vec<i64> = rows.iter().map(|row| row.lease_id).collect();
            leases.sort_unstable();
            leases.dedup();
            if let Err(release) = store::drop_leases(conn, &config.relay_id, &leases) {
                tracing::debug!(error = %error_chain(&release), "cannot give the unguarded batch back; its lease expires");
            }
            Err(error)
        }
    }
}

fn lock_frontier(ctx: &LaneContext) -> std::sync::MutexGuard<'_, CommitFrontier> {
    // A panic while it was held cannot leave it inconsistent (each update
    // is one assignment or queue step): go on with what it holds.
    ctx.frontier
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a commit tick when one is due, for the next claims' floor. A
/// failure only keeps the floor where it is.
fn take_commit_tick(ctx: &LaneContext, conn: &mut PgConnection) {
    let now = Instant::now();
    if !lock_frontier(ctx).tick_due(now) {
        return;
    }
    match store::commit_tick(conn) {
        Ok(tick) => lock_frontier(ctx).observe(tick, now),
        Err(error) => {
            tracing::debug!(error = %error_chain(&error), "cannot take a commit tick; the claim floor stays")
        }
    }
}

/// Flushes `pending`, then claims if `claim` (generation, this session's
/// leases) is set. Runs on the
/// blocking pool.
pub(super) fn run_lane_job(
    ctx: &LaneContext,
    lane: Lane,
    conn: Option<LaneConnection>,
    pending: Pending,
    claim: Option<(u64, Vec<i64>)>,
) -> LaneResult {
    let config = &ctx.config;
    let mut result = LaneResult {
        unflushed: None,
        attempted_marks: pending.to_mark.len() + pending.to_mark_unroutable.len(),
        flushed: None,
        marked: 0,
        newly_failed: 0,
        claimed: None,
        error: None,
        conn: None,
    };
    let pending_is_empty = pending.is_empty();
    let opened = conn.map_or_else(
        || crate::relay::open_session(config).map(|conn| LaneConnection { conn, server: None }),
        Ok,
    );
    let LaneConnection { mut conn, mut server } = match opened {
        Ok(lane_conn) => lane_conn,
        Err(e) => {
            result.unflushed = Some(pending);
            result.attempted_marks = 0;
            result.error = Some(e);
            return result;
        }
    };
    // With the event log, rows are kept until the pruner moves them.
    let delete = config.retention.is_zero() && !config.event_log;
    let flush_started = Instant::now();
    let flushed = (|| -> Result<(usize, usize)> {
        if !pending.to_mark.is_empty() || !pending.to_mark_unroutable.is_empty() {
            crash_point!("relay::before_mark");
        }
        let marked = store::mark_published(&mut conn, &config.relay_id, &pending.to_mark, delete)?.len()
            + store::mark_unroutable(&mut conn, &config.relay_id, &pending.to_mark_unroutable)?.len();
        if marked > 0 {
            crash_point!("relay::after_mark");
        }
        let failed = store::record_failures(
            &mut conn,
            &config.relay_id,
            &pending.failures,
            i32::try_from(config.max_attempts).unwrap_or(i32::MAX),
        )?;
        store::release_leases(&mut conn, &config.relay_id, &pending.releases)?;
        store::drop_leases(&mut conn, &config.relay_id, &pending.finished_leases)?;
        Ok((marked, failed))
    })();
    if lane == Lane::Mark && flushed.is_ok() {
        take_commit_tick(ctx, &mut conn);
    }
    match flushed {
        Ok((marked, failed)) => {
            if !pending_is_empty {
                tracing::trace!(
                    marked,
                    failed,
                    elapsed_us = flush_started.elapsed().as_micros() as u64,
                    "flushed"
                );
            }
            result.marked = marked;
            result.newly_failed = failed;
            result.flushed = Some(pending);
        }
        Err(e) => {
            // Marks are idempotent (guarded by the lease), so retrying the
            // whole set later is safe.
            result.unflushed = Some(pending);
            result.attempted_marks = 0;
            result.error = Some(e);
            return result;
        }
    }
    if let Some((generation, held)) = claim {
        let started = Instant::now();
        let batch = i64::try_from(config.batch_size).unwrap_or(i64::MAX);
        // Once per connection: the frontier only holds on the server its
        // ticks were taken on.
        let on_server = match server.map_or_else(|| store::server_identity(&mut conn), Ok) {
            Ok(known) => known,
            Err(e) => {
                result.error = Some(e);
                return result;
            }
        };
        server = Some(on_server);
        let frontier = lock_frontier(ctx).settled_on(on_server);
        // With the phantom guard the claim commits synchronously (locally):
        // once it returns, the WAL of every row it claimed is flushed, so
        // the guard waits for the standby only (see `standby.rs`).
        let claimed = if config.wait_for_standby.is_some() {
            conn.batch_execute("SET synchronous_commit = local")
                .map_err(Error::from)
                .and_then(|()| {
                    let claimed = store::claim_batch_raising_floor(
                        &mut conn,
                        &config.relay_id,
                        &held,
                        batch,
                        config.lease.as_secs_f64(),
                        frontier,
                    );
                    conn.batch_execute("SET synchronous_commit = off")?;
                    claimed
                })
        } else {
            store::claim_batch_raising_floor(
                &mut conn,
                &config.relay_id,
                &held,
                batch,
                config.lease.as_secs_f64(),
                frontier,
            )
        };
        match claimed {
            Ok(rows) => {
                tracing::trace!(
                    rows = rows.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "claimed"
                );
                match guard(&mut conn, config, &rows) {
                    Ok(()) => result.claimed = Some((generation, started, rows)),
                    Err(e) => result.error = Some(e),
                }
            }
            Err(e) => result.error = Some(e),
        }
    }
    if result.error.is_none() {
        result.conn = Some(LaneConnection { conn, server });
    }
    result
}
