//! What a queued listener is: the [`QueuedListener`] trait, the error it
//! returns ([`ListenerError`], which says whether retrying is worth it),
//! the [`HandlerContext`] it runs with, and its [`ListenerOptions`].

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, PooledConnection};

use crate::consumer::message::ReceivedEvent;
use crate::database::PgPool;
pub use crate::error::ListenerError;
use crate::error::{Error, Result};

/// A listener that runs in a worker, from its own queue
/// (`<app>.<name>`), with retries, a dead-letter queue and a failed-jobs
/// row when it gives up.
///
/// `handle` runs on tokio's blocking pool, so plain diesel calls are
/// fine in it. With [`ListenerOptions::inbox`] on (the default) the
/// framework opens a transaction, inserts the inbox row (listener,
/// event_id), hands the transaction out as [`HandlerContext::conn`] and
/// commits both together: database effects happen exactly once. Effects
/// outside this database (an email, an HTTP call) happen at least once:
/// make them idempotent or tolerate duplicates.
///
/// ```
/// use outbox::consumer::{HandlerContext, ListenerError, QueuedListener, ReceivedEvent};
///
/// struct CountSites;
///
/// impl QueuedListener for CountSites {
///     fn name(&self) -> &str { "count_sites" }
///     fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
///         use diesel::RunQueryDsl;
///         diesel::sql_query("UPDATE counters SET n = n + 1 WHERE name = 'sites'")
///             .execute(ctx.conn()?)?; // commits with the inbox row
///         Ok(())
///     }
/// }
/// ```
pub trait QueuedListener: Send + Sync + 'static {
    /// Stable name: lower-case letters, digits and `_`, starting with a
    /// letter (`record_audit_log`). It names the queue and the inbox and
    /// failed-jobs rows, so renaming a listener gives it a fresh queue.
    fn name(&self) -> &str;

    /// Retry, concurrency and transaction settings. The registry can
    /// override them ([`Registry::queued_listener_with`]).
    ///
    /// [`Registry::queued_listener_with`]: crate::Registry::queued_listener_with
    fn options(&self) -> ListenerOptions {
        ListenerOptions::default()
    }

    /// Handles one event. Return [`ListenerError::Transient`] for failures
    /// a later try may not have (a service down, a lock timeout) and
    /// [`ListenerError::Permanent`] for those it will (a payload that does
    /// not fit, a broken invariant). A panic counts as a transient failure.
    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError>;
}

/// How a handler run ended.
pub(crate) enum HandlerRun {
    Done {
        duplicate: bool,
    },
    Failed(ListenerError),
    /// The framework could not even start the try (no connection, BEGIN
    /// failed): not the listener's fault, not counted.
    Infrastructure(String),
    /// Another delivery of the same event is being handled right now
    /// (a duplicate, or a retry overtaking a timed-out try): wait for it,
    /// not counted.
    Busy,
}

/// Runs a handler, turning a panic into a transient failure.
pub(crate) fn guarded(
    run: impl FnOnce() -> std::result::Result<(), ListenerError>,
) -> std::result::Result<(), ListenerError> {
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(ListenerError::transient(format!("listener panicked: {message}")))
        }
    }
}

type Pooled = PooledConnection<ConnectionManager<PgConnection>>;

enum Conn<'a> {
    /// The inbox transaction the framework opened.
    Transaction(&'a mut PgConnection),
    /// Taken from the pool on first use.
    Lazy {
        pool: Option<&'a PgPool>,
        conn: Option<Pooled>,
    },
}

/// What a handler gets besides the event: the try number and a database
/// connection.
pub struct HandlerContext<'a> {
    attempt: u32,
    tries: u32,
    conn: Conn<'a>,
    /// Whether the handler asked for the connection: a batch need not
    /// close the savepoint of a delivery whose handler never touched it.
    conn_used: bool,
}

impl fmt::Debug for HandlerContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerContext")
            .field("attempt", &self.attempt)
            .field("tries", &self.tries)
            .field("in_transaction", &self.in_transaction())
            .finish()
    }
}

impl<'a> HandlerContext<'a> {
    /// A context whose [`conn`](Self::conn) is `conn` (inside a transaction
    /// the caller opened): for the framework's inbox transactions, and for
    /// testing a listener without a broker.
    pub fn with_transaction(conn: &'a mut PgConnection, attempt: u32, tries: u32) -> Self {
        Self {
            attempt,
            tries,
            conn: Conn::Transaction(conn),
            conn_used: false,
        }
    }

    /// A context that takes a connection from `pool` on first use (or
    /// has none, for `None`).
    pub fn with_pool(pool: Option<&'a PgPool>, attempt: u32, tries: u32) -> Self {
        Self {
            attempt,
            tries,
            conn: Conn::Lazy { pool, conn: None },
            conn_used: false,
        }
    }

    /// Whether the handler has asked for [`conn`](Self::conn).
    pub(crate) fn used_conn(&self) -> bool {
        self.conn_used
    }

    /// This try's number, from 1. Counted by the framework in Postgres.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Tries the listener gets in all.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// Whether a transient failure now ends the job.
    pub fn is_last_try(&self) -> bool {
        self.attempt >= self.tries
    }

    /// Whether [`conn`](Self::conn) is the inbox transaction (effects
    /// commit together with the inbox row) rather than a plain pooled
    /// connection.
    pub fn in_transaction(&self) -> bool {
        matches!(self.conn, Conn::Transaction(_))
    }

    /// The database connection: the inbox transaction for listeners with
    /// [`ListenerOptions::inbox`], else a pooled connection taken on first
    /// use (open your own transaction on it if you need one).
    pub fn conn(&mut self) -> Result<&mut PgConnection, ListenerError> {
        self.conn_used = true;
        match &mut self.conn {
            Conn::Transaction(conn) => Ok(conn),
            Conn::Lazy { pool, conn } => {
                if conn.is_none() {
                    let pool = pool.ok_or_else(|| ListenerError::permanent("this worker has no database"))?;
                    *conn = Some(pool.get().map_err(|e| ListenerError::transient(Error::Pool(e)))?);
                }
                match conn {
                    Some(conn) => Ok(&mut **conn),
                    None => Err(ListenerError::transient("no database connection")),
                }
            }
        }
    }
}

/// How a queued listener is retried, run and isolated. Each default is
/// next to its field; [`ListenerOptions::validate`] checks the ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerOptions {
    /// Tries in all, the first included, before a transient failure ends
    /// in failed_jobs. Default 3 (the seed's); 1 to 100.
    pub tries: u32,
    /// Delay before the next try after `n` failed tries: `backoff[n - 1]`,
    /// the last entry repeating (Laravel's rule). Default 30 s, 60 s,
    /// 120 s (the seed's; with 3 tries the 120 s step is not reached),
    /// right for production; while developing,
    /// [`ListenerOptions::development`] waits 1 s and 2 s.
    /// Each 1 ms to 24 h. The delays are waited out in retry queues
    /// (`<queue>.retry.<delay>`, one per distinct delay) that dead-letter
    /// back to the listener's queue: the worker never sleeps on a message.
    pub backoff: Vec<Duration>,
    /// Unacknowledged messages the broker sends this worker ahead of time.
    /// It is also the batching window of a batched listener (see
    /// `batch_size`): measured here, a no-op inbox listener went from 0.25
    /// of a raw consumer's rate at prefetch 16 to 0.5 at 64 and 0.7 at 256.
    /// Lower it for slow listeners shared by many workers (a worker holds
    /// this many back from the others). Default 128; at least
    /// `concurrency`, at most 65,535.
    pub prefetch: u16,
    /// Handlers of this listener running at once in one worker. Default
    /// 4; 1 to 1,024.
    pub concurrency: usize,
    /// Longest a try may run; after it the try counts as a transient
    /// failure (`handler timed out`) and is retried. The handler's thread
    /// cannot be stopped, so it keeps its concurrency slot until it
    /// returns, and inbox transactions get `statement_timeout` set to this.
    /// Must stay below RabbitMQ's `consumer_timeout` (30 min by default).
    /// Default 60 s; 1 ms to 25 min.
    pub timeout: Duration,
    /// Run the handler in a transaction with the inbox row (listener,
    /// event_id): effects exactly once; duplicates are acknowledged
    /// without running the handler. Turn it off for listeners without a
    /// database effect (at least once, no database round trip). Default on.
    pub inbox: bool,
    /// Declare the queue with single active consumer: one worker at a
    /// time gets its messages, in queue order, for listeners that need
    /// per-aggregate order. Retries break that order: a message being
    /// retried waits in a retry queue while later ones are handled. Use
    /// `tries: 1` if order matters more than retries. Changing it needs
    /// the queue deleted first (queue arguments cannot change). Default
    /// off.
    pub single_active_consumer: bool,
    /// A message delivered this many times without being acknowledged
    /// (the worker died or lost its connection while handling it) is
    /// failed without running the handler again: the crash-loop guard.
    /// The queue's broker-side `x-delivery-limit` is set a little above
    /// it as a backstop (messages past it go to the dead-letter queue
    /// without a failed-jobs row). Default 5; 1 to 100.
    pub max_unacked_deliveries: u32,
    /// Inbox listeners only: deliveries handled in one transaction (a
    /// savepoint each, so a failing one rolls back only its own effect and
    /// inbox row) and committed together, then acknowledged: one commit
    /// per batch instead of one per message. A batch closes at this many
    /// deliveries or `batch_wait` after its first. With batching, up to
    /// `prefetch` deliveries are in flight and `concurrency` batches run
    /// at once, so raise `prefetch` for larger batches. 1 turns batching
    /// off; a listener with concurrency 1 is never batched (one message at
    /// a time, in queue order). Default 64; 1 to 1,000.
    pub batch_size: usize,
    /// How long a batch waits for more deliveries after its first: the
    /// most batching adds to a lone message. Default 2 ms; at most 1 s.
    pub batch_wait: Duration,
    /// At most this many deliveries started per second, for listeners that
    /// call outside services with quotas; the rest wait in the queue (the
    /// worker holds no more than `prefetch`). Default none.
    pub rate_limit: Option<RateLimit>,
}

/// A listener's rate limit: `per_second` deliveries started per second on
/// average, up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Deliveries per second; 1 to 1,000,000.
    pub per_second: u32,
    /// Deliveries that may start at once; 1 to 1,000,000.
    pub burst: u32,
}

impl RateLimit {
    /// `per_second` with bursts of one second's worth.
    pub fn per_second(per_second: u32) -> Self {
        Self {
            per_second,
            burst: per_second,
        }
    }

    /// The same rate with bursts of at most `burst`.
    #[must_use]
    pub fn with_burst(self, burst: u32) -> Self {
        Self { burst, ..self }
    }
}

/// The delays of [`ListenerOptions::development`].
const DEVELOPMENT_BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            tries: 3,
            backoff: vec![
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(120),
            ],
            prefetch: 128,
            concurrency: 4,
            timeout: Duration::from_secs(60),
            inbox: true,
            single_active_consumer: false,
            max_unacked_deliveries: 5,
            batch_size: 64,
            batch_wait: Duration::from_millis(2),
            rate_limit: None,
        }
    }
}

impl ListenerOptions {
    /// The development preset: the defaults with 3 tries 1 s and 2 s
    /// apart instead of 30 s and 60 s, so a failing listener is tried again
    /// and ends in failed_jobs within seconds while you watch. Its retry
    /// queues are `<queue>.retry.1s` and `<queue>.retry.2s` (pass
    /// `--retry-delays 1s,2s` to `outbox status` and `outbox topology`).
    /// Use the defaults in production: a service that is down for a
    /// minute would use up these tries.
    ///
    /// ```
    /// use outbox::ListenerOptions;
    /// let options = ListenerOptions { inbox: false, ..ListenerOptions::development() };
    /// assert_eq!(options.distinct_delays().len(), 2);
    /// ```
    pub fn development() -> Self {
        Self::default().retries(3, &DEVELOPMENT_BACKOFF)
    }

    /// Options with `tries` and `backoff` changed.
    #[must_use]
    pub fn retries(mut self, tries: u32, backoff: &[Duration]) -> Self {
        self.tries = tries;
        self.backoff = backoff.to_vec();
        self
    }

    /// Checks every option; the error names the listener and the option.
    pub fn validate(&self, listener: &str) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("listener {listener}: {what}")));
        if !(1..=100).contains(&self.tries) {
            return bad(format!("tries must be between 1 and 100, not {}", self.tries));
        }
        if self.backoff.is_empty() || self.backoff.len() > 100 {
            return bad("backoff must list 1 to 100 delays".into());
        }
        if let Some(delay) = self
            .backoff
            .iter()
            .find(|d| **d < Duration::from_millis(1) || **d > Duration::from_secs(24 * 3600))
        {
            return bad(format!("backoff delay {delay:?} must be between 1 ms and 24 h"));
        }
        if !(1..=1024).contains(&self.concurrency) {
            return bad(format!(
                "concurrency must be between 1 and 1024, not {}",
                self.concurrency
            ));
        }
        if usize::from(self.prefetch) < self.concurrency {
            return bad(format!(
                "prefetch ({}) must be at least the concurrency ({})",
                self.prefetch, self.concurrency
            ));
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(25 * 60) {
            return bad(format!(
                "timeout {:?} must be between 1 ms and 25 min (below RabbitMQ's consumer_timeout)",
                self.timeout
            ));
        }
        if !(1..=1000).contains(&self.batch_size) {
            return bad(format!(
                "batch_size must be between 1 and 1000, not {}",
                self.batch_size
            ));
        }
        if self.batch_wait > Duration::from_secs(1) {
            return bad(format!("batch_wait {:?} must be at most 1 s", self.batch_wait));
        }
        if let Some(limit) = self.rate_limit
            && (!(1..=1_000_000).contains(&limit.per_second) || !(1..=1_000_000).contains(&limit.burst))
        {
            return bad(format!(
                "rate limit {}/s with bursts of {} must have both between 1 and 1,000,000",
                limit.per_second, limit.burst
            ));
        }
        if !(1..=100).contains(&self.max_unacked_deliveries) {
            return bad(format!(
                "max_unacked_deliveries must be between 1 and 100, not {}",
                self.max_unacked_deliveries
            ));
        }
        Ok(())
    }

    /// Whether deliveries are handled in batched transactions: an inbox
    /// listener with `batch_size` over 1 and `concurrency` over 1.
    pub fn batches(&self) -> bool {
        self.inbox && self.batch_size > 1 && self.concurrency > 1
    }

    /// The delay before the next try after `failures` failed tries.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let index = (failures.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(30))
    }

    /// The distinct delays, in order of first use: one retry queue each.
    pub fn distinct_delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = Vec::new();
        for failures in 1..self.tries {
            let delay = self.delay_after(failures);
            if !delays.contains(&delay) {
                delays.push(delay);
            }
        }
        delays
    }
}

/// Whether `name` is a valid listener name.
pub(crate) fn is_valid_listener_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.is_empty()
        && name.len() <= 100
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_backoff_list() {
        let options = ListenerOptions::default();
        assert_eq!(options.delay_after(1), Duration::from_secs(30));
        assert_eq!(options.delay_after(2), Duration::from_secs(60));
        assert_eq!(options.delay_after(3), Duration::from_secs(120));
        assert_eq!(options.delay_after(9), Duration::from_secs(120));
        assert_eq!(
            options.distinct_delays(),
            vec![Duration::from_secs(30), Duration::from_secs(60)]
        );
        let development = ListenerOptions::development();
        assert!(development.validate("l").is_ok());
        assert_eq!(development.tries, 3);
        assert_eq!(
            development.distinct_delays(),
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(
            ListenerOptions {
                backoff: ListenerOptions::default().backoff,
                ..development
            },
            ListenerOptions::default(),
            "only the delays differ from the defaults"
        );
        let one = ListenerOptions::default().retries(5, &[Duration::from_millis(10)]);
        assert_eq!(one.distinct_delays(), vec![Duration::from_millis(10)]);
        assert!(
            ListenerOptions::default()
                .retries(1, &[Duration::from_secs(1)])
                .distinct_delays()
                .is_empty()
        );
    }

    #[test]
    fn bad_options_are_named() {
        let cases = [
            (
                ListenerOptions {
                    tries: 0,
                    ..ListenerOptions::default()
                },
                "tries",
            ),
            (ListenerOptions::default().retries(3, &[]), "backoff"),
            (
                ListenerOptions {
                    prefetch: 1,
                    concurrency: 2,
                    ..ListenerOptions::default()
                },
                "prefetch",
            ),
            (
                ListenerOptions {
                    timeout: Duration::from_secs(3600),
                    ..ListenerOptions::default()
                },
                "consumer_timeout",
            ),
        ];
        for (options, word) in cases {
            let message = options
                .validate("l")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(word), "{word}: {message}");
        }
        assert!(ListenerOptions::default().validate("l").is_ok());
    }

    #[test]
    fn listener_names() {
        assert!(is_valid_listener_name("record_audit_log"));
        assert!(is_valid_listener_name("a1"));
        for bad in ["", "Record", "1a", "a-b", "a.b", "a b"] {
            assert!(!is_valid_listener_name(bad), "{bad}");
        }
    }

    #[test]
    fn errors_print_their_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let error = ListenerError::transient(Outer(std::io::Error::other("inner")));
        assert_eq!(error.to_string(), "outer: inner");
        assert!(!error.is_permanent());
    }
}
