//! Connecting to RabbitMQ and declaring the outbox's exchange.

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::database::redact_url;
use crate::error::{Error, Result, Unconfirmed};

/// Where the outbox looks for RabbitMQ when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The topic exchange events are published to unless configured otherwise.
pub const DEFAULT_EXCHANGE: &str = "outbox.events";

/// Opens an AMQP connection named `connection_name` (shown in the broker's
/// management UI). Errors name the URL with its password redacted.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(url, properties)
        .await
        .map_err(|source| Error::Broker {
            context: format!("cannot connect to {}", redact_url(url)),
            source,
        })
}

/// Declares `exchange` as a durable topic exchange; idempotent.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| Error::Broker {
            context: format!("cannot declare exchange {exchange}"),
            source,
        })
}

/// Checks an exchange or queue name: AMQP allows at most 255 bytes of
/// letters, digits, `-`, `_`, `.` and `:`. Anything else (quotes,
/// semicolons, spaces) is refused up front rather than sent to the broker.
pub fn validate_amqp_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{kind} name {name:?} must be 1 to 255 characters of letters, digits, '-', '_', '.' or ':'"
        )))
    }
}

/// Checks that `url` is an `amqp://` or `amqps://` URL, without echoing a
/// password.
pub fn validate_amqp_url(url: &str) -> Result<()> {
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "amqp" | "amqps") && parsed.host().is_some() => Ok(()),
        Ok(parsed) => Err(Error::Config(format!(
            "AMQP URL {} must start with amqp:// or amqps:// and name a host (scheme was {:?})",
            redact_url(url),
            parsed.scheme()
        ))),
        Err(e) => Err(Error::Config(format!(
            "AMQP URL {} does not parse: {e}",
            redact_url(url)
        ))),
    }
}

/// How many ready messages queue `name` holds, read with a passive
/// `queue.declare` (no management plugin needed); `None` when the queue
/// does not exist. Each probe uses a channel of its own, since the
/// broker closes the channel of a passive declare of a missing queue.
pub async fn queue_depth(connection: &Connection, name: &str) -> Result<Option<u32>> {
    let channel = open_channel(connection, false).await?;
    let declared = channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => {
            let _ = channel.close(200, "done".into()).await;
            Ok(Some(queue.message_count()))
        }
        Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404) => {
            Ok(None)
        }
        Err(source) => Err(Error::Broker {
            context: format!("cannot read the depth of queue {name}"),
            source,
        }),
    }
}

/// Opens a channel on `connection`, in confirm mode (every publish on it
/// is acknowledged by the broker) when `confirms` is set.
pub async fn open_channel(connection: &Connection, confirms: bool) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| Error::Broker {
            context: "cannot open a channel".into(),
            source,
        })?;
    if confirms {
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(|source| Error::Broker {
                context: "cannot enable publisher confirms".into(),
                source,
            })?;
    }
    Ok(channel)
}

/// Publishes one persistent message straight to `queue` (through the
/// default exchange, `mandatory`) and waits up to `confirm_timeout` for the
/// broker's confirm. `channel` must be in confirm mode. A return (no such
/// queue), a nack or no confirm in time is [`Error::Unconfirmed`] with its
/// [`Unconfirmed`] reason; one
/// message at a time, so a return cannot be mistaken for another's.
pub async fn publish_to_queue(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
    confirm_timeout: std::time::Duration,
) -> Result<()> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..lapin::options::BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(|source| Error::Broker {
            context: format!("cannot publish to {queue}"),
            source,
        })?;
    let confirmation = tokio::time::timeout(confirm_timeout, confirm)
        .await
        .map_err(|_| Error::Unconfirmed {
            context: format!("publish to {queue}"),
            reason: Unconfirmed::TimedOut(confirm_timeout),
        })?
        .map_err(|source| Error::Broker {
            context: format!("publishing to {queue}"),
            source,
        })?;
    match confirmation {
        lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => Ok(()),
        // A mandatory publish to the default exchange comes back only when
        // the queue does not exist.
        lapin::Confirmation::Ack(Some(_)) => Err(Error::Unconfirmed {
            context: format!("publish to {queue}, which does not exist"),
            reason: Unconfirmed::Unroutable,
        }),
        lapin::Confirmation::Nack(_) => Err(Error::Unconfirmed {
            context: format!("publish to {queue}"),
            reason: Unconfirmed::Nacked,
        }),
    }
}

/// How a relay's or a worker's broker session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was requested and the session drained.
    Shutdown,
    /// The broker connection was lost; reconnect and start a new session.
    BrokerLost(SessionLost),
}

/// Why a broker session ended without a shutdown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionLost {
    /// The connection is no longer open.
    #[error("connection closed")]
    ConnectionClosed,
    /// The confirm-mode channel is no longer open.
    #[error("publish channel closed")]
    ChannelClosed,
    /// A publish could not be sent.
    #[error("publish failed")]
    Publish(#[source] lapin::Error),
    /// The channel failed before a publish was confirmed.
    #[error("confirm lost")]
    Confirm(#[source] lapin::Error),
    /// A listener's consumer failed.
    #[error("consumer of {queue} failed")]
    Consumer {
        /// The listener's queue.
        queue: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// The broker cancelled a listener's consumer (its queue was deleted).
    #[error("consumer of {0} was cancelled")]
    ConsumerCancelled(String),
    /// A listener loop panicked.
    #[error("a listener loop failed")]
    ListenerLoop(#[source] tokio::task::JoinError),
    /// Every listener loop ended.
    #[error("no listener loop left")]
    ListenersEnded,
}
