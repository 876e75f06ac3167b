//! The verdict of a fault run, in the shape of the queue checkers of
//! Jepsen's RabbitMQ tests: of what committed, how much was delivered,
//! lost, delivered or applied more than once, reordered within an
//! aggregate, and recovered. The chaos run, the soak and the cluster test
//! print one each, so their outcomes read the same way.
//!
//! The checker is plain arithmetic over what the run recorded; each test
//! reads its inputs from its own tables.

use std::collections::{HashMap, HashSet};
use std::fmt;

use uuid::Uuid;

/// What a run recorded at one listener, fed to [`DeliveryReport::check`].
#[derive(Debug, Default, Clone)]
pub struct RunRecord {
    /// Every committed event, with its aggregate, in commit order (the
    /// outbox's `seq`).
    pub committed: Vec<(Uuid, String)>,
    /// Every time the listener was handed an event, duplicates included,
    /// in arrival order. Where a test sees only some deliveries (an
    /// inbox drops duplicates before the handler), it adds those it
    /// learned of otherwise.
    pub deliveries: Vec<Uuid>,
    /// Every effect the listener committed, in the order it committed them.
    pub applied: Vec<Uuid>,
    /// Events the run expects never to be applied (scheduled permanent
    /// failures that ended in `failed_jobs`): not counted as lost.
    pub given_up: HashSet<Uuid>,
    /// Events handled only after a retry, a repair or an in-doubt commit.
    pub recovered: HashSet<Uuid>,
    /// Whether the listener promises per-aggregate order; if not,
    /// reordering is reported but not a broken promise.
    pub ordered: bool,
}

/// The counts of one listener's run; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The listener these counts are of.
    pub listener: String,
    /// Events committed.
    pub committed: usize,
    /// Committed events handed to the listener at least once.
    pub delivered: usize,
    /// Committed events never applied (and not given up on by schedule).
    pub lost: usize,
    /// Events handed to the listener more than once.
    pub delivered_more_than_once: usize,
    /// Events whose effect was committed more than once.
    pub applied_more_than_once: usize,
    /// Events first applied after a later event of their aggregate.
    pub reordered: usize,
    /// Events applied after a retry, a repair or an in-doubt commit.
    pub recovered: usize,
    /// Events given up on by schedule (permanent failures).
    pub given_up: usize,
    /// Effects or deliveries of events that never committed.
    pub unexpected: usize,
    /// Whether reordering breaks this listener's promise.
    pub ordered: bool,
}

impl DeliveryReport {
    /// Counts `record` of `listener`.
    pub fn check(listener: &str, record: &RunRecord) -> Self {
        let committed: HashSet<Uuid> = record.committed.iter().map(|(id, _)| *id).collect();
        let mut delivered: HashMap<Uuid, usize> = HashMap::new();
        for id in &record.deliveries {
            *delivered.entry(*id).or_default() += 1;
        }
        let mut applied: HashMap<Uuid, usize> = HashMap::new();
        for id in &record.applied {
            *applied.entry(*id).or_default() += 1;
        }
        let unexpected: HashSet<Uuid> = delivered
            .keys()
            .chain(applied.keys())
            .filter(|id| !committed.contains(id))
            .copied()
            .collect();
        // Per aggregate, each event's place in commit order; an event is
        // reordered when its first effect came after the first effect of
        // an event committed later in its aggregate.
        let mut place: HashMap<Uuid, (&str, usize)> = HashMap::new();
        let mut next_place: HashMap<&str, usize> = HashMap::new();
        for (id, aggregate) in &record.committed {
            let n = next_place.entry(aggregate.as_str()).or_default();
            place.insert(*id, (aggregate.as_str(), *n));
            *n += 1;
        }
        let mut highest: HashMap<&str, usize> = HashMap::new();
        let mut seen = HashSet::new();
        let mut reordered = 0;
        for id in &record.applied {
            let Some(&(aggregate, n)) = place.get(id) else {
                continue;
            };
            if !seen.insert(*id) {
                continue;
            }
            match highest.get(aggregate) {
                Some(&top) if top > n => reordered += 1,
                _ => {
                    highest.insert(aggregate, n);
                }
            }
        }
        let applied_committed = |id: &Uuid| applied.contains_key(id);
        Self {
            listener: listener.to_owned(),
            committed: committed.len(),
            delivered: committed.iter().filter(|id| delivered.contains_key(id)).count(),
            lost: committed
                .iter()
                .filter(|id| !applied_committed(id) && !record.given_up.contains(id))
                .count(),
            delivered_more_than_once: delivered
                .iter()
                .filter(|(id, n)| **n > 1 && committed.contains(id))
                .count(),
            applied_more_than_once: applied
                .iter()
                .filter(|(id, n)| **n > 1 && committed.contains(id))
                .count(),
            reordered,
            recovered: record.recovered.iter().filter(|id| applied_committed(id)).count(),
            given_up: record.given_up.iter().filter(|id| committed.contains(id)).count(),
            unexpected: unexpected.len(),
            ordered: record.ordered,
        }
    }

    /// The promises this report breaks, in words; empty when it keeps
    /// them all (nothing lost, nothing applied twice, nothing unexpected,
    /// and for an ordered listener nothing reordered).
    pub fn broken_promises(&self) -> Vec<String> {
        let mut broken = Vec::new();
        if self.lost > 0 {
            broken.push(format!("{}: {} committed events lost", self.listener, self.lost));
        }
        if self.applied_more_than_once > 0 {
            broken.push(format!(
                "{}: {} events applied more than once",
                self.listener, self.applied_more_than_once
            ));
        }
        if self.unexpected > 0 {
            broken.push(format!(
                "{}: {} events that never committed were delivered or applied",
                self.listener, self.unexpected
            ));
        }
        if self.ordered && self.reordered > 0 {
            broken.push(format!(
                "{}: {} events applied out of their aggregate's order",
                self.listener, self.reordered
            ));
        }
        broken
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.committed.max(1) as f64;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, n: usize| {
            writeln!(f, "  {name:<26} {n:>9} {:>8.3}%", 100.0 * n as f64 / total)
        };
        writeln!(
            f,
            "delivery report, listener {}{}:",
            self.listener,
            if self.ordered { " (ordered)" } else { "" }
        )?;
        writeln!(f, "  {:<26} {:>9}", "committed", self.committed)?;
        row(f, "delivered", self.delivered)?;
        row(f, "lost", self.lost)?;
        row(f, "delivered more than once", self.delivered_more_than_once)?;
        row(f, "applied more than once", self.applied_more_than_once)?;
        row(f, "reordered within aggregate", self.reordered)?;
        row(f, "recovered", self.recovered)?;
        row(f, "given up on (scheduled)", self.given_up)?;
        write!(f, "  {:<26} {:>9}", "unexpected", self.unexpected)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (1..=n as u128).map(Uuid::from_u128).collect()
    }

    #[test]
    fn a_clean_run_keeps_every_promise() {
        let e = ids(4);
        let record = RunRecord {
            committed: vec![
                (e[0], "a".into()),
                (e[1], "b".into()),
                (e[2], "a".into()),
                (e[3], "b".into()),
            ],
            // b's events overtake a's: other aggregates may interleave.
            deliveries: vec![e[1], e[0], e[3], e[2]],
            applied: vec![e[1], e[0], e[3], e[2]],
            ordered: true,
            ..RunRecord::default()
        };
        let report = DeliveryReport::check("l", &record);
        assert_eq!(report.committed, 4);
        assert_eq!(report.delivered, 4);
        assert_eq!(report.reordered, 0);
        assert!(report.broken_promises().is_empty(), "{report}");
    }

    #[test]
    fn losses_duplicates_and_reorders_are_counted() {
        let e = ids(5);
        let stray = Uuid::from_u128(999);
        let record = RunRecord {
            committed: vec![
                (e[0], "a".into()),
                (e[1], "a".into()),
                (e[2], "a".into()),
                (e[3], "b".into()),
                (e[4], "b".into()),
            ],
            deliveries: vec![e[0], e[2], e[1], e[1], e[3], stray],
            // e[1] after e[2] is one reorder; e[0] twice; e[4] never.
            applied: vec![e[0], e[2], e[1], e[0], e[3]],
            given_up: HashSet::new(),
            recovered: [e[1]].into_iter().collect(),
            ordered: true,
        };
        let report = DeliveryReport::check("l", &record);
        assert_eq!(report.delivered, 4);
        assert_eq!(report.lost, 1);
        assert_eq!(report.delivered_more_than_once, 1);
        assert_eq!(report.applied_more_than_once, 1);
        assert_eq!(report.reordered, 1);
        assert_eq!(report.recovered, 1);
        assert_eq!(report.unexpected, 1);
        assert_eq!(report.broken_promises().len(), 4, "{report}");
    }

    #[test]
    fn a_scheduled_failure_is_not_a_loss_and_order_matters_only_when_promised() {
        let e = ids(2);
        let record = RunRecord {
            committed: vec![(e[0], "a".into()), (e[1], "a".into())],
            deliveries: vec![e[1], e[0]],
            applied: vec![e[1]],
            given_up: [e[0]].into_iter().collect(),
            ..RunRecord::default()
        };
        let report = DeliveryReport::check("l", &record);
        assert_eq!((report.lost, report.given_up), (0, 1));
        assert!(report.broken_promises().is_empty(), "{report}");
        let text = report.to_string();
        assert!(text.contains("given up on (scheduled)"), "{text}");
        assert!(text.contains(" 50.000%"), "{text}");
    }
}
