//! The relay's settings, each with its default beside it, checked before
//! the relay starts.

use std::time::Duration;

use crate::amqp::{DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, validate_amqp_name, validate_amqp_url};
use crate::database::{DEFAULT_DATABASE_URL, redact_url, validate_database_url};
use crate::error::{Error, Result};
use crate::settings::Settings;

/// How a relay connects, claims, publishes, retries and prunes.
#[derive(Clone)]
pub struct RelayConfig {
    /// Postgres holding `outbox_events`. Default [`DEFAULT_DATABASE_URL`].
    pub database_url: String,
    /// RabbitMQ. Default [`DEFAULT_AMQP_URL`].
    pub amqp_url: String,
    /// Durable topic exchange to publish to (declared by the relay).
    /// Default `outbox.events`.
    pub exchange: String,
    /// This instance's lease owner name. Default `<host>-<pid>-<random>`;
    /// must be unique among running relays.
    pub relay_id: String,
    /// Rows claimed per query. Default 500.
    pub batch_size: usize,
    /// Claimed rows held at once (publishing or waiting behind an earlier
    /// event of their aggregate); bounds memory. Default 4 x `batch_size`.
    pub max_in_flight: usize,
    /// How long a claim stays exclusive without a heartbeat. A running
    /// relay renews its leases every third of this, so a lease only ends
    /// when its relay died, froze or lost the database: then another relay
    /// takes the rows over (and the old one can no longer mark them). This
    /// is the takeover time after a crash. At least 500 ms. Default 3 s.
    pub lease: Duration,
    /// How long to wait for the broker's confirm of one message before
    /// counting a failed attempt. Default 10 s.
    pub confirm_timeout: Duration,
    /// Longest time a confirmed row waits to be marked published, so that
    /// marks go out many rows a statement (a full batch goes at once).
    /// Delivery does not wait for it. Default 5 ms.
    pub mark_delay: Duration,
    /// Shortest wait between claims when rows keep coming. Default 5 ms.
    pub poll_min: Duration,
    /// Longest wait between claims when idle; the wait doubles from
    /// `poll_min` up to this while claims come back empty. Default 100 ms.
    pub poll_max: Duration,
    /// Failed attempts after which a row is marked failed and its
    /// aggregate waits for an operator. Default 20.
    pub max_attempts: u32,
    /// Wait before a row's next publish try after its first failed one
    /// (then doubling, +-20% jitter). Default 1 s.
    pub backoff_initial: Duration,
    /// Longest wait between a row's publish tries. Default 5 min.
    pub backoff_max: Duration,
    /// How long published rows stay in `outbox_events`. Past it they are
    /// moved into the event log (with [`event_log`](Self::event_log)) or
    /// deleted (without). Zero: without the event log, rows are deleted as
    /// they are published; with it, they are moved at the next prune.
    /// Default 7 days.
    pub retention: Duration,
    /// Keep published events past [`retention`](Self::retention) in the
    /// event log (`outbox_event_log`, see [`crate::event_log`]), where
    /// `outbox replay`, projection rebuilds and webhook replays read them.
    /// Default on.
    pub event_log: bool,
    /// How long the event log keeps events, dropped a whole month at a
    /// time once the month is over by this much; `None` keeps them
    /// forever (what rebuilding a projection from the whole history
    /// needs). At least 1 day. Default `None`.
    pub log_retention: Option<Duration>,
    /// How often the published pruner and the lease cleaner run (see
    /// `src/maintenance/`). Default 60 s.
    pub prune_interval: Duration,
    /// Rows deleted per prune statement. Default 5,000.
    pub prune_batch: usize,
    /// Longest wait between reconnect attempts to the broker or database.
    /// Default 30 s.
    pub reconnect_max: Duration,
    /// How long shutdown waits for outstanding confirms. Default 10 s.
    pub shutdown_timeout: Duration,
    /// How often backlog gauges are refreshed. Default 5 s.
    pub stats_interval: Duration,
    /// CloudEvents `source` of published events, which workers can filter
    /// on ([`WorkerConfig::accept_sources`](crate::WorkerConfig::accept_sources)).
    /// Default `None`: `/outbox/<database name>` ([`default_source`]), so
    /// events of different databases on one broker are told apart. A
    /// service may name itself: `/chom/<database name>`.
    pub source: Option<String>,
    /// Start of each CloudEvent's `dataschema` URI (see
    /// [`crate::contract::dataschema_uri`]): with
    /// `https://schemas.example.com/chom/`, a `site.created` event of
    /// schema version 1 names
    /// `https://schemas.example.com/chom/site.created.v1.schema.json`, the
    /// file `schema export` writes. Default `None`:
    /// `urn:outbox:schema:site.created:v1`.
    pub dataschema_base: Option<String>,
    /// AMQP `app_id` property. Default `outbox-relay`.
    pub app_id: String,
    /// What an event the broker returns as unroutable (no queue bound to
    /// its type) does. `false` (the default): it counts as published to
    /// nobody: it is kept with `unroutable_at` set (for `outbox replay`
    /// once a listener exists), counted in `outbox status` and
    /// `outbox_unroutable_total`, and its aggregate goes on. `true`: it is
    /// a failed attempt, retried with backoff, and holds its aggregate
    /// back until a queue is bound (the strict behaviour).
    pub strict_routing: bool,
    /// `LISTEN` for writers' wake-ups (see [`crate::wake`]) and claim at
    /// once when one arrives; polling stays the fallback. Default on.
    pub wake_up: bool,
    /// The phantom guard, for a primary with asynchronous streaming
    /// standbys: publish a claimed batch only once a standby has flushed
    /// the primary's WAL up to where it stood after the claim (which then
    /// commits synchronously: `pg_stat_replication.flush_lsn >=
    /// pg_current_wal_flush_lsn()`),
    /// so that every event published is also on a standby that may be
    /// promoted. Waits up to this long per batch, then gives the batch
    /// back (claimed again after the database backoff). Needs a role that
    /// sees `pg_stat_replication`'s positions (`pg_monitor`). `None`
    /// (the default): off. At most half the lease. See `src/relay/standby.rs`.
    pub wait_for_standby: Option<Duration>,
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .field("relay_id", &self.relay_id)
            .field("batch_size", &self.batch_size)
            .field("max_in_flight", &self.max_in_flight)
            .field("lease", &self.lease)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("mark_delay", &self.mark_delay)
            .field("poll_min", &self.poll_min)
            .field("poll_max", &self.poll_max)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("retention", &self.retention)
            .field("event_log", &self.event_log)
            .field("log_retention", &self.log_retention)
            .field("prune_interval", &self.prune_interval)
            .field("prune_batch", &self.prune_batch)
            .field("source", &self.source)
            .field("dataschema_base", &self.dataschema_base)
            .field("strict_routing", &self.strict_routing)
            .field("wake_up", &self.wake_up)
            .field("wait_for_standby", &self.wait_for_standby)
            .finish_non_exhaustive()
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            relay_id: default_relay_id(),
            batch_size: 500,
            max_in_flight: 2000,
            lease: Duration::from_secs(3),
            confirm_timeout: Duration::from_secs(10),
            mark_delay: Duration::from_millis(5),
            poll_min: Duration::from_millis(5),
            poll_max: Duration::from_millis(100),
            max_attempts: 20,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            event_log: true,
            log_retention: None,
            prune_interval: Duration::from_secs(60),
            prune_batch: 5000,
            reconnect_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(5),
            source: None,
            dataschema_base: None,
            app_id: "outbox-relay".to_owned(),
            strict_routing: false,
            wake_up: true,
            wait_for_standby: None,
        }
    }
}

/// The default CloudEvents `source` of events relayed from the database
/// `database_url` names: `/outbox/<database name>` (`/outbox` when the URL
/// names none).
pub fn default_source(database_url: &str) -> String {
    match crate::database::database_path(database_url) {
        Some(name) => format!("/outbox/{name}"),
        None => "/outbox".to_owned(),
    }
}

/// `<hostname>-<pid>-<8 hex>`: readable in `lease_owner`, unique per start.
pub fn default_relay_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[24..])
}

/// Shortest lease: renewals every third of it must fit a database round
/// trip with room to spare.
const MIN_LEASE: Duration = Duration::from_millis(500);
/// Longest lease: a crashed relay's rows wait this long.
const MAX_LEASE: Duration = Duration::from_secs(600);

impl RelayConfig {
    /// The defaults with the database, broker and exchange of `settings`.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            database_url: settings.database_url.clone(),
            amqp_url: settings.amqp_url.clone(),
            exchange: settings.exchange.clone(),
            ..Self::default()
        }
    }

    /// The defaults with the database, broker and exchange read from
    /// `DATABASE_URL`, `AMQP_URL` and `OUTBOX_EXCHANGE`, as the worker and
    /// `outbox relay` read them ([`Settings::from_env`]).
    pub fn from_env() -> Result<Self> {
        Settings::from_env().map(|settings| Self::from_settings(&settings))
    }

    /// How often a relay renews its leases: a third of the lease, so two
    /// renewals in a row may fail before a lease ends.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::Config(message));
        validate_database_url(&self.database_url)?;
        validate_amqp_url(&self.amqp_url)?;
        validate_amqp_name("exchange", &self.exchange)?;
        if self.exchange.starts_with("amq.") {
            return bad(format!(
                "exchange {:?}: names starting with amq. are reserved",
                self.exchange
            ));
        }
        if self.relay_id.is_empty() || self.relay_id.len() > 200 {
            return bad("relay id must be 1 to 200 characters".into());
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad(format!(
                "batch size must be between 1 and 10000, not {}",
                self.batch_size
            ));
        }
        if self.max_in_flight < self.batch_size {
            return bad(format!(
                "max in flight ({}) must be at least the batch size ({})",
                self.max_in_flight, self.batch_size
            ));
        }
        if self.confirm_timeout.is_zero() {
            return bad("confirm timeout must be positive".into());
        }
        if self.lease < MIN_LEASE || self.lease > MAX_LEASE {
            return bad(format!(
                "lease ({:?}) must be between {MIN_LEASE:?} and {MAX_LEASE:?}: it is renewed every third of it, and it is how long a crashed relay's rows wait",
                self.lease
            ));
        }
        if self.mark_delay > Duration::from_secs(1) || self.mark_delay >= self.lease / 3 {
            return bad(format!(
                "mark delay ({:?}) must be at most 1 s and shorter than a third of the lease",
                self.mark_delay
            ));
        }
        if self.poll_min.is_zero() || self.poll_max < self.poll_min {
            return bad(format!(
                "poll bounds must satisfy 0 < min <= max (min {:?}, max {:?})",
                self.poll_min, self.poll_max
            ));
        }
        if self.max_attempts == 0 || self.max_attempts > 1000 {
            return bad(format!(
                "max attempts must be between 1 and 1000, not {}",
                self.max_attempts
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad(format!(
                "retry delays must satisfy 0 < initial <= max (initial {:?}, max {:?})",
                self.backoff_initial, self.backoff_max
            ));
        }
        if self.prune_batch == 0 || self.prune_interval.is_zero() {
            return bad("prune batch and prune interval must be positive".into());
        }
        if self
            .log_retention
            .is_some_and(|retention| retention < Duration::from_secs(24 * 3600))
        {
            return bad(format!(
                "log retention must be at least 1 day (or none: forever), not {:?}",
                self.log_retention.unwrap_or_default()
            ));
        }
        if self.reconnect_max.is_zero() || self.stats_interval.is_zero() {
            return bad("reconnect max and stats interval must be positive".into());
        }
        if self.source.as_deref().is_some_and(str::is_empty) {
            return bad("CloudEvents source must not be empty".into());
        }
        if self.app_id.is_empty() || self.app_id.len() > 255 {
            return bad("app id must be 1 to 255 characters".into());
        }
        if let Some(wait) = self.wait_for_standby
            && (wait.is_zero() || wait > self.lease / 2)
        {
            return bad(format!(
                "wait for standby ({wait:?}) must be positive and at most half the lease ({:?}), or the batch's lease would run out while it waits",
                self.lease
            ));
        }
        Ok(())
    }

    /// The CloudEvents `source` the relay publishes with: [`Self::source`]
    /// or the default for its database.
    pub fn effective_source(&self) -> String {
        self.source
            .clone()
            .unwrap_or_else(|| default_source(&self.database_url))
    }

    /// Delay before attempt `attempt + 1` after `attempt` failures: an
    /// exponential backoff (factor 2, +-20% jitter) from `backoff_initial`
    /// capped at `backoff_max`.
    pub fn backoff_after(&self, attempts_so_far: u32) -> Duration {
        crate::delay::Backoff::nth(self.backoff_initial, self.backoff_max, attempts_so_far)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RelayConfig::default()
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn bad_settings_are_named() {
        let cases: Vec<(RelayConfig, &str)> = vec![
            (
                RelayConfig {
                    batch_size: 0,
                    ..RelayConfig::default()
                },
                "batch size",
            ),
            (
                RelayConfig {
                    lease: Duration::from_millis(100),
                    ..RelayConfig::default()
                },
                "lease",
            ),
            (
                RelayConfig {
                    exchange: "x\";drop".into(),
                    ..RelayConfig::default()
                },
                "exchange",
            ),
            (
                RelayConfig {
                    amqp_url: "http://h".into(),
                    ..RelayConfig::default()
                },
                "AMQP URL",
            ),
            (
                RelayConfig {
                    database_url: "mysql://h/db".into(),
                    ..RelayConfig::default()
                },
                "database URL",
            ),
            (
                RelayConfig {
                    poll_min: Duration::ZERO,
                    ..RelayConfig::default()
                },
                "poll",
            ),
        ];
        for (config, word) in cases {
            let message = config.validate().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(word), "{word}: {message}");
        }
    }

    #[test]
    fn password_never_in_config_errors_or_debug() {
        let config = RelayConfig {
            database_url: "mysql://u:hunter2@h/db".into(),
            amqp_url: "amqp://u:hunter2@h/%2f".into(),
            ..RelayConfig::default()
        };
        let message = config.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn backoff_delays_grow_and_are_capped() {
        let config = RelayConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..RelayConfig::default()
        };
        let first = config.backoff_after(0);
        assert!(
            first >= Duration::from_millis(80) && first <= Duration::from_millis(250),
            "{first:?}"
        );
        assert!(config.backoff_after(3) > first);
        assert!(config.backoff_after(30) <= Duration::from_secs(2));
    }
}
