//! The worker: runs a registry's queued listeners, each from its own queue,
//! over one broker connection it re-opens with backoff when lost.
//!
//! A message's path, file by file: [`config`](super::config) says how the
//! worker connects; [`session`](super::session) opens the connection, the
//! channels and one consumer per listener; [`pipeline`](super::pipeline)
//! takes each delivery through decode, handler, and ack, retry or
//! dead-letter; [`inbox`](super::inbox) is the handler's transaction for
//! listeners with an inbox; [`attempts`](super::attempts) counts failed
//! tries and writes failed jobs; [`headers`](super::headers) sizes the
//! headers of retry and dead-letter copies.
//!
//! ## One message
//!
//! 1. Decode the CloudEvents body. A body that does not decode, or whose
//!    type the listener is not registered for, fails at once.
//! 2. When the message may have been seen before (the broker's
//!    `redelivered` flag, or the retry marker this worker adds), read the
//!    trusted state from Postgres: the failed tries so far, and whether a
//!    failed job already exists (then it only needs dead-lettering). A
//!    message redelivered `max_unacked_deliveries` times without an ack
//!    (the broker's own `x-delivery-count`, clamped) is failed without
//!    running the handler again.
//! 3. Run the handler on the blocking pool, in an inbox transaction when
//!    the listener has one, under the listener's timeout.
//! 4. Success: ack. Failure: count it in `listener_attempts`; if tries
//!    remain, publish the message to the retry queue of the backoff delay
//!    (with a publisher confirm) and ack; if not (or the error was
//!    permanent), write the failed_jobs row, publish to the dead-letter
//!    queue, ack.
//!
//! Database or broker trouble in the framework's own steps (no pooled
//! connection, a publish not confirmed) never counts as a try: the worker
//! waits with backoff and tries the step again, holding the message, so
//! the listener's prefetch window stops the flow until things recover.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};

use crate::amqp::SessionEnd;
use crate::consumer::config::WorkerConfig;
use crate::consumer::registration;
use crate::consumer::session::ConsumerSession;
use crate::consumer::topology::{self, ListenerQueues};
use crate::database::PgPool;
use crate::delay::Backoff;
use crate::error::{Error, Result, error_chain};
use crate::maintenance::Maintenance;
use crate::maintenance::attempts_pruner::AttemptsPruner;
use crate::maintenance::inbox_pruner::InboxPruner;
use crate::maintenance::projection_rebuilder::ProjectionRebuilder;
use crate::maintenance::retry_repairer::RetryRepairer;
#[cfg(feature = "webhooks")]
use crate::maintenance::webhook_log_pruner::WebhookLogPruner;
use crate::metrics::Health;
use crate::registry::{QueuedRegistration, Registry};
use crate::upcast::Upcasters;

/// A worker running a registry's queued listeners.
pub struct Worker {
    config: Arc<WorkerConfig>,
    listeners: Vec<(QueuedRegistration, ListenerQueues)>,
    upcasters: Arc<Upcasters>,
    projections: Vec<Arc<dyn crate::projection::Projection>>,
    pool: PgPool,
    health: Arc<Health>,
    /// The brokers of `amqp_url`, and which to try next.
    broker: crate::amqp::BrokerConnector,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field(
                "listeners",
                &self.listeners.iter().map(|(r, _)| r.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Checks `config` and the registry's queued listeners and prepares a
    /// lazily connecting pool (a database still starting is waited for,
    /// not an error here).
    pub fn new(config: WorkerConfig, registry: &Registry) -> Result<Self> {
        config.validate()?;
        let broker = crate::amqp::BrokerConnector::new(&config.amqp_url)?;
        if registry.queued_listeners().is_empty() {
            return Err(Error::Config("the registry has no queued listener to run".into()));
        }
        let listeners = registry
            .queued_listeners()
            .iter()
            .map(|r| {
                let queues = topology::queues_for(&config.app, r)?
                    .with_quorum_initial_group_size(config.quorum_initial_group_size);
                Ok((r.clone(), queues))
            })
            .collect::<Result<Vec<_>>>()?;
        if config.prune_interval.is_some() {
            check_attempts_retention(&config, &listeners)?;
        }
        let concurrency: usize = listeners.iter().map(|(r, _)| r.options().concurrency).sum();
        let size = config
            .pool_size
            .unwrap_or_else(|| u32::try_from(concurrency + 2).unwrap_or(64).min(64));
        let pool = Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(5))
            .build_unchecked(ConnectionManager::<PgConnection>::new(&config.database_url));
        Ok(Self {
            config: Arc::new(config),
            listeners,
            upcasters: Arc::new(registry.upcasters().clone()),
            projections: registry.projections(),
            pool,
            health: Arc::new(Health::default()),
            broker,
        })
    }

    /// Records this worker's listeners and queues in `outbox_listeners`, in
    /// the background: a database that is down, or a role without the
    /// grant, costs a log line, never the worker.
    fn register_listeners(&self) {
        let (pool, config) = (self.pool.clone(), Arc::clone(&self.config));
        let queues: Vec<(ListenerQueues, bool)> = self
            .listeners
            .iter()
            .map(|(registration, queues)| (queues.clone(), registration.options().inbox))
            .collect();
        tokio::spawn(async move {
            let registered = crate::database::run_blocking(&pool, move |conn| {
                registration::register(conn, &config.exchange, &config.app, &config.worker_id, &queues)
            })
            .await;
            if let Err(error) = registered {
                tracing::warn!(error = %error_chain(&error), "cannot register the worker's listeners in outbox_listeners; `outbox status` will not list them");
            }
        });
    }

    /// Health flags, for `/health`.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// The queues of the listeners this worker runs.
    pub fn queues(&self) -> Vec<ListenerQueues> {
        self.listeners.iter().map(|(_, q)| q.clone()).collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Declares the exchange and every listener's queues, retry queues,
    /// dead-letter queue and bindings now, over a connection of its own
    /// (idempotent; [`run`](Self::run) declares them again on every connect
    /// unless [`WorkerConfig::declare_topology`] is off). Call it before
    /// starting a relay in the same process: an event published before its
    /// listener's queue is bound reaches no queue and is kept as unroutable
    /// (or, with strict routing, retried). Returns the queues declared.
    pub async fn declare_topology(&self) -> Result<Vec<ListenerQueues>> {
        let connection = self
            .broker
            .connect(&format!("outbox-worker {} topology", self.config.worker_id))
            .await?;
        let declared = async {
            let channel = crate::amqp::open_channel(&connection, false).await?;
            crate::amqp::declare_exchange(&channel, &self.config.exchange).await?;
            for (_, queues) in &self.listeners {
                topology::declare_listener(&channel, &self.config.exchange, queues).await?;
            }
            Ok(self.queues())
        }
        .await;
        let _ = connection.close(200, "topology declared".into()).await;
        declared
    }

    /// Consumes until `shutdown` resolves, reconnecting with backoff when
    /// the broker goes away. On shutdown it stops taking messages, waits
    /// up to `shutdown_timeout` for handlers in flight, and closes the
    /// connection, which returns every unacknowledged message to its
    /// queue. Beside the listeners it prunes old inbox rows and attempt
    /// counts every [`WorkerConfig::prune_interval`] (see
    /// [`WorkerConfig::inbox_retention`]), and with the webhook delivery
    /// listener its log ([`WorkerConfig::webhook_log_retention`]); pruning
    /// stops with the worker.
    pub async fn run<F: Future<Output = ()>>(&self, shutdown: F) -> Result<()> {
        crate::metrics::describe();
        self.health.set_database_ok(true);
        tracing::info!(worker_id = %self.config.worker_id, app = %self.config.app, listeners = self.listeners.len(), "worker starting");
        self.register_listeners();
        let mut maintenance = Maintenance::new(self.pool.clone());
        if let Some(period) = self.config.prune_interval {
            maintenance.start(InboxPruner::new(self.config.inbox_retention, period));
            maintenance.start(AttemptsPruner::new(self.config.attempts_retention, period));
            #[cfg(feature = "webhooks")]
            if self
                .listeners
                .iter()
                .any(|(registration, _)| registration.name() == crate::webhooks::DELIVERY_LISTENER)
            {
                maintenance.start(WebhookLogPruner::new(self.config.webhook_log_retention, period));
            }
        }
        if let Some(period) = self.config.retry_repair_interval {
            match RetryRepairer::new(&self.config, period, &self.queues()) {
                Ok(Some(repairer)) => maintenance.start(repairer),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "cannot start the retry repairer; overdue retry copies will not be moved on");
                }
            }
        }
        for projection in &self.projections {
            maintenance.start(ProjectionRebuilder {
                projection: Arc::clone(projection),
                upcasters: Arc::clone(&self.upcasters),
                period: crate::projection::REBUILD_POLL,
            });
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut reconnect = Backoff::new(Duration::from_millis(100), self.config.reconnect_max);
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => break,
                opened = tokio::time::timeout(Duration::from_secs(60), ConsumerSession::open(&self.config, &self.broker, &self.listeners, &self.upcasters, &self.pool, &self.health)) => {
                    opened.unwrap_or_else(|_| Err(Error::Config("broker session setup took over 60 s".into())))
                }
            };
            match opened {
                Ok(session) => {
                    reconnect.reset();
                    self.health.set_broker_ok(true);
                    tracing::info!(worker_id = %self.config.worker_id, broker = %self.broker.current(), "worker connected to the broker");
                    let end = session.run(shutdown.as_mut(), &self.config).await;
                    self.health.set_broker_ok(false);
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::BrokerLost(reason) => {
                            metrics::counter!(crate::metrics::BROKER_RECONNECTS_TOTAL).increment(1);
                            tracing::warn!(reason = %error_chain(&reason), broker = %self.broker.current(), "worker lost the broker; reconnecting");
                            self.broker.connection_lost();
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), retry_in = ?reconnect.upcoming(), "worker cannot set up its broker session");
                    // Perhaps connected to a node that cannot serve yet:
                    // try the others first.
                    self.broker.connection_lost();
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(reconnect.next_delay()) => {}
            }
        }
        maintenance.stop().await;
        tracing::info!(worker_id = %self.config.worker_id, "worker stopped");
        Ok(())
    }
}

/// Refuses an attempts retention that a count being retried could outlast
/// (its longest retry delay plus the try's timeout): the pruner would
/// delete it and the event would get its tries again.
fn check_attempts_retention(
    config: &WorkerConfig,
    listeners: &[(QueuedRegistration, ListenerQueues)],
) -> Result<()> {
    for (registration, _) in listeners {
        let options = registration.options();
        let longest = (1..options.tries)
            .map(|failures| options.delay_after(failures))
            .max()
            .unwrap_or_default();
        if longest.is_zero() {
            continue;
        }
        let needed = longest.saturating_add(options.timeout);
        if config.attempts_retention <= needed {
            return Err(Error::Config(format!(
                "attempts retention ({:?}) must be longer than listener {}'s longest retry delay plus its timeout ({needed:?}), or its retried events would get their tries again",
                config.attempts_retention,
                registration.name()
            )));
        }
    }
    Ok(())
}
