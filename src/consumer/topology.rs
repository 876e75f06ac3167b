//! The broker topology of queued listeners, declared idempotently.
//!
//! Per listener `<app>.<listener>`:
//!
//! | queue | kind | what it does |
//! | --- | --- | --- |
//! | `<app>.<listener>` | quorum | bound to the events exchange once per event type the listener handles; `x-delivery-limit` as a crash-loop backstop, dead-lettering to `.dead` |
//! | `<app>.<listener>.retry.<delay>` | quorum, `x-message-ttl` = delay | one per distinct backoff delay; a failed message waits here, then dead-letters back to the listener's queue (and only there) |
//! | `<app>.<listener>.dead` | quorum | messages that failed for good, beside their failed_jobs rows |
//!
//! Every queue is a quorum queue (`x-queue-type: quorum`): replicated by
//! Raft over `x-quorum-initial-group-size` nodes of a cluster (the
//! broker's default when [`ListenerQueues::quorum_initial_group_size`] is
//! `None`: `quorum_cluster_size`, 3 in RabbitMQ 3.10, fewer on a smaller
//! cluster), available while a majority of them is up. On one node
//! every queue has one member. The exchange is durable, and bindings live
//! in the cluster's metadata store, on every node.
//!
//! Dead-lettering uses the default exchange with the target queue as the
//! routing key, and RabbitMQ's at-least-once strategy, so a message moving
//! between queues is never lost and never reaches another listener. Never
//! lost is not always on time: an expired copy whose dead-letter target
//! cannot be found (RabbitMQ 3.10 once could not find the default exchange
//! after a node restart) leaves the retry queue's ready messages and waits
//! in the queue's dead-letter worker, retried every 180 s at the earliest;
//! the worker's retry repairer (`src/maintenance/retry_repairer.rs`) moves
//! such copies on from its own record.
//! Declaring is idempotent; declaring a queue with different arguments
//! (say, after switching single active consumer) fails with the broker's
//! PRECONDITION_FAILED: delete the queue first.
//!
//! Bindings are only added: after removing an event type from a listener,
//! unbind it by hand (`rabbitmqadmin delete binding ...`).

use std::time::Duration;

use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::amqp::{declare_exchange, validate_amqp_name};
use crate::consumer::listener::{ListenerOptions, is_valid_listener_name};
use crate::error::{Error, Result};
use crate::registry::{QueuedRegistration, Registry};

/// The queues of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerQueues {
    /// The listener's name.
    pub listener: String,
    /// Its queue, `<app>.<listener>`.
    pub queue: String,
    /// Its dead-letter queue, `<app>.<listener>.dead`.
    pub dead: String,
    /// Its retry queues with their delays, `<app>.<listener>.retry.<delay>`.
    pub retries: Vec<(Duration, String)>,
    /// The event types its queue is bound to.
    pub event_types: Vec<String>,
    /// Whether the queue has single active consumer.
    pub single_active_consumer: bool,
    /// The queue's `x-delivery-limit`.
    pub delivery_limit: u32,
    /// `x-quorum-initial-group-size` of every queue: on how many cluster
    /// nodes each is replicated. `None` (the default): the broker's own
    /// default. A queue argument like the others: declaring an existing
    /// queue with another value (or none where it had one) fails with
    /// PRECONDITION_FAILED, so choose it before the queues exist (or
    /// delete them first); change a live queue's members with
    /// `rabbitmq-queues add_member` / `delete_member` instead.
    pub quorum_initial_group_size: Option<u32>,
}

impl ListenerQueues {
    /// The same queues declared with `x-quorum-initial-group-size` =
    /// `size` (`None`: the broker's default).
    pub fn with_quorum_initial_group_size(self, size: Option<u32>) -> Self {
        Self {
            quorum_initial_group_size: size,
            ..self
        }
    }

    /// The retry queue for `delay`.
    pub fn retry_queue(&self, delay: Duration) -> Option<&str> {
        self.retries
            .iter()
            .find(|(d, _)| *d == delay)
            .map(|(_, name)| name.as_str())
    }

    /// The retry queue of the smallest delay of at least `wanted`, or of
    /// the longest delay when none is that long; `None` without retry
    /// queues (one try).
    pub fn retry_queue_at_least(&self, wanted: Duration) -> Option<(Duration, &str)> {
        let longer = self
            .retries
            .iter()
            .filter(|(delay, _)| *delay >= wanted)
            .min_by_key(|(delay, _)| *delay);
        longer
            .or_else(|| self.retries.iter().max_by_key(|(delay, _)| *delay))
            .map(|(delay, name)| (*delay, name.as_str()))
    }

    /// Every queue name, main queue first.
    pub fn all_queues(&self) -> Vec<&str> {
        let mut names = vec![self.queue.as_str(), self.dead.as_str()];
        names.extend(self.retries.iter().map(|(_, name)| name.as_str()));
        names
    }
}

/// The queue names of `registration` under `app`.
pub fn queues_for(app: &str, registration: &QueuedRegistration) -> Result<ListenerQueues> {
    listener_queues(
        app,
        registration.name(),
        registration.event_types(),
        registration.options(),
    )
}

/// The queues the worker declares for a listener named `listener` under
/// `app`, bound to `event_types`, with `options` (its retry delays, single
/// active consumer, delivery limit): for tools that declare or delete a
/// listener's queues without linking its code (`outbox topology`).
pub fn listener_queues(
    app: &str,
    listener: &str,
    event_types: &[String],
    options: &ListenerOptions,
) -> Result<ListenerQueues> {
    validate_amqp_name("app", app)?;
    if !is_valid_listener_name(listener) {
        return Err(Error::Config(format!(
            "listener name {listener:?} must be 1 to 100 lower-case letters, digits or '_', starting with a letter"
        )));
    }
    let queue = format!("{app}.{listener}");
    let dead = dead_queue_name(&queue);
    let retries = options
        .distinct_delays()
        .into_iter()
        .map(|delay| (delay, retry_queue_name(&queue, delay)))
        .collect::<Vec<_>>();
    validate_amqp_name("queue", &dead)?;
    for (_, name) in &retries {
        validate_amqp_name("queue", name)?;
    }
    Ok(ListenerQueues {
        listener: listener.to_owned(),
        queue,
        dead,
        retries,
        event_types: event_types.to_vec(),
        single_active_consumer: options.single_active_consumer,
        delivery_limit: options.max_unacked_deliveries + 3,
        quorum_initial_group_size: None,
    })
}

/// The retry queue of listener queue `queue` for `delay`:
/// `<queue>.retry.<delay_label(delay)>`.
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", delay_label(delay))
}

/// The dead-letter queue of listener queue `queue`: `<queue>.dead`.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The queues of every queued listener of `registry` under `app`.
pub fn plan(app: &str, registry: &Registry) -> Result<Vec<ListenerQueues>> {
    registry
        .queued_listeners()
        .iter()
        .map(|registration| queues_for(app, registration))
        .collect()
}

/// `30s`, `1500ms`, `2m`, `1h`: short, exact, and valid in a queue name.
pub fn delay_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn quorum_arguments(queues: &ListenerQueues) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    if let Some(size) = queues.quorum_initial_group_size {
        arguments.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(i32::try_from(size).unwrap_or(i32::MAX)),
        );
    }
    arguments
}

/// Dead-letter to `target` through the default exchange, at least once.
fn dead_letter_to(arguments: &mut FieldTable, target: &str) {
    arguments.insert("x-dead-letter-exchange".into(), text(""));
    arguments.insert("x-dead-letter-routing-key".into(), text(target));
    arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    // Required by at-least-once dead-lettering.
    arguments.insert("x-overflow".into(), text("reject-publish"));
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
        .map_err(|source| Error::Broker {
            context: format!(
                "cannot declare queue {name} (if it exists with other arguments, delete it first)"
            ),
            source,
        })
}

/// Declares the exchange, then every listener's dead-letter, retry and
/// main queues and the main queue's bindings. Idempotent. Returns the
/// queues declared.
pub async fn declare(
    channel: &Channel,
    exchange: &str,
    app: &str,
    registry: &Registry,
) -> Result<Vec<ListenerQueues>> {
    validate_amqp_name("exchange", exchange)?;
    let plan = plan(app, registry)?;
    declare_exchange(channel, exchange).await?;
    for queues in &plan {
        declare_listener(channel, exchange, queues).await?;
    }
    Ok(plan)
}

/// Declares one listener's queues and bindings.
pub async fn declare_listener(channel: &Channel, exchange: &str, queues: &ListenerQueues) -> Result<()> {
    declare_queue(channel, &queues.dead, quorum_arguments(queues)).await?;
    for (delay, name) in &queues.retries {
        let mut arguments = quorum_arguments(queues);
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        dead_letter_to(&mut arguments, &queues.queue);
        declare_queue(channel, name, arguments).await?;
    }
    let mut arguments = quorum_arguments(queues);
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(queues.delivery_limit).unwrap_or(i32::MAX)),
    );
    dead_letter_to(&mut arguments, &queues.dead);
    if queues.single_active_consumer {
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    declare_queue(channel, &queues.queue, arguments).await?;
    for event_type in &queues.event_types {
        channel
            .queue_bind(
                queues.queue.as_str().into(),
                exchange.into(),
                event_type.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| Error::Broker {
                context: format!(
                    "cannot bind queue {} to {exchange} for {event_type}",
                    queues.queue
                ),
                source,
            })?;
    }
    Ok(())
}

/// Deletes the queues of `queues` (messages in them are lost): for tests
/// and for tearing down a listener that is gone for good.
pub async fn delete(channel: &Channel, queues: &[ListenerQueues]) -> Result<()> {
    for listener in queues {
        for name in listener.all_queues() {
            channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map_err(|source| Error::Broker {
                    context: format!("cannot delete queue {name}"),
                    source,
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_is_a_quorum_queue_with_the_group_size_set() {
        let options = ListenerOptions::default();
        let queues = listener_queues("app", "audit", &["site.created".to_owned()], &options)
            .unwrap_or_else(|e| panic!("{e}"));
        let arguments = quorum_arguments(&queues);
        assert_eq!(arguments.inner().get("x-queue-type"), Some(&text("quorum")));
        assert!(arguments.inner().get("x-quorum-initial-group-size").is_none());
        let sized = queues.with_quorum_initial_group_size(Some(3));
        assert_eq!(
            quorum_arguments(&sized)
                .inner()
                .get("x-quorum-initial-group-size"),
            Some(&AMQPValue::LongInt(3))
        );
    }

    #[test]
    fn retry_queues_at_least_a_wait() {
        let options =
            ListenerOptions::default().retries(4, &[Duration::from_secs(1), Duration::from_secs(10)]);
        let queues = listener_queues("app", "audit", &[], &options).unwrap_or_else(|e| panic!("{e}"));
        let delay = |wanted| queues.retry_queue_at_least(wanted).map(|(delay, _)| delay);
        assert_eq!(delay(Duration::from_millis(10)), Some(Duration::from_secs(1)));
        assert_eq!(delay(Duration::from_secs(1)), Some(Duration::from_secs(1)));
        assert_eq!(delay(Duration::from_secs(2)), Some(Duration::from_secs(10)));
        assert_eq!(
            delay(Duration::from_secs(60)),
            Some(Duration::from_secs(10)),
            "the longest"
        );
        let one_try = listener_queues(
            "app",
            "audit",
            &[],
            &ListenerOptions::default().retries(1, &[Duration::from_secs(1)]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(one_try.retry_queue_at_least(Duration::from_secs(1)).is_none());
    }

    #[test]
    fn delay_labels() {
        assert_eq!(delay_label(Duration::from_secs(30)), "30s");
        assert_eq!(delay_label(Duration::from_secs(120)), "2m");
        assert_eq!(delay_label(Duration::from_secs(7200)), "2h");
        assert_eq!(delay_label(Duration::from_millis(1500)), "1500ms");
        assert_eq!(delay_label(Duration::from_millis(20)), "20ms");
    }
}

/// The depths of one listener's queues, read with passive declares (no
/// management plugin); a depth is `None` when that queue does not exist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepths {
    /// Messages ready in `<app>.<listener>`.
    pub depth: Option<u32>,
    /// Each retry queue with its depth.
    pub retry_queues: Vec<(String, Option<u32>)>,
    /// Messages waiting out a delay, over every retry queue.
    pub retry_depth: u32,
    /// Copies in `<queue>.dead`.
    pub dead_depth: Option<u32>,
}

/// Reads the depths of `queue`, its `retry_queues` and `dead_queue`.
pub async fn measure_depths(
    connection: &lapin::Connection,
    queue: &str,
    retry_queues: &[String],
    dead_queue: &str,
) -> Result<QueueDepths> {
    let depth = crate::amqp::queue_depth(connection, queue).await?;
    let dead_depth = crate::amqp::queue_depth(connection, dead_queue).await?;
    let mut retries = Vec::with_capacity(retry_queues.len());
    for name in retry_queues {
        retries.push((name.clone(), crate::amqp::queue_depth(connection, name).await?));
    }
    Ok(QueueDepths {
        depth,
        retry_depth: retries.iter().filter_map(|(_, d)| *d).sum(),
        retry_queues: retries,
        dead_depth,
    })
}
