//! A load generator: whole site lifecycles driven from concurrent writers,
//! then a check that every event the services reported is in the outbox.
//!
//! Each site's lifecycle is drawn from its own random generator, seeded from
//! the run's seed and the site's index, so a seed gives the same mix of
//! outcomes (and so the same event counts) whatever the thread scheduling.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::dsl::count_star;
use diesel::prelude::*;
use outbox::schema::outbox_events;
use outbox::{Metadata, Outbox, PgPool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{ChomError, Result};
use crate::events::EVENT_TYPES;
use crate::models::{SiteStatus, Tenant, User};
use crate::services::{Recorded, backups, sites, tenants};

/// Ids sent per verification query; keeps the bound array modest.
const VERIFY_CHUNK: usize = 10_000;

/// Error texts a simulated provisioning or backup fails with.
const PROVISION_ERRORS: [&str; 4] = [
    "certificate issuance timed out",
    "DNS record for the domain not found",
    "no capacity on the web node pool",
    "PHP-FPM pool failed to start",
];
const BACKUP_ERRORS: [&str; 3] = [
    "storage bucket unreachable",
    "database dump exited with status 2",
    "disk quota exceeded while archiving",
];

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateConfig {
    /// Tenants to create (each with one user), at least 1.
    pub tenants: u32,
    /// Site lifecycles to run, spread round-robin over the tenants.
    pub sites: u64,
    /// Concurrent writer threads, each with its own pooled connection.
    pub writers: u32,
    /// Cap on service transactions per second over all writers; `None` or
    /// 0 means as fast as possible.
    pub rate: Option<f64>,
    /// Probability that a provisioning or a backup fails, in `[0, 1]`.
    pub failure_rate: f64,
    /// Seed of the lifecycle mix.
    pub seed: u64,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            tenants: 3,
            sites: 100,
            writers: 16,
            rate: None,
            failure_rate: 0.1,
            seed: 0,
        }
    }
}

impl SimulateConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if self.tenants == 0 {
            return Err(ChomError::invalid("tenants", "must be at least 1"));
        }
        if self.writers == 0 || self.writers > 1024 {
            return Err(ChomError::invalid("writers", "must be between 1 and 1024"));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(ChomError::invalid("failure_rate", "must be between 0 and 1"));
        }
        if let Some(rate) = self.rate
            && (!rate.is_finite() || rate < 0.0)
        {
            return Err(ChomError::invalid("rate", "must be a non-negative number"));
        }
        Ok(())
    }
}

/// What a run did, and whether the outbox agrees.
#[derive(Debug, Clone, Serialize)]
pub struct SimulateReport {
    /// Events the services reported recording, by type (all seven types).
    pub events: BTreeMap<String, u64>,
    /// Events of this run found in `outbox_events`, by type.
    pub database_events: BTreeMap<String, u64>,
    /// Reported events not found in `outbox_events` (0 when nothing was
    /// lost).
    pub missing_events: u64,
    /// Whether the services' counts and the table's agree exactly.
    pub verified: bool,
    /// Service transactions of the lifecycles (tenant setup excluded).
    pub transactions: u64,
    /// Wall time of the lifecycles, setup and verification excluded.
    pub elapsed_seconds: f64,
    /// `transactions / elapsed_seconds`.
    pub transactions_per_second: f64,
    /// Tenants created.
    pub tenants: u32,
    /// Site lifecycles run.
    pub sites: u64,
    /// Writer threads used.
    pub writers: u32,
    /// The seed, to reproduce the mix.
    pub seed: u64,
    /// Every event id the services returned, in no particular order.
    #[serde(skip)]
    pub event_ids: Vec<Uuid>,
}

/// Runs the simulation: creates the tenants and their users, drives
/// `config.sites` lifecycles from `config.writers` threads sharing `pool`,
/// then counts this run's events in `outbox_events`.
///
/// Each lifecycle: create the site; provision it (fails with probability
/// `failure_rate`); if active, 1 to 3 backups, each created then completed
/// or failed (probability `failure_rate`); delete about a third of the
/// sites. A service error stops the run and is returned.
pub fn run(pool: &PgPool, outbox: &Outbox, config: &SimulateConfig) -> Result<SimulateReport> {
    config.validate()?;
    // Names unique to this run, so runs can share a database.
    let tag = Uuid::now_v7().simple().to_string()[20..].to_owned();
    let owners = {
        let mut conn = pool.get().map_err(outbox::Error::Pool)?;
        create_owners(&mut conn, config.tenants, &tag)?
    };

    let writers = u64::from(config.writers).min(config.sites).max(1);
    let pacer = Pacer::new(config.rate);
    let next_site = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let lifecycle = Lifecycle {
        outbox,
        owners: &owners,
        tag: &tag,
        seed: config.seed,
        failure_rate: config.failure_rate,
        pacer: &pacer,
    };
    let started = Instant::now();
    let outcomes: Vec<Result<Tally>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                scope.spawn(|| {
                    let outcome = writer(pool, &lifecycle, &next_site, config.sites, &stop);
                    if outcome.is_err() {
                        // The others finish their current site and stop.
                        stop.store(true, Ordering::Relaxed);
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let elapsed = started.elapsed();

    let mut total = Tally::default();
    for outcome in outcomes {
        total.merge(outcome?);
    }

    let mut conn = pool.get().map_err(outbox::Error::Pool)?;
    let database_events = count_in_outbox(&mut conn, &total.event_ids)?;
    let found: u64 = database_events.values().sum();
    let reported = total.event_ids.len() as u64;
    let distinct = total.event_ids.iter().collect::<HashSet<_>>().len() as u64;
    let events: BTreeMap<String, u64> = EVENT_TYPES
        .iter()
        .map(|t| ((*t).to_owned(), total.events.get(t).copied().unwrap_or(0)))
        .collect();
    let database_events: BTreeMap<String, u64> = EVENT_TYPES
        .iter()
        .map(|t| ((*t).to_owned(), database_events.get(*t).copied().unwrap_or(0)))
        .collect();
    let elapsed_seconds = elapsed.as_secs_f64();
    Ok(SimulateReport {
        verified: events == database_events && found == reported && distinct == reported,
        missing_events: reported.saturating_sub(found),
        events,
        database_events,
        transactions: total.transactions,
        elapsed_seconds,
        transactions_per_second: if elapsed_seconds > 0.0 {
            total.transactions as f64 / elapsed_seconds
        } else {
            0.0
        },
        tenants: config.tenants,
        sites: config.sites,
        writers: writers as u32,
        seed: config.seed,
        event_ids: total.event_ids,
    })
}

/// Creates the tenants, each with one user who acts on its sites.
fn create_owners(conn: &mut PgConnection, count: u32, tag: &str) -> Result<Vec<(Tenant, User)>> {
    (1..=count)
        .map(|n| {
            let tenant = tenants::create_tenant(conn, &format!("Simulated tenant {n} ({tag})"))?;
            let user = tenants::create_user(
                conn,
                tenant.id,
                &format!("owner-{n}@{tag}.sim.chom.test"),
                &format!("Owner of tenant {n}"),
            )?;
            Ok((tenant, user))
        })
        .collect()
}

/// One writer: takes the next site index until all are done or another
/// writer failed.
fn writer(
    pool: &PgPool,
    lifecycle: &Lifecycle<'_>,
    next_site: &AtomicU64,
    sites: u64,
    stop: &AtomicBool,
) -> Result<Tally> {
    let mut conn = pool.get().map_err(outbox::Error::Pool)?;
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let index = next_site.fetch_add(1, Ordering::Relaxed);
        if index >= sites {
            break;
        }
        if let Err(error) = lifecycle.run(&mut conn, index, &mut tally) {
            tracing::error!(site = index, %error, "simulated lifecycle failed");
            return Err(error);
        }
    }
    Ok(tally)
}

/// What every writer shares to run one site's lifecycle.
struct Lifecycle<'a> {
    outbox: &'a Outbox,
    owners: &'a [(Tenant, User)],
    tag: &'a str,
    seed: u64,
    failure_rate: f64,
    pacer: &'a Pacer,
}

impl Lifecycle<'_> {
    fn run(&self, conn: &mut PgConnection, index: u64, tally: &mut Tally) -> Result<()> {
        // Golden-ratio stride: neighbouring indexes get unrelated seeds.
        let mut rng = StdRng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // A run always has at least one tenant (validated), so the modulo is
        // safe; a lifecycle's events share a correlation id.
        let (tenant, user) = &self.owners[(index % self.owners.len() as u64) as usize];
        let correlation = format!("sim-{}-{index}", self.tag);
        let by_user = Metadata::by(format!("user:{}", user.id)).correlation_id(&correlation);
        let by_system = Metadata::system().correlation_id(&correlation);

        self.pacer.wait();
        let domain = format!("site-{index}.{}.sim.chom.test", self.tag);
        let created = sites::create_site(self.outbox, conn, by_user.clone(), tenant.id, &domain)?;
        let site_id = created.value.id;
        let caused_by_creation = by_system.clone().causation_id(created.event_id.to_string());
        tally.add(&created);

        self.pacer.wait();
        let outcome = if rng.random_bool(self.failure_rate) {
            Err(pick(&mut rng, &PROVISION_ERRORS).to_owned())
        } else {
            Ok(())
        };
        let provisioned = sites::provision_site(self.outbox, conn, caused_by_creation, site_id, outcome)?;
        let active = provisioned.value.status == SiteStatus::Active;
        tally.add(&provisioned);

        if active {
            for _ in 0..rng.random_range(1..=3) {
                self.pacer.wait();
                let backup = backups::create_backup(self.outbox, conn, by_user.clone(), site_id)?;
                let backup_id = backup.value.id;
                let caused = by_system.clone().causation_id(backup.event_id.to_string());
                tally.add(&backup);

                self.pacer.wait();
                let finished = if rng.random_bool(self.failure_rate) {
                    let error = pick(&mut rng, &BACKUP_ERRORS);
                    backups::fail_backup(self.outbox, conn, caused, backup_id, error)?
                } else {
                    let size_bytes = rng.random_range(1_i64 << 20..=5_i64 << 30);
                    let duration_ms = rng.random_range(200..=600_000);
                    backups::complete_backup(self.outbox, conn, caused, backup_id, size_bytes, duration_ms)?
                };
                tally.add(&finished);
            }
        }

        if rng.random_bool(1.0 / 3.0) {
            self.pacer.wait();
            let deleted = sites::delete_site(self.outbox, conn, by_user, site_id)?;
            tally.add(&deleted);
        }
        Ok(())
    }
}

fn pick<'a>(rng: &mut StdRng, choices: &[&'a str]) -> &'a str {
    choices[rng.random_range(0..choices.len())]
}

/// One writer's count of transactions and recorded events.
#[derive(Debug, Default)]
struct Tally {
    transactions: u64,
    events: BTreeMap<&'static str, u64>,
    event_ids: Vec<Uuid>,
}

impl Tally {
    fn add<T>(&mut self, recorded: &Recorded<T>) {
        self.transactions += 1;
        *self.events.entry(recorded.event_type).or_default() += 1;
        self.event_ids.push(recorded.event_id);
    }

    fn merge(&mut self, other: Tally) {
        self.transactions += other.transactions;
        for (event_type, count) in other.events {
            *self.events.entry(event_type).or_default() += count;
        }
        self.event_ids.extend(other.event_ids);
    }
}

/// Counts, by type, the rows of `outbox_events` whose id is in `ids`.
fn count_in_outbox(conn: &mut PgConnection, ids: &[Uuid]) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for chunk in ids.chunks(VERIFY_CHUNK) {
        let rows: Vec<(String, i64)> = outbox_events::table
            .filter(outbox_events::event_id.eq_any(chunk))
            .group_by(outbox_events::event_type)
            .select((outbox_events::event_type, count_star()))
            .load(conn)?;
        for (event_type, count) in rows {
            *counts.entry(event_type).or_default() += count.unsigned_abs();
        }
    }
    Ok(counts)
}

/// Spaces transactions evenly to cap their rate across all writers: each
/// caller reserves the next free slot and sleeps until it. A writer that
/// falls behind does not earn a burst later.
#[derive(Debug)]
struct Pacer {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        let interval = rate
            .filter(|rate| *rate > 0.0)
            .map(|rate| Duration::from_secs_f64((1.0 / rate).min(3600.0)));
        Self {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    fn wait(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            // The guarded value is a plain Instant; a panic elsewhere cannot
            // leave it inconsistent.
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        let now = Instant::now();
        if slot > now {
            std::thread::sleep(slot - now);
        }
    }
}
