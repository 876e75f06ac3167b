//! `outbox bench seed`: the seed summary's own five benchmarks, with the
//! real CHOM services (`chom::services`) against a scratch database, each
//! next to the seed's published figure and the target of 10x better.
//!
//! Definitions (one writer connection, sequential calls, the CHOM write
//! path's `Outbox` with its registry, so RecordMetrics runs after commit):
//!
//! - dispatch overhead: p50 of `sites::create_site` (site row + `site.created`
//!   recorded) minus p50 of the same transaction without `record` (the
//!   tenant `FOR KEY SHARE` lookup and the site INSERT), the two
//!   interleaved call by call; the cost `record` adds per event.
//!   Beside it, the `record` call alone inside an open transaction.
//! - site creation with events: p50 wall time of `sites::create_site`.
//! - full site lifecycle: create -> start provisioning -> provisioned ->
//!   backup created -> backup completed -> deleted (5 events, 6
//!   transactions), p50 wall time.
//! - 100 site creations: 100 `create_site` calls back to back, sites/s
//!   (median of 3 bursts).
//! - memory for 1,000 events: growth of this process's resident set while
//!   the services record 1,000 events (1,000 site creations, after a
//!   warm-up); beside it, the peak resident set of an `outbox relay`
//!   process delivering those 1,000 events to the broker.

use std::time::{Duration, Instant};

use anyhow::Context;
use chom::events::SiteCreated;
use chom::services::{backups, sites, tenants};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox::{Metadata, Outbox};
use serde::Serialize;

use super::broker::BenchQueue;
use super::drain::backlog_is_empty;
use super::process::{RelayProcess, memory_kib};
use super::stats::{median, ms, percentile};
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// Site creations measured for the dispatch overhead and the p50 (each
    /// paired with one creation without `record`).
    #[arg(long, default_value_t = 500)]
    creates: usize,
    /// Full lifecycles measured.
    #[arg(long, default_value_t = 100)]
    lifecycles: usize,
    /// Site creations per burst ("100 site creations").
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Events recorded for the memory figure.
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Give up waiting for the relay after this long.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One of the seed's benchmarks.
#[derive(Debug, Serialize)]
pub struct SeedRow {
    /// The seed's name for it.
    pub benchmark: &'static str,
    /// Unit of the three figures.
    pub unit: &'static str,
    /// Ours, measured now.
    pub ours: f64,
    /// The seed's published figure.
    pub seed: f64,
    /// 10x better than the seed.
    pub target: f64,
    /// Whether lower is better.
    pub lower_is_better: bool,
    /// Whether ours meets the target.
    pub met: bool,
    /// What exactly was measured.
    pub definition: &'static str,
}

/// The seed figures.
#[derive(Debug, Serialize)]
pub struct SeedReport {
    /// The five benchmarks.
    pub rows: Vec<SeedRow>,
    /// p50 of the creation transaction without `record`, ms.
    pub create_without_record_p50_ms: f64,
    /// p50 of the `record` call alone inside an open transaction
    /// (envelope, JSON, one INSERT round trip), ms.
    pub record_call_p50_ms: f64,
    /// p99 of `create_site`, ms.
    pub create_p99_ms: f64,
    /// Peak resident memory of the relay delivering the memory step's
    /// events, MiB.
    pub relay_peak_rss_mib: f64,
    /// Events the relay delivered in the memory step.
    pub relay_delivered: usize,
    /// Seconds from starting the relay to all of them broker-confirmed.
    pub relay_seconds: f64,
}

impl Report for SeedReport {
    fn table(&self) -> String {
        let mut out = String::from(
            "seed: the seed summary's benchmarks with the CHOM services (targets: 10x the seed's figures)\n",
        );
        out.push_str(&format!(
            "{:<28} {:>12} {:>12} {:>12} {:>8}  {}\n",
            "benchmark", "ours", "seed", "target", "status", "unit"
        ));
        for row in &self.rows {
            let bound = if row.lower_is_better { "<=" } else { ">=" };
            out.push_str(&format!(
                "{:<28} {:>12.4} {:>12} {:>12} {:>8}  {}\n",
                row.benchmark,
                row.ours,
                format!("{}", row.seed),
                format!("{bound} {}", row.target),
                if row.met { "met" } else { "not met" },
                row.unit
            ));
        }
        out.push_str(&format!(
            "create without record p50 {:.3} ms; record call alone p50 {:.3} ms; create p99 {:.3} ms; relay delivering {} events: {:.2} s, peak RSS {:.1} MiB\n",
            self.create_without_record_p50_ms,
            self.record_call_p50_ms,
            self.create_p99_ms,
            self.relay_delivered,
            self.relay_seconds,
            self.relay_peak_rss_mib
        ));
        out
    }
}

fn row(
    benchmark: &'static str,
    unit: &'static str,
    ours: f64,
    seed: f64,
    lower_is_better: bool,
    definition: &'static str,
) -> SeedRow {
    let target = if lower_is_better { seed / 10.0 } else { seed * 10.0 };
    SeedRow {
        benchmark,
        unit,
        ours,
        seed,
        target,
        lower_is_better,
        met: if lower_is_better {
            ours <= target
        } else {
            ours >= target
        },
        definition,
    }
}

#[derive(QueryableByName)]
struct NewId {
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    id: i64,
}

/// The creation transaction without `record`: what `create_site` does
/// minus the event.
fn create_without_record(conn: &mut PgConnection, tenant_id: i64, domain: &str) -> anyhow::Result<()> {
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        diesel::sql_query("SELECT id FROM tenants WHERE id = $1 FOR KEY SHARE")
            .bind::<BigInt, _>(tenant_id)
            .get_result::<NewId>(conn)?;
        diesel::sql_query(
            "INSERT INTO sites (tenant_id, domain, status) VALUES ($1, $2, 'pending') RETURNING id",
        )
        .bind::<BigInt, _>(tenant_id)
        .bind::<Text, _>(domain)
        .get_result::<NewId>(conn)?;
        Ok(())
    })?;
    Ok(())
}

/// Everything on the writer's connection (run on the blocking pool).
struct WriteFigures {
    with_record: Vec<Duration>,
    without_record: Vec<Duration>,
    record_calls: Vec<Duration>,
    lifecycles: Vec<Duration>,
    bursts: Vec<f64>,
    memory_growth_bytes: f64,
}

fn write_path(url: &str, args: &SeedArgs) -> anyhow::Result<WriteFigures> {
    let mut conn = outbox::connect(url)?;
    let registry = chom::listeners::registry(&chom::listeners::ListenerConfig::default())?;
    let outbox = Outbox::builder().registry(registry).build()?;
    let tenant = tenants::create_tenant(&mut conn, "Bench Hosting")?;
    let user = Metadata::by("user:1");
    let mut n = 0usize;
    let mut domain = || {
        n += 1;
        format!("site-{n}.bench.chom.test")
    };
    // Warm-up: connection caches, prepared statements, WAL.
    for _ in 0..20 {
        sites::create_site(&outbox, &mut conn, user.clone(), tenant.id, &domain())?;
        create_without_record(&mut conn, tenant.id, &domain())?;
    }

    let mut with_record = Vec::with_capacity(args.creates);
    let mut without_record = Vec::with_capacity(args.creates);
    for _ in 0..args.creates {
        let name = domain();
        let began = Instant::now();
        sites::create_site(&outbox, &mut conn, user.clone(), tenant.id, &name)?;
        with_record.push(began.elapsed());
        let name = domain();
        let began = Instant::now();
        create_without_record(&mut conn, tenant.id, &name)?;
        without_record.push(began.elapsed());
    }

    // Where the overhead goes: the record call alone (envelope, JSON, one
    // INSERT round trip) inside an open transaction.
    let mut record_calls = Vec::with_capacity(args.creates);
    for n in 0..args.creates {
        let event = SiteCreated {
            site_id: -1 - n as i64,
            tenant_id: tenant.id,
            domain: domain(),
        };
        conn.transaction::<_, outbox::Error, _>(|conn| {
            let began = Instant::now();
            outbox.record(conn, &event)?;
            record_calls.push(began.elapsed());
            Ok(())
        })?;
    }

    let mut lifecycles = Vec::with_capacity(args.lifecycles);
    for _ in 0..args.lifecycles {
        let name = domain();
        let began = Instant::now();
        let site = sites::create_site(&outbox, &mut conn, user.clone(), tenant.id, &name)?.value;
        sites::start_provisioning(&mut conn, site.id)?;
        sites::provision_site(&outbox, &mut conn, Metadata::system(), site.id, Ok(()))?;
        let backup = backups::create_backup(&outbox, &mut conn, user.clone(), site.id)?.value;
        backups::complete_backup(&outbox, &mut conn, Metadata::system(), backup.id, 1 << 20, 1500)?;
        sites::delete_site(&outbox, &mut conn, user.clone(), site.id)?;
        lifecycles.push(began.elapsed());
    }

    let mut bursts = Vec::new();
    for _ in 0..3 {
        let names: Vec<String> = (0..args.burst).map(|_| domain()).collect();
        let began = Instant::now();
        for name in &names {
            sites::create_site(&outbox, &mut conn, user.clone(), tenant.id, name)?;
        }
        bursts.push(args.burst as f64 / began.elapsed().as_secs_f64());
    }

    // The relay delivers exactly the memory step's events.
    diesel::sql_query("TRUNCATE outbox_events").execute(&mut conn)?;
    let names: Vec<String> = (0..args.events).map(|_| domain()).collect();
    let (before, _) = memory_kib("self");
    for name in &names {
        sites::create_site(&outbox, &mut conn, user.clone(), tenant.id, name)?;
    }
    let (after, _) = memory_kib("self");
    Ok(WriteFigures {
        with_record,
        without_record,
        record_calls,
        lifecycles,
        bursts,
        memory_growth_bytes: (after.saturating_sub(before) * 1024) as f64,
    })
}

/// Starts a relay, waits (bounded) until the backlog is empty; returns
/// (seconds, peak RSS MiB).
async fn deliver(target: &BenchTarget, db_url: &str, timeout: Duration) -> anyhow::Result<(f64, f64)> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;
    let mut relay = RelayProcess::spawn(db_url, &target.amqp_url, &queue.exchange, &[])?;
    let started = Instant::now();
    let url = db_url.to_owned();
    let mut conn = tokio::task::spawn_blocking(move || outbox::connect(&url)).await??;
    loop {
        let (back, remaining) = tokio::task::spawn_blocking(move || {
            let empty = backlog_is_empty(&mut conn);
            (conn, empty)
        })
        .await?;
        conn = back;
        relay.sample_memory();
        if remaining? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the relay did not deliver the events within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak = tokio::task::spawn_blocking(move || relay.stop()).await??;
    drop(queue);
    Ok((seconds, peak))
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &SeedArgs) -> anyhow::Result<SeedReport> {
    anyhow::ensure!(
        args.creates >= 1 && args.lifecycles >= 1 && args.burst >= 1 && args.events >= 1,
        "--creates, --lifecycles, --burst and --events must be positive"
    );
    anyhow::ensure!(
        args.creates <= 1_000_000
            && args.lifecycles <= 1_000_000
            && args.burst <= 1_000_000
            && args.events <= 1_000_000,
        "sizes above 1000000 are not supported"
    );
    let db = scratch_database(&target.database_url, true).await?;
    let outcome = async {
        let url = db.url().to_owned();
        let sizes = SeedArgs {
            creates: args.creates,
            lifecycles: args.lifecycles,
            burst: args.burst,
            events: args.events,
            timeout: args.timeout,
        };
        let figures = tokio::task::spawn_blocking(move || write_path(&url, &sizes))
            .await
            .context("the writer task failed")??;
        let (relay_seconds, relay_peak_rss_mib) = deliver(target, db.url(), args.timeout).await?;
        anyhow::Ok((figures, relay_seconds, relay_peak_rss_mib))
    }
    .await;
    drop_database(db).await?;
    let (mut figures, relay_seconds, relay_peak_rss_mib) = outcome?;

    let create_p50 = ms(percentile(&mut figures.with_record, 0.5));
    let create_p99 = ms(percentile(&mut figures.with_record, 0.99));
    let plain_p50 = ms(percentile(&mut figures.without_record, 0.5));
    let lifecycle_p50 = ms(percentile(&mut figures.lifecycles, 0.5));
    let rows = vec![
        row(
            "Event dispatch overhead",
            "ms per event",
            create_p50 - plain_p50,
            0.3,
            true,
            "p50 of create_site minus p50 of the same transaction without record, interleaved",
        ),
        row(
            "Site creation with events",
            "ms (p50)",
            create_p50,
            45.0,
            true,
            "p50 wall time of sites::create_site (site row + site.created in one transaction)",
        ),
        row(
            "Full site lifecycle",
            "ms (p50)",
            lifecycle_p50,
            120.0,
            true,
            "create, start provisioning, provisioned, backup created, backup completed, deleted: 6 transactions, 5 events",
        ),
        row(
            "100 site creations",
            "sites/s",
            median(&figures.bursts),
            15.0,
            false,
            "create_site called back to back on one connection, median of 3 bursts",
        ),
        row(
            "Memory (1000 events)",
            "MB",
            figures.memory_growth_bytes / 1_000_000.0,
            12.0,
            true,
            "growth of the writing process's resident set while the services record the events",
        ),
    ];
    Ok(SeedReport {
        rows,
        create_without_record_p50_ms: plain_p50,
        record_call_p50_ms: ms(percentile(&mut figures.record_calls, 0.5)),
        create_p99_ms: create_p99,
        relay_peak_rss_mib,
        relay_delivered: args.events,
        relay_seconds,
    })
}
