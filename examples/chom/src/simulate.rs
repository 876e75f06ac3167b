//! A load generator: whole site lifecycles driven from concurrent writers,
//! then (unless turned off) the account events for each tenant: team changes, SSL
//! certificates and the expiry check, credential and token rotations, a
//! burst of failed sign-ins, and quotas met and exceeded, so a run records
//! all nineteen event types. Then a check that every event the services
//! reported is in the outbox.
//!
//! Each site's lifecycle is drawn from its own random generator, seeded from
//! the run's seed and the site's index, so a seed gives the same mix of
//! outcomes (and so the same event counts) whatever the thread scheduling.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use outbox::{Metadata, Outbox, PgPool};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{ChomError, Result};
use crate::events::EVENT_TYPES;
use crate::models::{Role, SiteStatus, Tenant, User};
use crate::services::quotas::{self, Limits};
use crate::services::security::{self, FailedLoginPolicy};
use crate::services::{Recorded, RecordedEvent, backups, sites, ssl, team, tenants};

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
    /// Run the account events for every tenant after the lifecycles ([`run`]).
    /// Default true.
    pub account_events: bool,
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
            account_events: true,
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
    /// Events the services reported recording, by type (every type).
    pub events: BTreeMap<String, u64>,
    /// Events of this run found in the outbox (`outbox_events`, or the
    /// event log the relay moves published rows to), by type.
    pub database_events: BTreeMap<String, u64>,
    /// Reported events found in neither table (0 when nothing was
    /// lost).
    pub missing_events: u64,
    /// Whether the services' counts and the table's agree exactly.
    pub verified: bool,
    /// Service transactions that recorded events (tenant setup excluded);
    /// one may record two (`backup.completed` and a quota event).
    pub transactions: u64,
    /// Wall time of the lifecycles and the account events, setup and verification
    /// excluded.
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
/// then counts this run's events in the outbox ([`count_recorded`]).
///
/// Each lifecycle: create the site; provision it (fails with probability
/// `failure_rate`); if active, 1 to 3 backups, each created then completed
/// or failed (probability `failure_rate`); delete about a third of the
/// sites. A service error stops the run and is returned. Then, with
/// `config.account_events`, the account events for each tenant, one after the other (see
/// the module's documentation), and the SSL expiry check once.
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
    let mut total = Tally::default();
    for outcome in outcomes {
        total.merge(outcome?);
    }
    if config.account_events {
        let mut conn = pool.get().map_err(outbox::Error::Pool)?;
        for (n, (tenant, owner)) in owners.iter().enumerate() {
            account_events(
                outbox,
                &mut conn,
                tenant,
                owner,
                &format!("{n}.{tag}"),
                &mut total,
            )?;
        }
        let expiring = ssl::check_expiring(outbox, &mut conn, Metadata::system(), EXPIRY_WINDOW_DAYS)?;
        for recorded in &expiring {
            total.add(recorded);
        }
    }
    let elapsed = started.elapsed();

    let mut conn = pool.get().map_err(outbox::Error::Pool)?;
    let database_events = count_recorded(&mut conn, &total.event_ids)?;
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

/// The expiry check's window in a run: the certificates the account events issue
/// expire in 10 days (warned about) and in 90 (not).
pub const EXPIRY_WINDOW_DAYS: u32 = 30;

/// The account events for one tenant, `label` making its names unique: an admin and a
/// member join the team, the member is removed, the admin becomes the owner;
/// a new active site gets a certificate expiring in 10 days and an older one
/// expiring in 90; a VPS and an API token are created and rotated (their
/// secrets dropped at once); five failed sign-ins of the owner raise an
/// incident; then limits are set at the tenant's usage, so one more site is
/// refused, the next backup takes storage over the limit, and two bandwidth
/// reports reach the month's limit.
fn account_events(
    outbox: &Outbox,
    conn: &mut PgConnection,
    tenant: &Tenant,
    owner: &User,
    label: &str,
    tally: &mut Tally,
) -> Result<()> {
    let by_owner = Metadata::by(format!("user:{}", owner.id));
    let domain = |what: &str| format!("{what}-{label}.sim.chom.test");

    let admin = tenants::create_user(conn, tenant.id, &format!("admin-{label}@sim.chom.test"), "Admin")?;
    let member = tenants::create_user(
        conn,
        tenant.id,
        &format!("member-{label}@sim.chom.test"),
        "Member",
    )?;
    tally.add(&team::change_role(
        outbox,
        conn,
        by_owner.clone(),
        admin.id,
        Role::Admin,
    )?);
    tally.add(&team::remove_member(outbox, conn, by_owner.clone(), member.id)?);
    tally.add(&team::transfer_ownership(
        outbox,
        conn,
        by_owner.clone(),
        tenant.id,
        admin.id,
    )?);

    let site = sites::create_site(outbox, conn, by_owner.clone(), tenant.id, &domain("secure"))?;
    tally.add(&site);
    let site_id = site.value.id;
    tally.add(&sites::provision_site(
        outbox,
        conn,
        Metadata::system(),
        site_id,
        Ok(()),
    )?);
    for days in [90, 10] {
        let requested = ssl::request_certificate(outbox, conn, by_owner.clone(), site_id)?;
        tally.add(&requested);
        let expires_at = chrono::Utc::now() + chrono::Duration::days(days);
        tally.add(&ssl::issue_certificate(
            outbox,
            conn,
            Metadata::system(),
            requested.value.id,
            "Simulated CA",
            expires_at,
        )?);
    }

    let (vps, _first) = security::add_vps(conn, tenant.id, &domain("vps"))?;
    tally.add(&security::rotate_vps_credentials(outbox, conn, by_owner.clone(), vps.id)?.recorded);
    let (token, _first) = security::create_api_token(conn, tenant.id, &format!("deploy {label}"))?;
    tally.add(&security::rotate_api_token(outbox, conn, by_owner.clone(), token.id)?.recorded);
    let policy = FailedLoginPolicy::default();
    for _ in 0..policy.threshold {
        let outcome = security::record_failed_login(
            outbox,
            conn,
            Metadata::system(),
            owner.id,
            "198.51.100.23",
            &policy,
        )?;
        if let Some(incident) = outcome.incident {
            tally.add(&incident);
        }
    }

    let usage = quotas::usage(conn, tenant.id, chrono::Utc::now())?;
    quotas::set_quota(
        conn,
        tenant.id,
        "simulated",
        &Limits {
            max_sites: Some(usage.sites),
            max_storage_bytes: Some(usage.storage_bytes),
            monthly_bandwidth_bytes: Some(usage.bandwidth_bytes + (1 << 30)),
        },
    )?;
    match sites::create_site(outbox, conn, by_owner.clone(), tenant.id, &domain("one-too-many")) {
        Err(ChomError::QuotaExceeded { event_id, .. }) => tally.add_events([RecordedEvent {
            event_id,
            event_type: crate::events::QUOTA_SITE_QUOTA_EXCEEDED,
        }]),
        Err(error) => return Err(error),
        Ok(created) => {
            return Err(ChomError::invalid(
                "simulate",
                format!("site {} was created over the site quota", created.value.id),
            ));
        }
    }
    let backup = backups::create_backup(outbox, conn, Metadata::system(), site_id)?;
    tally.add(&backup);
    tally.add(&backups::complete_backup(
        outbox,
        conn,
        Metadata::system(),
        backup.value.id,
        64 << 20,
        1_500,
    )?);
    for _ in 0..2 {
        let report = quotas::report_bandwidth(
            outbox,
            conn,
            Metadata::system(),
            site_id,
            600 << 20,
            chrono::Utc::now(),
        )?;
        if let Some(event) = report.event {
            tally.add_events([event]);
        }
    }
    Ok(())
}

/// One writer's count of transactions and recorded events.
#[derive(Debug, Default)]
struct Tally {
    transactions: u64,
    events: BTreeMap<&'static str, u64>,
    event_ids: Vec<Uuid>,
}

impl Tally {
    /// Counts a service transaction and every event it recorded.
    fn add<T>(&mut self, recorded: &Recorded<T>) {
        self.add_events(recorded.events());
    }

    /// Counts one transaction that recorded `events`.
    fn add_events(&mut self, events: impl IntoIterator<Item = RecordedEvent>) {
        self.transactions += 1;
        for event in events {
            *self.events.entry(event.event_type).or_default() += 1;
            self.event_ids.push(event.event_id);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.transactions += other.transactions;
        for (event_type, count) in other.events {
            *self.events.entry(event_type).or_default() += count;
        }
        self.event_ids.extend(other.event_ids);
    }
}

/// Counts, by type, the events whose id is in `ids` wherever the outbox
/// keeps them: `outbox_events`, or `outbox_event_log` once the relay moved
/// them there after publishing. One statement a chunk, so an event moved
/// meanwhile (deleted and inserted in one transaction) counts once.
pub fn count_recorded(conn: &mut PgConnection, ids: &[Uuid]) -> Result<BTreeMap<String, u64>> {
    #[derive(QueryableByName)]
    struct TypeCount {
        #[diesel(sql_type = diesel::sql_types::Text)]
        event_type: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut counts = BTreeMap::new();
    for chunk in ids.chunks(VERIFY_CHUNK) {
        let rows: Vec<TypeCount> = diesel::sql_query(
            "SELECT event_type, count(*) AS n FROM (
                 SELECT event_type FROM outbox_events WHERE event_id = ANY($1)
                 UNION ALL
                 SELECT event_type FROM outbox_event_log WHERE event_id = ANY($1)
             ) recorded
             GROUP BY event_type",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(chunk)
        .load(conn)?;
        for row in rows {
            *counts.entry(row.event_type).or_default() += row.n.unsigned_abs();
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
