//! `outbox bench pinned`: the drain rate of one relay, round after round,
//! while a `REPEATABLE READ` snapshot is held open in its database (an
//! analytics query, a forgotten `psql` session), next to the rate of the
//! same rounds without it. While the snapshot is open vacuum can remove no
//! row published after it was taken, so every round leaves its dead tuples
//! behind for the next.

use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use outbox::testing::TestDatabase;
use serde::Serialize;

use super::broker::BenchQueue;
use super::drain::{append_backlog, backlog_is_empty, blocking, on_connection};
use super::process::RelayProcess;
use super::stats::median;
use super::{BenchTarget, Report, drop_database, scratch_database};
use crate::duration::parse_duration;

/// Options of `outbox bench pinned`.
#[derive(Debug, clap::Args)]
pub struct PinnedArgs {
    /// Events in each round's backlog.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Aggregates they are spread over (round robin).
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
    /// Rounds drained before the snapshot is taken (the unpinned rate is
    /// their median).
    #[arg(long, default_value_t = 3)]
    unpinned_rounds: usize,
    /// Rounds drained while the snapshot is open.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// The relay's --batch-size.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// The relay's --max-in-flight.
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Give up on a round after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
}

/// One round: a backlog committed at once, drained to broker-confirmed.
#[derive(Debug, Serialize)]
pub struct PinnedRound {
    /// Whether the snapshot was open.
    pub pinned: bool,
    /// Commit of the backlog -> its last event at the broker.
    pub seconds: f64,
    /// Events per second.
    pub events_per_second: f64,
    /// Dead tuples in `outbox_events` after the round (the statistics
    /// collector's figure).
    pub dead_tuples: i64,
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct PinnedReport {
    /// Events per round.
    pub events: usize,
    /// Aggregates.
    pub aggregates: usize,
    /// Median rate of the rounds without the snapshot.
    pub unpinned_events_per_second: f64,
    /// Median rate of the rounds with it.
    pub pinned_events_per_second: f64,
    /// The last pinned round's rate over the unpinned rate (target >= 0.9).
    pub last_round_ratio: f64,
    /// Every round in order.
    pub rounds: Vec<PinnedRound>,
}

impl Report for PinnedReport {
    fn table(&self) -> String {
        let mut out = format!(
            "pinned: rounds of {} events on {} aggregates, one relay, a REPEATABLE READ snapshot held open from round {}\n",
            self.events,
            self.aggregates,
            self.rounds.iter().position(|r| r.pinned).map_or(0, |n| n + 1)
        );
        out.push_str(&format!(
            "{:<8} {:>7} {:>10} {:>12} {:>14}\n",
            "round", "pinned", "seconds", "events/s", "dead tuples"
        ));
        for (n, round) in self.rounds.iter().enumerate() {
            out.push_str(&format!(
                "{:<8} {:>7} {:>10.2} {:>12.0} {:>14}\n",
                n + 1,
                if round.pinned { "yes" } else { "no" },
                round.seconds,
                round.events_per_second,
                round.dead_tuples
            ));
        }
        out.push_str(&format!(
            "unpinned median {:.0}/s, pinned median {:.0}/s, last pinned round {:.2} of unpinned (target >= 0.9)\n",
            self.unpinned_events_per_second, self.pinned_events_per_second, self.last_round_ratio
        ));
        out
    }
}

/// Runs the scenario.
pub async fn run(target: &BenchTarget, args: &PinnedArgs) -> anyhow::Result<PinnedReport> {
    anyhow::ensure!(
        args.events > 0 && args.aggregates > 0 && args.unpinned_rounds > 0 && args.rounds > 0,
        "--events, --aggregates, --unpinned-rounds and --rounds must be positive"
    );
    let db = scratch_database(&target.database_url, false).await?;
    let outcome = measure(target, args, &db).await;
    drop_database(db).await?;
    outcome
}

async fn measure(target: &BenchTarget, args: &PinnedArgs, db: &TestDatabase) -> anyhow::Result<PinnedReport> {
    let queue = BenchQueue::declare(&target.amqp_url).await?;
    let batch = args.batch_size.to_string();
    let in_flight = args.max_in_flight.to_string();
    let relay = RelayProcess::spawn(
        db.url(),
        &target.amqp_url,
        &queue.exchange,
        &["--batch-size", &batch, "--max-in-flight", &in_flight],
    )?;
    let outcome = rounds(args, db, &queue).await;
    relay.stop()?;
    outcome
}

async fn rounds(args: &PinnedArgs, db: &TestDatabase, queue: &BenchQueue) -> anyhow::Result<PinnedReport> {
    let url = db.url().to_owned();
    let mut conn = blocking(move || Ok(outbox::connect(&url)?)).await?;
    let mut pin: Option<PgConnection> = None;
    let mut rounds = Vec::new();
    for n in 0..args.unpinned_rounds + args.rounds {
        if n == args.unpinned_rounds {
            let url = db.url().to_owned();
            pin = Some(hold_snapshot(url).await?);
        }
        let (events, aggregates) = (args.events, args.aggregates);
        let (back, ()) = on_connection(conn, move |conn| {
            conn.transaction::<_, anyhow::Error, _>(|conn| append_backlog(conn, events, aggregates))?;
            // The relay hears of the commit at once instead of at its next poll.
            conn.batch_execute(&format!("NOTIFY {}", outbox::wake::CHANNEL))?;
            Ok(())
        })
        .await?;
        conn = back;
        let started = Instant::now();
        wait_for_messages(queue, args.events, args.timeout).await?;
        let seconds = started.elapsed().as_secs_f64();
        // Marks trail the confirms by a few milliseconds: the next round
        // starts from an empty backlog.
        let deadline = Instant::now() + args.timeout;
        loop {
            let (back, empty) = on_connection(conn, backlog_is_empty).await?;
            conn = back;
            if empty {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "round {} never marked its rows", n + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        queue.purge().await?;
        let (back, dead_tuples) = on_connection(conn, dead_tuples).await?;
        conn = back;
        rounds.push(PinnedRound {
            pinned: pin.is_some(),
            seconds,
            events_per_second: args.events as f64 / seconds,
            dead_tuples,
        });
    }
    if let Some(pin) = pin {
        release_snapshot(pin).await?;
    }
    let rates = |pinned: bool| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.pinned == pinned)
            .map(|r| r.events_per_second)
            .collect()
    };
    let unpinned = median(&rates(false));
    let pinned = median(&rates(true));
    let last = rounds.last().map_or(0.0, |r| r.events_per_second);
    Ok(PinnedReport {
        events: args.events,
        aggregates: args.aggregates,
        unpinned_events_per_second: unpinned,
        pinned_events_per_second: pinned,
        last_round_ratio: last / unpinned,
        rounds,
    })
}

/// Opens a connection to `url` holding a `REPEATABLE READ` snapshot, as a
/// long analytics query or a forgotten `psql` session does: vacuum keeps
/// every row version that died after it until [`release_snapshot`].
pub(crate) async fn hold_snapshot(url: String) -> anyhow::Result<PgConnection> {
    blocking(move || {
        let mut pin = outbox::connect(&url)?;
        // The snapshot is taken by the first query and kept until the
        // transaction ends.
        pin.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM outbox_control;")?;
        Ok(pin)
    })
    .await
}

/// Ends the snapshot [`hold_snapshot`] took.
pub(crate) async fn release_snapshot(mut pin: PgConnection) -> anyhow::Result<()> {
    blocking(move || Ok(pin.batch_execute("ROLLBACK")?)).await
}

/// Waits until the bench queue holds `count` messages: the broker's own
/// count, independent of what the relay's tables say.
async fn wait_for_messages(queue: &BenchQueue, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let declared = queue
            .channel
            .queue_declare(
                queue.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot look at the bench queue")?;
        if declared.message_count() as usize >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not reach the broker within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Dead row versions in `outbox_events`, as the statistics views count them.
pub(crate) fn dead_tuples(conn: &mut PgConnection) -> anyhow::Result<i64> {
    #[derive(QueryableByName)]
    struct Dead {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    // The collector's figures lag by up to a second; ask it to flush ours.
    conn.batch_execute("SELECT pg_stat_force_next_flush()")?;
    Ok(diesel::sql_query(
        "SELECT COALESCE((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox_events'), 0) AS n",
    )
    .get_result::<Dead>(conn)?
    .n)
}
