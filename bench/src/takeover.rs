//! `outbox bench takeover`: how long a crashed relay's rows wait. Two
//! relays drain a backlog; one is SIGKILLed while it holds rows; the clock
//! runs from the kill until the other relay has published every row the
//! dead one held. The bound is the lease (`--lease`, 3 s by default),
//! which the dead relay can no longer renew.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use serde::Serialize;

use super::broker::BenchQueue;
use super::drain::{backlog_is_empty, blocking, fill_backlog, on_connection};
use super::process::RelayProcess;
use super::stats::median;
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench takeover`.
#[derive(Debug, clap::Args)]
pub struct TakeoverArgs {
    /// Events in the backlog of each round.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Aggregates they are spread over.
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
    /// Rounds (kill, takeover); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Give up on a round after this long.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One round.
#[derive(Debug, Serialize)]
pub struct TakeoverRound {
    /// Rows the killed relay held unpublished when it died.
    pub held_rows: usize,
    /// From the SIGKILL until the survivor published all of them, seconds.
    pub takeover_seconds: f64,
}

/// The takeover figures.
#[derive(Debug, Serialize)]
pub struct TakeoverReport {
    /// Backlog per round.
    pub events: usize,
    /// Median takeover, seconds.
    pub median_takeover_seconds: f64,
    /// Every round.
    pub rounds: Vec<TakeoverRound>,
}

impl Report for TakeoverReport {
    fn table(&self) -> String {
        let mut out = format!(
            "takeover: 2 relays drain {} events, one SIGKILLed while holding rows (default lease 3 s)\n",
            self.events
        );
        for (n, round) in self.rounds.iter().enumerate() {
            out.push_str(&format!(
                "round {}: {} rows held, all published by the survivor {:.2} s after the kill\n",
                n + 1,
                round.held_rows,
                round.takeover_seconds
            ));
        }
        out.push_str(&format!(
            "median takeover {:.2} s\n",
            self.median_takeover_seconds
        ));
        out
    }
}

#[derive(QueryableByName)]
struct Held {
    #[diesel(sql_type = Array<BigInt>)]
    seqs: Vec<i64>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Unpublished rows held under live leases of `owner`.
fn held_rows(conn: &mut PgConnection, owner: &str) -> anyhow::Result<Vec<i64>> {
    Ok(diesel::sql_query(
        "SELECT COALESCE(array_agg(e.seq), '{}') AS seqs
           FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
           JOIN outbox_events e ON e.seq = s.seq
          WHERE l.owner = $1 AND l.expires_at > now() AND e.published_at IS NULL",
    )
    .bind::<diesel::sql_types::Text, _>(owner)
    .get_result::<Held>(conn)?
    .seqs)
}

fn still_unpublished(conn: &mut PgConnection, seqs: &[i64]) -> anyhow::Result<i64> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS n FROM outbox_events WHERE seq = ANY($1) AND published_at IS NULL",
    )
    .bind::<Array<BigInt>, _>(seqs)
    .get_result::<Count>(conn)?
    .n)
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &TakeoverArgs) -> anyhow::Result<TakeoverReport> {
    anyhow::ensure!(
        args.events > 0 && args.aggregates > 0 && args.rounds > 0,
        "--events, --aggregates and --rounds must be positive"
    );
    let db = scratch_database(&target.database_url, false).await?;
    let outcome = measure(target, args, &db).await;
    drop_database(db).await?;
    outcome
}

async fn measure(
    target: &BenchTarget,
    args: &TakeoverArgs,
    db: &outbox::testing::TestDatabase,
) -> anyhow::Result<TakeoverReport> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;
    let url = db.url().to_owned();
    let mut conn = blocking(move || Ok(outbox::connect(&url)?)).await?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let (url, events, aggregates) = (db.url().to_owned(), args.events, args.aggregates);
        blocking(move || fill_backlog(&url, events, aggregates)).await?;
        let doomed_id = format!("bench-takeover-doomed-{round}");
        let survivor_id = format!("bench-takeover-survivor-{round}");
        let doomed = RelayProcess::spawn(
            db.url(),
            &target.amqp_url,
            &queue.exchange,
            &["--relay-id", &doomed_id],
        )?;
        let survivor = RelayProcess::spawn(
            db.url(),
            &target.amqp_url,
            &queue.exchange,
            &["--relay-id", &survivor_id],
        )?;
        // Kill mid-drain: once both relays are under way (200 ms) and the
        // doomed one holds rows.
        let started = Instant::now();
        loop {
            let id = doomed_id.clone();
            let (back, (held, empty)) = on_connection(conn, move |conn| {
                Ok((held_rows(conn, &id)?, backlog_is_empty(conn)?))
            })
            .await?;
            conn = back;
            if !held.is_empty() && started.elapsed() > Duration::from_millis(200) {
                break;
            }
            anyhow::ensure!(
                !empty,
                "the backlog drained before the doomed relay was killed: use more --events"
            );
            anyhow::ensure!(
                started.elapsed() < args.timeout,
                "the doomed relay never held rows"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        doomed.kill()?;
        let killed = Instant::now();
        let id = doomed_id.clone();
        let (back, held) = on_connection(conn, move |conn| held_rows(conn, &id)).await?;
        conn = back;
        let takeover = loop {
            let seqs = held.clone();
            let (back, left) = on_connection(conn, move |conn| still_unpublished(conn, &seqs)).await?;
            conn = back;
            if left == 0 {
                break killed.elapsed();
            }
            anyhow::ensure!(
                killed.elapsed() < args.timeout,
                "the dead relay's rows were not taken over within {:?}",
                args.timeout
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        loop {
            let (back, empty) = on_connection(conn, backlog_is_empty).await?;
            conn = back;
            if empty {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < args.timeout,
                "backlog not drained within {:?}",
                args.timeout
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        survivor.stop()?;
        queue.purge().await?;
        rounds.push(TakeoverRound {
            held_rows: held.len(),
            takeover_seconds: takeover.as_secs_f64(),
        });
    }
    drop(queue);
    Ok(TakeoverReport {
        events: args.events,
        median_takeover_seconds: median(&rounds.iter().map(|r| r.takeover_seconds).collect::<Vec<_>>()),
        rounds,
    })
}
