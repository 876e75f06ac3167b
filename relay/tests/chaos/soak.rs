//! What a soak adds to the chaos run's verdict: the memory of the relay
//! and the worker that live the whole run, sampled over time, and per
//! minute how many events the ordered listener applied and the p99 from
//! the event's insert to its effect (commit -> handled, give or take the
//! writers' pause of at most 3 ms before their commit).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Text};

use crate::processes::Slot;

/// Samples of the surviving relay's and worker's resident memory.
pub struct MemorySampler {
    every: Duration,
    started: Instant,
    next: Instant,
    /// (seconds into the run, relay KiB, worker KiB).
    samples: Vec<(f64, u64, u64)>,
}

impl MemorySampler {
    pub fn new(every: Duration) -> Self {
        let now = Instant::now();
        Self {
            every,
            started: now,
            // Not at the start: a process just spawned has no heap yet.
            next: now + every,
            samples: Vec::new(),
        }
    }

    /// Samples both if a period has passed since the last sample.
    pub fn sample(&mut self, relay: &Slot, worker: &Slot) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.every;
        if let (Some(r), Some(w)) = (relay.rss_kib(), worker.rss_kib()) {
            self.samples
                .push((now.duration_since(self.started).as_secs_f64(), r, w));
        }
    }

    /// Growth beyond noise, in words (empty when flat): the median of the
    /// last third of the samples against the median of the samples after
    /// the first third (warm-up), allowed 20% plus 4 MiB. Needs at least
    /// nine samples (4.5 minutes); a shorter run is not judged.
    pub fn growth(&self) -> Vec<String> {
        if self.samples.len() < 9 {
            return Vec::new();
        }
        let third = self.samples.len() / 3;
        let median = |values: &mut Vec<u64>| {
            values.sort_unstable();
            values[values.len() / 2]
        };
        let mut grown = Vec::new();
        for (name, pick) in [
            (
                "relay",
                (|s: &(f64, u64, u64)| s.1) as fn(&(f64, u64, u64)) -> u64,
            ),
            ("worker", |s: &(f64, u64, u64)| s.2),
        ] {
            let early = median(&mut self.samples[third..2 * third].iter().map(pick).collect());
            let late = median(&mut self.samples[2 * third..].iter().map(pick).collect());
            if late as f64 > early as f64 * 1.2 + 4096.0 {
                grown.push(format!("{name}: {early} KiB -> {late} KiB"));
            }
        }
        grown
    }
}

/// One minute of the run at the ordered listener.
#[derive(QueryableByName)]
pub struct Minute {
    #[diesel(sql_type = BigInt)]
    pub minute: i64,
    #[diesel(sql_type = BigInt)]
    pub handled: i64,
    #[diesel(sql_type = Double)]
    pub p99_ms: f64,
}

/// Per minute of effect time: effects of `listener` and their p99 from
/// the event's insert.
pub fn per_minute(conn: &mut PgConnection, listener: &str) -> QueryResult<Vec<Minute>> {
    diesel::sql_query(
        "WITH start AS (SELECT min(at) AS t0 FROM chaos_effects)
         SELECT floor(EXTRACT(EPOCH FROM f.at - start.t0) / 60)::bigint AS minute,
                count(*) AS handled,
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM f.at - e.recorded_at)) * 1000)::float8 AS p99_ms
           FROM chaos_effects f JOIN outbox_events e ON e.event_id = f.event_id, start
          WHERE f.listener = $1
          GROUP BY 1 ORDER BY 1",
    )
    .bind::<Text, _>(listener)
    .load(conn)
}

/// The soak's report: stuck events, memory over time, and per minute the
/// events handled and the p99 of commit -> handled.
pub fn report(
    memory: &MemorySampler,
    minutes: &[Minute],
    outstanding_at_stop: i64,
    drain: Duration,
) -> String {
    let mut text = format!(
        "soak: {outstanding_at_stop} events outstanding when the writers stopped, all handled {drain:.1?} later (0 stuck)\n\
         soak: memory of the relay and worker that lived the whole run (KiB):\n"
    );
    for (at, relay, worker) in &memory.samples {
        let _ = writeln!(text, "  {:>6.0} s  relay {relay:>7}  worker {worker:>7}", at);
    }
    let _ = writeln!(
        text,
        "soak: memory growth beyond noise: {}",
        match memory.growth() {
            g if g.is_empty() => "none".to_owned(),
            g => g.join(", "),
        }
    );
    let _ = writeln!(text, "soak: per minute at the ordered listener:");
    for m in minutes {
        let _ = writeln!(
            text,
            "  minute {:>3}  handled {:>6}  commit -> handled p99 {:>8.1} ms",
            m.minute, m.handled, m.p99_ms
        );
    }
    text
}
