//! `outbox bench projection`: a rebuild of CHOM's `tenant_stats`
//! projection (`update_tenant_metrics`) from a large event log, events per
//! second, next to a plain scan of the same log in the same run.
//!
//! The log is filled with SQL (CHOM event types round-robin over the
//! tenants, payloads as CHOM records them) beside source tables of a
//! realistic size, so each rebuild batch recounts the tenants it names
//! from real rows. The raw figure reads the same log, the same columns,
//! the same batches in position order (`outbox::event_log::read_after`)
//! and applies nothing.

use std::time::Instant;

use anyhow::Context;
use diesel::RunQueryDsl;
use serde::Serialize;

use super::{BenchTarget, Report};

/// Options of `outbox bench projection`.
#[derive(Debug, clap::Args)]
pub struct ProjectionArgs {
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Tenants the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    tenants: i64,
    /// Sites in the source table (backups: twice as many).
    #[arg(long, default_value_t = 20_000)]
    sites: i64,
    /// Events a rebuild batch (and a scan page).
    #[arg(long, default_value_t = outbox::projection::REBUILD_BATCH)]
    batch: i64,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The projection figures.
#[derive(Debug, Serialize)]
pub struct ProjectionReport {
    /// Events in the log.
    pub events: i64,
    /// Tenants.
    pub tenants: i64,
    /// Plain scan events/s, each round.
    pub scan_per_second: Vec<f64>,
    /// Rebuild events/s, each round.
    pub rebuild_per_second: Vec<f64>,
    /// Median of scan_per_second.
    pub scan_median: f64,
    /// Median of rebuild_per_second.
    pub rebuild_median: f64,
    /// rebuild_median / scan_median (target 0.5).
    pub ratio: f64,
}

impl Report for ProjectionReport {
    fn table(&self) -> String {
        format!(
            "projection: rebuild of update_tenant_metrics (tenant_stats) from {} logged events, {} tenants (median of {} rounds)\n\
             {:<34} {:>12}\n{:<34} {:>12.0}\n{:<34} {:>12.0}\nratio {:.3} (target 0.5)\n",
            self.events,
            self.tenants,
            self.scan_per_second.len(),
            "",
            "events/s",
            "plain scan of the log",
            self.scan_median,
            "rebuild",
            self.rebuild_median,
            self.ratio
        )
    }
}

fn fill(conn: &mut diesel::PgConnection, args: &ProjectionArgs) -> anyhow::Result<()> {
    let sql = |conn: &mut diesel::PgConnection, text: &str| {
        diesel::sql_query(text)
            .execute(conn)
            .with_context(|| format!("cannot fill the scratch database: {text}"))
    };
    sql(
        conn,
        &format!(
            "INSERT INTO tenants (name) SELECT 'tenant ' || t FROM generate_series(1, {}) t",
            args.tenants
        ),
    )?;
    sql(
        conn,
        &format!(
            "INSERT INTO sites (tenant_id, domain, status, storage_bytes, deleted_at)
             SELECT 1 + s % {t}, 'site' || s || '.example.com',
                    (ARRAY['pending', 'active', 'active', 'failed'])[1 + s % 4], (s % 1000) * 1024,
                    CASE WHEN s % 10 = 0 THEN now() END
             FROM generate_series(1, {n}) s",
            t = args.tenants,
            n = args.sites
        ),
    )?;
    sql(
        conn,
        &format!(
            "INSERT INTO backups (site_id, tenant_id, status)
             SELECT 1 + b % {n}, 1 + (b % {n}) % {t}, (ARRAY['completed', 'completed', 'failed'])[1 + b % 3]
             FROM generate_series(1, {b}) b",
            t = args.tenants,
            n = args.sites,
            b = args.sites * 2
        ),
    )?;
    sql(conn, "ANALYZE tenants, sites, backups")?;
    sql(
        conn,
        &format!(
            "INSERT INTO outbox_event_log
                 (seq, event_id, event_type, aggregate_type, aggregate_id, tenant_id, occurred_at,
                  schema_version, payload, recorded_at, published_at)
             SELECT e, gen_random_uuid(),
                    (ARRAY['site.created', 'site.provisioned', 'backup.created', 'backup.completed', 'site.deleted'])[1 + e % 5],
                    'site', (1 + e % {n})::text, (1 + (e % {n}) % {t})::text, now(), 1,
                    jsonb_build_object('site_id', 1 + e % {n}, 'tenant_id', 1 + (e % {n}) % {t},
                                       'domain', 'site' || (1 + e % {n}) || '.example.com'),
                    now(), now()
             FROM generate_series(1, {events}) e",
            n = args.sites,
            t = args.tenants,
            events = args.events
        ),
    )?;
    sql(conn, "VACUUM ANALYZE outbox_event_log")?;
    Ok(())
}

fn scan(conn: &mut diesel::PgConnection, types: &[String], batch: i64) -> anyhow::Result<(i64, f64)> {
    let started = Instant::now();
    let (mut position, mut events) = (0, 0i64);
    loop {
        let page = outbox::event_log::read_after(conn, position, Some(types), batch)?;
        let Some(last) = page.last() else { break };
        position = last.position;
        events += page.len() as i64;
    }
    Ok((events, started.elapsed().as_secs_f64()))
}

/// Runs the benchmark.
pub async fn run(target: &BenchTarget, args: &ProjectionArgs) -> anyhow::Result<ProjectionReport> {
    anyhow::ensure!(
        args.events >= 1 && args.tenants >= 1 && args.sites >= 1 && args.rounds >= 1 && args.batch >= 1,
        "--events, --tenants, --sites, --batch and --rounds must be positive"
    );
    let db = super::scratch_database(&target.database_url, true).await?;
    let url = db.url().to_owned();
    let (events, tenants, sites, batch, rounds) =
        (args.events, args.tenants, args.sites, args.batch, args.rounds);
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let mut conn = outbox::connect(&url)?;
        eprintln!("filling the log with {events} events");
        fill(
            &mut conn,
            &ProjectionArgs {
                events,
                tenants,
                sites,
                batch,
                rounds,
            },
        )?;
        let projection = chom::listeners::UpdateTenantMetrics;
        let types = outbox::projection::Projection::event_types(&projection);
        let upcasters = outbox::upcast::Upcasters::new();
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            eprintln!("round {}: plain scan", round + 1);
            let (scanned, secs) = scan(&mut conn, &types, batch)?;
            anyhow::ensure!(scanned == events, "the scan read {scanned} of {events} events");
            raw.push(scanned as f64 / secs);
            eprintln!("round {}: rebuild", round + 1);
            let report = outbox::projection::rebuild(&mut conn, &projection, &upcasters, batch)?;
            anyhow::ensure!(
                report.events == events,
                "the rebuild applied {} of {events} events",
                report.events
            );
            ours.push(report.events as f64 / report.seconds);
        }
        Ok((raw, ours))
    })
    .await
    .context("the benchmark task failed")?;
    super::drop_database(db).await?;
    let (raw, ours) = outcome?;
    let scan_median = super::stats::median(&raw);
    let rebuild_median = super::stats::median(&ours);
    Ok(ProjectionReport {
        events: args.events,
        tenants: args.tenants,
        scan_per_second: raw,
        rebuild_per_second: ours,
        scan_median,
        rebuild_median,
        ratio: if scan_median > 0.0 {
            rebuild_median / scan_median
        } else {
            0.0
        },
    })
}
