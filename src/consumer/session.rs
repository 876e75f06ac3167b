//! The worker's broker session: one connection, a confirm-mode channel for
//! the retry and dead-letter copies, a channel and consumer per listener;
//! ended by shutdown (handlers in flight get `shutdown_timeout`) or by the
//! broker going away.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::amqp::{self, SessionEnd, SessionLost};
use crate::consumer::batch::Batcher;
use crate::consumer::config::WorkerConfig;
use crate::consumer::pipeline::{CopyPublisher, ListenerLoop, ListenerShared, WaitingSteps};
use crate::consumer::topology::{self, ListenerQueues};
use crate::database::PgPool;
use crate::error::{Error, Result};
use crate::metrics::Health;
use crate::registry::QueuedRegistration;
use crate::upcast::Upcasters;

/// One broker connection: a confirm-mode channel for retry and
/// dead-letter copies, and a channel and consumer per listener.
pub(crate) struct ConsumerSession {
    connection: Connection,
    publish: Channel,
    consumers: Vec<ListenerLoop>,
    stop_tx: watch::Sender<bool>,
}

impl ConsumerSession {
    /// Connects, enables confirms on the publish channel, declares the
    /// topology (when configured) and starts consuming every listener's
    /// queue.
    pub(crate) async fn open(
        config: &WorkerConfig,
        broker: &amqp::BrokerConnector,
        listeners: &[(QueuedRegistration, ListenerQueues)],
        upcasters: &Arc<Upcasters>,
        pool: &PgPool,
        health: &Arc<Health>,
    ) -> Result<Self> {
        let connection = broker
            .connect(&format!("outbox-worker {}", config.worker_id))
            .await?;
        let broker = |context: String| move |source| Error::Broker { context, source };
        let publish = amqp::open_channel(&connection, true).await?;
        if config.declare_topology {
            amqp::declare_exchange(&publish, &config.exchange).await?;
            for (_, queues) in listeners {
                topology::declare_listener(&publish, &config.exchange, queues).await?;
            }
        }
        let publisher = Arc::new(CopyPublisher {
            channel: publish.clone(),
            confirm_timeout: config.confirm_timeout,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let accept_sources: Arc<[String]> = config.accept_sources.clone().into();
        let mut consumers = Vec::new();
        for (registration, queues) in listeners {
            let channel = amqp::open_channel(&connection, false).await?;
            channel
                .basic_qos(registration.options().prefetch, BasicQosOptions::default())
                .await
                .map_err(broker(format!("cannot set the prefetch of {}", queues.queue)))?;
            let tag = format!("{}.{}", config.worker_id, registration.name());
            let consumer = channel
                .basic_consume(
                    queues.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker(format!("cannot consume {}", queues.queue)))?;
            consumers.push(ListenerLoop {
                shared: Arc::new(ListenerShared {
                    registration: registration.clone(),
                    queues: queues.clone(),
                    pool: pool.clone(),
                    publisher: Arc::clone(&publisher),
                    health: Arc::clone(health),
                    stop: stop_rx.clone(),
                    reconnect_max: config.reconnect_max,
                    accept_sources: Arc::clone(&accept_sources),
                    upcasters: Arc::clone(upcasters),
                    foreign_sources_seen: std::sync::Mutex::default(),
                    waiting: WaitingSteps::default(),
                    ack_timed_out: tokio::sync::Notify::new(),
                    batcher: registration
                        .options()
                        .batches()
                        .then(|| Batcher::start(registration.clone(), pool.clone())),
                }),
                channel,
                consumer,
                tag,
            });
        }
        Ok(Self {
            connection,
            publish,
            consumers,
            stop_tx,
        })
    }

    pub(crate) async fn run<F: Future<Output = ()>>(
        self,
        mut shutdown: std::pin::Pin<&mut F>,
        config: &WorkerConfig,
    ) -> SessionEnd {
        let ConsumerSession {
            connection,
            publish,
            consumers,
            stop_tx,
        } = self;
        let mut loops = JoinSet::new();
        let mut cancel = Vec::new();
        let shared: Vec<Arc<ListenerShared>> = consumers.iter().map(|c| Arc::clone(&c.shared)).collect();
        for consumer in consumers {
            cancel.push((consumer.channel.clone(), consumer.tag.clone()));
            loops.spawn(consumer.run());
        }
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let end = loop {
            tokio::select! {
                () = &mut shutdown => break SessionEnd::Shutdown,
                done = loops.join_next() => {
                    let lost = match done {
                        Some(Ok(Err(lost))) => lost,
                        Some(Ok(Ok(()))) | None => SessionLost::ListenersEnded,
                        Some(Err(e)) => SessionLost::ListenerLoop(e),
                    };
                    break SessionEnd::BrokerLost(lost);
                }
                _ = check.tick() => {
                    if !connection.status().connected() {
                        break SessionEnd::BrokerLost(SessionLost::ConnectionClosed);
                    }
                    // Without the publish channel no failure can be sent on:
                    // start over with a fresh session.
                    if !publish.status().connected() {
                        break SessionEnd::BrokerLost(SessionLost::ChannelClosed);
                    }
                }
            }
        };
        if matches!(end, SessionEnd::Shutdown) {
            tracing::info!("worker stopping: no new messages, waiting for handlers in flight");
            for (channel, tag) in &cancel {
                // Bounded: a broker that stopped answering must not hold
                // up the shutdown.
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await;
            }
        }
        let _ = stop_tx.send(true);
        // Each loop waits for its own handlers; bound the whole wait.
        let drained = tokio::time::timeout(config.shutdown_timeout, async {
            while loops.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Which steps held them: a handler, the database or the broker.
            let waiting: Vec<String> = shared
                .iter()
                .filter_map(|s| Some(format!("{}: {}", s.registration.name(), s.waiting.describe()?)))
                .collect();
            tracing::warn!(
                waiting = %waiting.join("; "),
                "deliveries still in the pipeline after the shutdown timeout; their messages go back to the queue"
            );
            loops.abort_all();
            while loops.join_next().await.is_some() {}
        }
        if connection.status().connected() {
            // Channels first, then the connection (unacknowledged messages
            // go back to their queues either way).
            let channels = cancel
                .iter()
                .map(|(channel, _)| channel)
                .chain(std::iter::once(&publish));
            for channel in channels {
                if channel.status().connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        channel.close(200, "worker stopping".into()),
                    )
                    .await;
                }
            }
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "worker stopping".into()),
            )
            .await;
        }
        end
    }
}
