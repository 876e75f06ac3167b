//! The webhook log pruner (run by a worker that runs the webhook delivery
//! listener): deletes `webhook_deliveries` rows (the log of every try)
//! older than [`WorkerConfig::webhook_log_retention`] (default 30 days),
//! [`PRUNE_BATCH`](super::PRUNE_BATCH) a statement, every
//! [`WorkerConfig::prune_interval`] (default 10 minutes; `None` turns the
//! worker's pruning off). `outbox webhooks prune --older-than` does the
//! same by hand.
//!
//! The log is diagnostic (what was sent, what came back): nothing depends
//! on an old row, so its retention is a matter of how far back operators
//! look.
//!
//! [`WorkerConfig::webhook_log_retention`]: crate::WorkerConfig::webhook_log_retention
//! [`WorkerConfig::prune_interval`]: crate::WorkerConfig::prune_interval

use super::{AgePruner, AgedRows};
use crate::metrics as m;

/// The delivery log's rows, dated by their try.
#[derive(Debug)]
pub(crate) struct WebhookLog;

impl AgedRows for WebhookLog {
    const PRUNER: &'static str = "webhook_log_pruner";
    const TABLE: &'static str = "webhook_deliveries";
    const DATED_BY: &'static str = "at";
    const PRUNED_TOTAL: &'static str = m::WEBHOOK_LOG_PRUNED_TOTAL;
}

/// Deletes delivery log rows past the worker's webhook log retention.
pub(crate) type WebhookLogPruner = AgePruner<WebhookLog>;
