//! `outbox bench write`: what `record` costs concurrent writers.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use outbox::testing::TestDatabase;
use serde::Serialize;

use super::stats::{median, ms, percentile};
use super::{BenchTarget, Report};
use crate::duration::parse_duration;

/// Options of `outbox bench write`.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Length of each measured phase.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Rounds of (without, with) phases; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The writer figures.
#[derive(Debug, Serialize)]
pub struct WriteReport {
    /// Writers.
    pub writers: usize,
    /// Transactions/s with one domain row only (median of rounds).
    pub plain_tps: f64,
    /// Transactions/s with one domain row + `record` (median of rounds).
    pub outbox_tps: f64,
    /// outbox_tps / plain_tps.
    pub ratio: f64,
    /// Median transaction latency without `record`, ms.
    pub plain_p50_ms: f64,
    /// Median transaction latency with `record`, ms.
    pub outbox_p50_ms: f64,
    /// The difference, ms.
    pub added_p50_ms: f64,
    /// Every round's rates: (plain, outbox).
    pub rounds: Vec<(f64, f64)>,
}

impl Report for WriteReport {
    fn table(&self) -> String {
        format!(
            "write: {} concurrent writers, each transaction one domain row (median of {} rounds)\n\
             {:<30} {:>10} {:>10}\n\
             {:<30} {:>10.0} {:>10.3}\n\
             {:<30} {:>10.0} {:>10.3}\n\
             ratio {:.3}; added p50 latency {:.3} ms; no wake-up signal is sent by writers\n",
            self.writers,
            self.rounds.len(),
            "",
            "tx/s",
            "p50 ms",
            "domain row only",
            self.plain_tps,
            self.plain_p50_ms,
            "domain row + record()",
            self.outbox_tps,
            self.outbox_p50_ms,
            self.ratio,
            self.added_p50_ms
        )
    }
}

#[derive(Serialize)]
struct SiteCreated {
    site_id: i64,
    tenant_id: i64,
    domain: String,
}

impl outbox::DomainEvent for SiteCreated {
    fn event_type(&self) -> &'static str {
        "site.created"
    }
    fn aggregate_type(&self) -> &'static str {
        "site"
    }
    fn aggregate_id(&self) -> String {
        self.site_id.to_string()
    }
    fn tenant_id(&self) -> Option<String> {
        Some(self.tenant_id.to_string())
    }
}

#[derive(QueryableByName)]
struct NewId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// One phase: every writer commits as fast as it can until the deadline.
/// Returns (transactions/s, per-transaction latencies).
fn phase(
    url: &str,
    writers: usize,
    duration: Duration,
    with_record: bool,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = (0..writers)
        .map(|writer| {
            let url = url.to_owned();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut conn = outbox::connect(&url)?;
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let began = Instant::now();
                    conn.transaction::<_, outbox::Error, _>(|conn| {
                        let domain = format!("w{writer}-{n}.example.com");
                        let site = diesel::sql_query(
                            "INSERT INTO sites (tenant_id, domain) VALUES ($1, $2) RETURNING id",
                        )
                        .bind::<BigInt, _>(writer as i64)
                        .bind::<Text, _>(&domain)
                        .get_result::<NewId>(conn)?;
                        if with_record {
                            outbox::record(
                                conn,
                                &SiteCreated {
                                    site_id: site.id,
                                    tenant_id: writer as i64,
                                    domain,
                                },
                            )?;
                        }
                        Ok(())
                    })?;
                    latencies.push(began.elapsed());
                    n += 1;
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        let latencies = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        all.extend(latencies);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, all))
}

/// Runs the scenario (blocking work on the blocking pool).
pub async fn run(target: &BenchTarget, args: &WriteArgs) -> anyhow::Result<WriteReport> {
    anyhow::ensure!(
        (1..=256).contains(&args.writers),
        "--writers must be between 1 and 256"
    );
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let (server, writers, duration, rounds) = (
        target.database_url.clone(),
        args.writers,
        args.duration,
        args.rounds,
    );
    tokio::task::spawn_blocking(move || -> anyhow::Result<WriteReport> {
        let db = TestDatabase::create_on(&server)?;
        let mut conn = db.connect()?;
        outbox::migrate(&mut conn)?;
        diesel::sql_query(
            "CREATE TABLE sites (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                 tenant_id BIGINT NOT NULL, domain TEXT NOT NULL,
                                 created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&mut conn)?;
        // Warm up connections, caches and the WAL.
        phase(db.url(), writers, Duration::from_millis(500), true)?;
        let mut plain_latencies = Vec::new();
        let mut outbox_latencies = Vec::new();
        let mut per_round = Vec::new();
        for _ in 0..rounds {
            let (plain_rate, plain) = phase(db.url(), writers, duration, false)?;
            let (outbox_rate, with) = phase(db.url(), writers, duration, true)?;
            plain_latencies.extend(plain);
            outbox_latencies.extend(with);
            per_round.push((plain_rate, outbox_rate));
        }
        let plain_tps = median(&per_round.iter().map(|r| r.0).collect::<Vec<_>>());
        let outbox_tps = median(&per_round.iter().map(|r| r.1).collect::<Vec<_>>());
        let plain_p50 = ms(percentile(&mut plain_latencies, 0.5));
        let outbox_p50 = ms(percentile(&mut outbox_latencies, 0.5));
        Ok(WriteReport {
            writers,
            plain_tps,
            outbox_tps,
            ratio: outbox_tps / plain_tps,
            plain_p50_ms: plain_p50,
            outbox_p50_ms: outbox_p50,
            added_p50_ms: outbox_p50 - plain_p50,
            rounds: per_round,
        })
    })
    .await?
}
