//! What `record` adds to a one-row domain transaction.
//!
//! Runs the same transaction (INSERT one domain row, COMMIT) with and
//! without `outbox::record`, in alternating rounds on one connection, and
//! prints per-transaction medians and the throughput ratio. Figures are
//! relative to the same machine in the same run; nothing is asserted.
//!
//! ```text
//! cargo bench --bench record                 # 10 rounds of 2,000 transactions
//! RECORD_BENCH_ROUNDS=20 RECORD_BENCH_TXS=5000 cargo bench --bench record
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Text;
use outbox::{DomainEvent, Error, Metadata, TestDatabase};
use serde::Serialize;

#[derive(Serialize)]
struct SiteCreated {
    site_id: i64,
    tenant_id: i64,
    domain: String,
}

impl DomainEvent for SiteCreated {
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
struct Id {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `txs` transactions and returns each one's latency.
fn run(conn: &mut PgConnection, txs: usize, with_record: bool) -> Vec<Duration> {
    let metadata = Metadata::by("user:1").correlation_id("bench");
    (0..txs)
        .map(|n| {
            let started = Instant::now();
            conn.transaction::<_, Error, _>(|conn| {
                let domain = format!("site-{n}.example.com");
                let site =
                    diesel::sql_query("INSERT INTO sites (tenant_id, domain) VALUES (1, $1) RETURNING id")
                        .bind::<Text, _>(&domain)
                        .get_result::<Id>(conn)?;
                if with_record {
                    outbox::record_with(
                        conn,
                        &SiteCreated {
                            site_id: site.id,
                            tenant_id: 1,
                            domain,
                        },
                        &metadata,
                    )?;
                }
                Ok(())
            })
            .unwrap();
            started.elapsed()
        })
        .collect()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index]
}

fn main() {
    // `cargo test --benches` runs bench targets with no argument but "--bench"
    // absent; keep that smoke run tiny.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let rounds = if smoke {
        1
    } else {
        env_usize("RECORD_BENCH_ROUNDS", 10)
    };
    let txs = if smoke {
        50
    } else {
        env_usize("RECORD_BENCH_TXS", 2000)
    };

    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    diesel::sql_query(
        "CREATE TABLE sites (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                             tenant_id BIGINT NOT NULL, domain TEXT NOT NULL,
                             created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut conn)
    .unwrap();
    // Warm up caches and prepared statements.
    run(&mut conn, txs.min(200), true);
    run(&mut conn, txs.min(200), false);

    let mut plain_all = Vec::new();
    let mut outbox_all = Vec::new();
    let mut plain_rates = Vec::new();
    let mut outbox_rates = Vec::new();
    for _ in 0..rounds {
        for with_record in [false, true] {
            let started = Instant::now();
            let latencies = run(&mut conn, txs, with_record);
            let rate = txs as f64 / started.elapsed().as_secs_f64();
            if with_record {
                outbox_rates.push(rate);
                outbox_all.extend(latencies);
            } else {
                plain_rates.push(rate);
                plain_all.extend(latencies);
            }
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain_rate = med(plain_rates);
    let outbox_rate = med(outbox_rates);
    let plain_p50 = median(plain_all.clone());
    let outbox_p50 = median(outbox_all.clone());
    println!(
        "record() inside a one-row domain transaction, 1 connection, {rounds} rounds x {txs} transactions"
    );
    println!("{:<28} {:>12} {:>12} {:>12}", "", "tx/s (med)", "p50", "p99");
    println!(
        "{:<28} {:>12.0} {:>12.3?} {:>12.3?}",
        "domain row only",
        plain_rate,
        plain_p50,
        percentile(plain_all, 0.99)
    );
    println!(
        "{:<28} {:>12.0} {:>12.3?} {:>12.3?}",
        "domain row + record()",
        outbox_rate,
        outbox_p50,
        percentile(outbox_all, 0.99)
    );
    println!(
        "ratio (with / without): {:.3}; added p50 latency: {:.1} us",
        outbox_rate / plain_rate,
        (outbox_p50.as_secs_f64() - plain_p50.as_secs_f64()) * 1e6
    );
}
