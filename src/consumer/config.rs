//! How a worker connects and behaves ([`WorkerConfig`]), each default
//! beside its field.

use std::time::Duration;

use crate::amqp::{DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, validate_amqp_name, validate_amqp_url};
use crate::database::{DEFAULT_DATABASE_URL, redact_url};
use crate::error::{Error, Result};
use crate::settings::Settings;

/// Shortest inbox or attempts retention.
const MIN_RETENTION: Duration = Duration::from_secs(1);

/// How a worker connects and behaves; each default beside its field.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Postgres (attempts, failed jobs, inbox, and the listeners' own
    /// tables). Default [`DEFAULT_DATABASE_URL`].
    pub database_url: String,
    /// RabbitMQ. Default [`DEFAULT_AMQP_URL`].
    pub amqp_url: String,
    /// The topic exchange the relay publishes to; declared (durable,
    /// idempotent) before binding. Default `outbox.events`.
    pub exchange: String,
    /// Prefix of the queue names (`<app>.<listener>`). Default `app`;
    /// services set their own (`chom`).
    pub app: String,
    /// Name in the broker's connection list and logs. Default
    /// `<host>-<pid>-<random>`.
    pub worker_id: String,
    /// Database connections. Default: the listeners' concurrency summed,
    /// plus 2, at most 64.
    pub pool_size: Option<u32>,
    /// Wait for the broker's confirm of a retry or dead-letter publish.
    /// Default 10 s.
    pub confirm_timeout: Duration,
    /// Longest wait between reconnects to the broker, and between tries of
    /// a database step that failed. Default 30 s.
    pub reconnect_max: Duration,
    /// How long shutdown waits for handlers in flight; messages of those
    /// still running then go back to their queues. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Declare the exchange and queues on every connect. Default true.
    pub declare_topology: bool,
    /// On how many nodes of a RabbitMQ cluster each queue this worker
    /// declares is replicated (`x-quorum-initial-group-size` of its quorum
    /// queues). `None` (the default): the broker's default,
    /// `quorum_cluster_size` (3 in RabbitMQ 3.10; every node of a smaller
    /// cluster). An odd number: 3 tolerates one node down, 5 two. 1 to
    /// 255. It is a queue argument: a worker whose value differs from the
    /// one its existing queues were declared with cannot declare them
    /// (PRECONDITION_FAILED), so set it before the queues are created or
    /// delete them first (`outbox topology delete`).
    pub quorum_initial_group_size: Option<u32>,
    /// The CloudEvents `source`s whose events this worker applies; an event
    /// from any other (another database's relay on the same broker) is not
    /// applied: counted in `outbox_foreign_events_total`, logged once per
    /// source and dead-lettered with the reason. The relay's default source
    /// is `/outbox/<database name>` ([`crate::relay::default_source`]).
    /// Default empty: every source.
    pub accept_sources: Vec<String>,
    /// How often the worker prunes old inbox rows and attempt counts
    /// (`inbox_retention`, `attempts_retention`), in batches of 5,000.
    /// `None` turns the worker's pruning off: for a worker whose role may
    /// not `DELETE` from `processed_events` and `listener_attempts` (prune
    /// from an operator's job with [`crate::inbox::prune`] and
    /// [`prune_attempts`](crate::consumer::prune_attempts)), or
    /// to leave pruning to other workers. Several workers pruning the same
    /// database is harmless: rows go by age, and a second pruner finds
    /// them gone. A
    /// pruning step that fails (no `DELETE` grant, database down) is logged
    /// and tried again next period; the worker goes on. Default 10 min.
    pub prune_interval: Option<Duration>,
    /// How long inbox (`processed_events`) rows are kept. A row is what
    /// makes a second delivery of its event a no-op, so it must outlive
    /// every way a message arrives twice: relay re-publishes, redeliveries,
    /// retry delays, and `outbox replay` of events up to the relay's
    /// retention old (keep this at least
    /// [`RelayConfig::retention`](crate::RelayConfig::retention)). At least
    /// 1 s. Default 7 days.
    pub inbox_retention: Duration,
    /// How long `listener_attempts` rows nobody touched are kept (counts
    /// of messages purged from their queues by hand). A count being
    /// retried is touched at every try, so this must exceed every
    /// listener's longest retry delay plus its timeout (checked by
    /// [`Worker::new`](crate::Worker::new)). At least 1 s. Default 7 days.
    pub attempts_retention: Duration,
    /// How long the webhook delivery log (`webhook_deliveries`, one row a
    /// try) is kept, by a worker that runs the `webhook_delivery`
    /// listener. At least 1 s. Default 30 days.
    pub webhook_log_retention: Duration,
    /// How often the worker looks for retry copies the broker did not hand
    /// back in time (a retry queue whose dead-letter path broke) and moves
    /// them to their listener's queue (the retry repairer,
    /// `src/maintenance/retry_repairer.rs`). `None` turns it off. Default
    /// 15 s.
    pub retry_repair_interval: Option<Duration>,
    /// How long past its delay a retry copy may stay away before it counts
    /// as overdue: longer than a copy can take to come back and be handled
    /// when the listener's queue is idle. At least 1 s. Default 60 s.
    pub retry_repair_grace: Duration,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("app", &self.app)
            .field("worker_id", &self.worker_id)
            .field("pool_size", &self.pool_size)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("reconnect_max", &self.reconnect_max)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("declare_topology", &self.declare_topology)
            .field("quorum_initial_group_size", &self.quorum_initial_group_size)
            .field("accept_sources", &self.accept_sources)
            .field("prune_interval", &self.prune_interval)
            .field("inbox_retention", &self.inbox_retention)
            .field("attempts_retention", &self.attempts_retention)
            .field("webhook_log_retention", &self.webhook_log_retention)
            .field("retry_repair_interval", &self.retry_repair_interval)
            .field("retry_repair_grace", &self.retry_repair_grace)
            .finish()
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            app: "app".to_owned(),
            worker_id: crate::relay::config::default_relay_id(),
            pool_size: None,
            confirm_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            declare_topology: true,
            quorum_initial_group_size: None,
            accept_sources: Vec::new(),
            prune_interval: Some(Duration::from_secs(600)),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            attempts_retention: Duration::from_secs(7 * 24 * 3600),
            webhook_log_retention: Duration::from_secs(30 * 24 * 3600),
            retry_repair_interval: Some(Duration::from_secs(15)),
            retry_repair_grace: Duration::from_secs(60),
        }
    }
}

impl WorkerConfig {
    /// The defaults with the database, broker and exchange of `settings`
    /// (set [`app`](Self::app) yourself).
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            database_url: settings.database_url.clone(),
            amqp_url: settings.amqp_url.clone(),
            exchange: settings.exchange.clone(),
            ..Self::default()
        }
    }

    /// The defaults with the database, broker and exchange read from
    /// `DATABASE_URL`, `AMQP_URL` and `OUTBOX_EXCHANGE`, as the relay and
    /// the `outbox` command read them ([`Settings::from_env`]).
    pub fn from_env() -> Result<Self> {
        Settings::from_env().map(|settings| Self::from_settings(&settings))
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::Config(message));
        if !self.database_url.starts_with("postgres://") && !self.database_url.starts_with("postgresql://") {
            return bad(format!(
                "database URL {} must start with postgres:// or postgresql://",
                redact_url(&self.database_url)
            ));
        }
        validate_amqp_url(&self.amqp_url)?;
        validate_amqp_name("exchange", &self.exchange)?;
        validate_amqp_name("app", &self.app)?;
        if self.worker_id.is_empty() || self.worker_id.len() > 200 {
            return bad("worker id must be 1 to 200 characters".into());
        }
        if let Some(size) = self.pool_size
            && !(1..=1024).contains(&size)
        {
            return bad(format!("pool size must be between 1 and 1024, not {size}"));
        }
        if let Some(size) = self.quorum_initial_group_size
            && !(1..=255).contains(&size)
        {
            return bad(format!(
                "quorum initial group size must be between 1 and 255, not {size}"
            ));
        }
        if self.accept_sources.iter().any(|s| s.is_empty() || s.len() > 1000) {
            return bad("an accepted source must be 1 to 1000 bytes".into());
        }
        if self.confirm_timeout.is_zero() || self.reconnect_max.is_zero() {
            return bad("confirm timeout and reconnect max must be positive".into());
        }
        if self.prune_interval.is_some_and(|interval| interval.is_zero()) {
            return bad("prune interval must be positive (None turns pruning off)".into());
        }
        if self
            .retry_repair_interval
            .is_some_and(|interval| interval.is_zero())
        {
            return bad("retry repair interval must be positive (None turns the repairer off)".into());
        }
        if self.retry_repair_grace < MIN_RETENTION {
            return bad(format!(
                "retry repair grace ({:?}) must be at least {MIN_RETENTION:?}",
                self.retry_repair_grace
            ));
        }
        for (name, retention) in [
            ("inbox retention", self.inbox_retention),
            ("attempts retention", self.attempts_retention),
            ("webhook log retention", self.webhook_log_retention),
        ] {
            if retention < MIN_RETENTION {
                return bad(format!(
                    "{name} ({retention:?}) must be at least {MIN_RETENTION:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_valid_and_hide_passwords() {
        let config = WorkerConfig::default();
        assert!(config.validate().is_ok());
        let config = WorkerConfig {
            database_url: "postgres://u:hunter2@h/db".into(),
            amqp_url: "amqp://u:hunter2@h/%2f".into(),
            ..WorkerConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        let bad = WorkerConfig {
            app: "no spaces".into(),
            ..WorkerConfig::default()
        };
        assert!(bad.validate().is_err());
        for (size, ok) in [
            (Some(0), false),
            (Some(1), true),
            (Some(3), true),
            (Some(256), false),
            (None, true),
        ] {
            let config = WorkerConfig {
                quorum_initial_group_size: size,
                ..WorkerConfig::default()
            };
            assert_eq!(config.validate().is_ok(), ok, "{size:?}");
        }
    }

    #[test]
    fn pruning_settings_are_checked() {
        let off = WorkerConfig {
            prune_interval: None,
            ..WorkerConfig::default()
        };
        assert!(off.validate().is_ok());
        let cases = [
            (
                WorkerConfig {
                    prune_interval: Some(Duration::ZERO),
                    ..WorkerConfig::default()
                },
                "prune interval",
            ),
            (
                WorkerConfig {
                    inbox_retention: Duration::from_millis(10),
                    ..WorkerConfig::default()
                },
                "inbox retention",
            ),
            (
                WorkerConfig {
                    attempts_retention: Duration::ZERO,
                    ..WorkerConfig::default()
                },
                "attempts retention",
            ),
            (
                WorkerConfig {
                    retry_repair_interval: Some(Duration::ZERO),
                    ..WorkerConfig::default()
                },
                "retry repair interval",
            ),
            (
                WorkerConfig {
                    retry_repair_grace: Duration::from_millis(10),
                    ..WorkerConfig::default()
                },
                "retry repair grace",
            ),
        ];
        for (config, word) in cases {
            let message = config.validate().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(word), "{word}: {message}");
        }
    }
}
