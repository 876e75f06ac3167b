//! `outbox bench write`: what `record` costs concurrent writers.

use std::time::{Duration, Instant};

use anyhow::Context;

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
    /// Transactions/s with one domain row + `record` + a wake-up of the
    /// relays after each commit (`Outbox::wake_relays`), median of rounds.
    pub wake_tps: f64,
    /// wake_tps / outbox_tps: what the wake-up path costs writers.
    pub wake_ratio: f64,
    /// Median transaction latency with `record` and the wake-up, ms.
    pub wake_p50_ms: f64,
    /// NOTIFYs the wake-up sender sent in all wake-up phases (coalesced:
    /// far fewer than the commits).
    pub notifies_sent: u64,
    /// The same two transactions run by pgbench (`-M prepared`, same
    /// writers and duration, in every round): (domain row only, domain row
    /// and the outbox row `record` inserts), medians of rounds,
    /// transactions/s; `None` without pgbench.
    pub pgbench_tps: Option<(f64, f64)>,
    /// What `record` costs over the same SQL sent by pgbench:
    /// 1 - outbox_tps / pgbench outbox tps.
    pub record_overhead_over_pgbench: Option<f64>,
    /// Every round's rates: (plain, outbox, outbox + wake-up).
    pub rounds: Vec<(f64, f64, f64)>,
}

impl Report for WriteReport {
    fn table(&self) -> String {
        let pgbench = match (self.pgbench_tps, self.record_overhead_over_pgbench) {
            (Some((plain, outbox)), Some(overhead)) => format!(
                "pgbench, same SQL: {plain:.0} tx/s domain row only, {outbox:.0} tx/s with the outbox row; record() adds {:.1}% over it\n",
                overhead * 100.0
            ),
            _ => "pgbench not found: no raw-SQL comparison\n".to_owned(),
        };
        let mut out = format!(
            "write: {} concurrent writers, each transaction one domain row (median of {} rounds)\n\
             {:<30} {:>10} {:>10}\n\
             {:<30} {:>10.0} {:>10.3}\n\
             {:<30} {:>10.0} {:>10.3}\n\
             {:<30} {:>10.0} {:>10.3}\n\
             ratio {:.3}; added p50 latency {:.3} ms; with the wake-up path {:.3} of record() alone ({} NOTIFYs sent)\n",
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
            "domain row + record() + wake-up",
            self.wake_tps,
            self.wake_p50_ms,
            self.ratio,
            self.added_p50_ms,
            self.wake_ratio,
            self.notifies_sent
        );
        out.push_str(&pgbench);
        out
    }
}

/// The transaction pgbench runs: the same statements `phase` sends with
/// `record`, or without the outbox row.
fn pgbench_script(with_outbox_row: bool) -> String {
    let mut script = String::from(
        "\\set n random(1, 2000000000)\n\
         BEGIN;\n\
         INSERT INTO sites (tenant_id, domain) VALUES (:client_id, 'pg' || :n || '.example.com') RETURNING id \\gset\n",
    );
    if with_outbox_row {
        // gen_random_uuid() (v4) spreads inserts over the event_id index
        // where record()'s v7 ids append: if anything, pgbench pays more.
        script.push_str(
            "INSERT INTO outbox_events (event_id, event_type, aggregate_type, aggregate_id, tenant_id, occurred_at, \
             actor, correlation_id, causation_id, traceparent, schema_version, payload) \
             VALUES (gen_random_uuid(), 'site.created', 'site', :id, :client_id, now(), NULL, NULL, NULL, NULL, 1, \
             ('{\"site_id\": ' || :id || ', \"tenant_id\": ' || :client_id || ', \"domain\": \"pg' || :n || '.example.com\"}')::jsonb);\n",
        );
    }
    script.push_str("COMMIT;\n");
    script
}

/// Runs pgbench with `script` and returns its transactions/s, or `None`
/// when pgbench is not installed.
fn pgbench_tps(url: &str, writers: usize, duration: Duration, script: &str) -> anyhow::Result<Option<f64>> {
    let path = std::env::temp_dir().join(format!("outbox-bench-{}.sql", uuid::Uuid::now_v7().simple()));
    std::fs::write(&path, script).context("cannot write the pgbench script")?;
    let output = std::process::Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &writers.to_string()])
        .args(["-T", &duration.as_secs().max(1).to_string()])
        .arg("-f")
        .arg(&path)
        .arg(url)
        .output();
    let _ = std::fs::remove_file(&path);
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("cannot run pgbench"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps line in pgbench's output: {stdout}"))?;
    Ok(Some(tps))
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
    waker: Option<&outbox::Outbox>,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = (0..writers)
        .map(|writer| {
            let url = url.to_owned();
            let waker = waker.cloned();
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
                    if let Some(waker) = &waker {
                        waker.wake_relays();
                    }
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

fn waker_sent(outbox: &outbox::Outbox) -> u64 {
    outbox.wake_sender().map_or(0, outbox::wake::WakeSender::sent)
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
        phase(db.url(), writers, Duration::from_millis(500), true, None)?;
        // One sender for the whole process, as a service has one Outbox.
        let waker = outbox::Outbox::builder().wake_relays(db.url()).build()?;
        let mut plain_latencies = Vec::new();
        let mut outbox_latencies = Vec::new();
        let mut wake_latencies = Vec::new();
        let mut per_round = Vec::new();
        let mut pgbench_rounds = Vec::new();
        for _ in 0..rounds {
            let (plain_rate, plain) = phase(db.url(), writers, duration, false, None)?;
            let (outbox_rate, with) = phase(db.url(), writers, duration, true, None)?;
            let (wake_rate, woken) = phase(db.url(), writers, duration, true, Some(&waker))?;
            // pgbench in every round too, so both see the same conditions.
            let raw_plain = pgbench_tps(db.url(), writers, duration, &pgbench_script(false))?;
            let raw_outbox = pgbench_tps(db.url(), writers, duration, &pgbench_script(true))?;
            if let Some(both) = raw_plain.zip(raw_outbox) {
                pgbench_rounds.push(both);
            }
            plain_latencies.extend(plain);
            outbox_latencies.extend(with);
            wake_latencies.extend(woken);
            per_round.push((plain_rate, outbox_rate, wake_rate));
        }
        let plain_tps = median(&per_round.iter().map(|r| r.0).collect::<Vec<_>>());
        let outbox_tps = median(&per_round.iter().map(|r| r.1).collect::<Vec<_>>());
        let wake_tps = median(&per_round.iter().map(|r| r.2).collect::<Vec<_>>());
        let plain_p50 = ms(percentile(&mut plain_latencies, 0.5));
        let outbox_p50 = ms(percentile(&mut outbox_latencies, 0.5));
        let wake_p50 = ms(percentile(&mut wake_latencies, 0.5));
        let notifies_sent = waker_sent(&waker);
        let pgbench = (!pgbench_rounds.is_empty()).then(|| {
            (
                median(&pgbench_rounds.iter().map(|r| r.0).collect::<Vec<_>>()),
                median(&pgbench_rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            )
        });
        Ok(WriteReport {
            writers,
            plain_tps,
            outbox_tps,
            ratio: outbox_tps / plain_tps,
            plain_p50_ms: plain_p50,
            outbox_p50_ms: outbox_p50,
            added_p50_ms: outbox_p50 - plain_p50,
            wake_tps,
            wake_ratio: wake_tps / outbox_tps,
            wake_p50_ms: wake_p50,
            notifies_sent,
            pgbench_tps: pgbench,
            record_overhead_over_pgbench: pgbench.map(|(_, raw)| 1.0 - outbox_tps / raw),
            rounds: per_round,
        })
    })
    .await?
}
