//! Connecting to RabbitMQ and declaring the outbox's exchange.
//!
//! ## Several brokers
//!
//! `AMQP_URL` (and every `--amqp-url`) may list several brokers, comma
//! separated: the nodes of a RabbitMQ cluster,
//! `amqp://app:pw@mq1:5672/%2f,amqp://app:pw@mq2:5672/%2f`. The list is
//! parsed and checked once ([`BrokerAddresses::parse`]); a connect tries
//! the addresses in turn until one answers (each given
//! [`CONNECT_TIMEOUT_PER_ADDRESS`] when there are others to try). Relays
//! and workers keep a [`BrokerConnector`]: their first connect starts at
//! the first address, and after a lost connection the next one starts at
//! the address after the one lost, so a dead node is tried last, not
//! first. Their reconnect backoff is unchanged: it runs between whole
//! passes over the list. A comma splits the list only where an `amqp://`
//! or `amqps://` URL follows it, so a comma inside a password stays in it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::database::{redact_url, split_url_list};
use crate::error::{Error, Result, Unconfirmed};

/// Where the outbox looks for RabbitMQ when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The topic exchange events are published to unless configured otherwise.
pub const DEFAULT_EXCHANGE: &str = "outbox.events";

/// How long one address of a list of several may take to answer before
/// the next is tried (a single address has no bound of its own: callers
/// bound the whole connect).
pub const CONNECT_TIMEOUT_PER_ADDRESS: Duration = Duration::from_secs(10);

/// The most addresses one list may hold.
const MAX_ADDRESSES: usize = 64;

/// A checked list of broker URLs (`AMQP_URL`: one URL, or several comma
/// separated). `Debug` and [`redacted`](Self::redacted) hide passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddresses {
    urls: Vec<String>,
}

impl std::fmt::Debug for BrokerAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BrokerAddresses").field(&self.redacted()).finish()
    }
}

impl BrokerAddresses {
    /// Parses and checks `list`: each entry must be an `amqp://` or
    /// `amqps://` URL naming a host; an empty entry (a stray comma) is an
    /// error. Errors name the entry by position, its password redacted.
    pub fn parse(list: &str) -> Result<Self> {
        let pieces = split_url_list(list);
        let count = pieces.len();
        if count > MAX_ADDRESSES {
            return Err(Error::Config(format!(
                "AMQP URL list has {count} entries; at most {MAX_ADDRESSES} are allowed"
            )));
        }
        let mut urls = Vec::with_capacity(count);
        for (index, piece) in pieces.into_iter().enumerate() {
            let checked = if piece.is_empty() {
                Err(Error::Config(
                    "AMQP URL is empty (a stray comma in the list?)".to_owned(),
                ))
            } else {
                validate_one_amqp_url(piece)
            };
            match checked {
                Ok(()) => urls.push(piece.to_owned()),
                Err(Error::Config(message)) if count > 1 => {
                    return Err(Error::Config(format!(
                        "entry {} of {count} in the AMQP URL list: {message}",
                        index + 1
                    )));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(Self { urls })
    }

    /// The URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// How many addresses the list holds (at least one).
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Always false: a parsed list holds at least one address.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The list with every password replaced by `***`.
    pub fn redacted(&self) -> String {
        self.urls
            .iter()
            .map(|url| redact_url(url))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Opens a connection to the first broker of `urls` (one AMQP URL, or
/// several comma separated; see the module docs) that answers, named
/// `connection_name` (shown in the broker's management UI). Errors name
/// each URL tried with its password redacted.
pub async fn connect(urls: &str, connection_name: &str) -> Result<Connection> {
    let addresses = BrokerAddresses::parse(urls)?;
    connect_from(&addresses, 0, connection_name)
        .await
        .map(|(connection, _)| connection)
}

/// Tries the addresses from `start` on, wrapping around; returns the
/// connection and the index of the address that answered.
async fn connect_from(
    addresses: &BrokerAddresses,
    start: usize,
    connection_name: &str,
) -> Result<(Connection, usize)> {
    let count = addresses.len();
    // Each address tried, with why it failed; the last one's reason is
    // the error's source.
    let mut failures: Vec<(String, lapin::Error)> = Vec::with_capacity(count);
    for step in 0..count {
        let index = (start + step) % count;
        let url = &addresses.urls[index];
        let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
        let attempt = Connection::connect(url, properties);
        let result = if count > 1 {
            tokio::time::timeout(CONNECT_TIMEOUT_PER_ADDRESS, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(lapin::Error::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {CONNECT_TIMEOUT_PER_ADDRESS:?}"),
                    )))
                })
        } else {
            attempt.await
        };
        match result {
            Ok(connection) => {
                if step > 0 {
                    tracing::info!(broker = %redact_url(url), skipped = step, "connected to a later broker of the list");
                }
                return Ok((connection, index));
            }
            Err(error) => {
                if count > 1 {
                    tracing::debug!(broker = %redact_url(url), error = %error, "broker did not answer; trying the next");
                }
                failures.push((redact_url(url), error));
            }
        }
    }
    let Some((last_url, source)) = failures.pop() else {
        return Err(Error::Config("no broker address to connect to".to_owned()));
    };
    let context = if failures.is_empty() {
        format!("cannot connect to {last_url}")
    } else {
        let earlier: Vec<String> = failures
            .iter()
            .map(|(url, error)| format!("{url} ({error})"))
            .collect();
        format!(
            "cannot connect to any of {count} brokers: {}, then {last_url}",
            earlier.join(", ")
        )
    };
    Err(Error::Broker { context, source })
}

/// A relay's or a worker's way to its brokers: connects to the first
/// address that answers, starting after a loss from the address after the
/// one lost (see the module docs).
#[derive(Debug)]
pub struct BrokerConnector {
    addresses: BrokerAddresses,
    /// Where the next connect starts.
    next: AtomicUsize,
    /// The address of the connection opened last.
    current: AtomicUsize,
}

impl BrokerConnector {
    /// A connector for `urls` (parsed and checked here).
    pub fn new(urls: &str) -> Result<Self> {
        Ok(Self::from_addresses(BrokerAddresses::parse(urls)?))
    }

    /// A connector for addresses already parsed.
    pub fn from_addresses(addresses: BrokerAddresses) -> Self {
        Self {
            addresses,
            next: AtomicUsize::new(0),
            current: AtomicUsize::new(0),
        }
    }

    /// The addresses.
    pub fn addresses(&self) -> &BrokerAddresses {
        &self.addresses
    }

    /// Connects to the first address that answers, from where the last
    /// connect or loss left off.
    pub async fn connect(&self, connection_name: &str) -> Result<Connection> {
        let start = self.next.load(Ordering::Relaxed) % self.addresses.len().max(1);
        let (connection, index) = connect_from(&self.addresses, start, connection_name).await?;
        self.current.store(index, Ordering::Relaxed);
        self.next.store(index, Ordering::Relaxed);
        Ok(connection)
    }

    /// The connection opened last was lost (or its session could not be
    /// set up): the next connect starts at the address after it.
    pub fn connection_lost(&self) {
        let count = self.addresses.len().max(1);
        let current = self.current.load(Ordering::Relaxed);
        self.next.store((current + 1) % count, Ordering::Relaxed);
    }

    /// The address of the connection opened last, its password redacted.
    pub fn current(&self) -> String {
        let index = self.current.load(Ordering::Relaxed);
        self.addresses
            .urls
            .get(index)
            .map(|url| redact_url(url))
            .unwrap_or_default()
    }

    /// The index in the list of the connection opened last.
    pub fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
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

/// Checks that `url` is an `amqp://` or `amqps://` URL, or a comma
/// separated list of them ([`BrokerAddresses::parse`]), without echoing a
/// password.
pub fn validate_amqp_url(url: &str) -> Result<()> {
    BrokerAddresses::parse(url).map(|_| ())
}

fn validate_one_amqp_url(url: &str) -> Result<()> {
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "amqp" | "amqps") && parsed.host().is_some() => {
            // lapin's own parser, for what the generic one lets through
            // (query settings such as `heartbeat=abc`); its message may
            // quote the URL, so it is not shown.
            url.parse::<lapin::uri::AMQPUri>().map(|_| ()).map_err(|_| {
                Error::Config(format!(
                    "AMQP URL {} is not a valid AMQP URI (check its port, vhost and query settings)",
                    redact_url(url)
                ))
            })
        }
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
    Ok(declare_passive(connection, name)
        .await?
        .map(|queue| queue.message_count()))
}

/// How many consumers queue `name` has (a worker running its listener is
/// one), read like [`queue_depth`]; `None` when the queue does not exist.
pub async fn queue_consumers(connection: &Connection, name: &str) -> Result<Option<u32>> {
    Ok(declare_passive(connection, name)
        .await?
        .map(|queue| queue.consumer_count()))
}

async fn declare_passive(connection: &Connection, name: &str) -> Result<Option<lapin::Queue>> {
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
            Ok(Some(queue))
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
    /// An ack of a listener's delivery did not complete: the connection
    /// is broken or stuck, and unacknowledged messages come back only once
    /// it is closed.
    #[error("an ack on {0} did not complete")]
    AckTimedOut(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(list: &str) -> String {
        BrokerAddresses::parse(list)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn one_url_or_a_comma_separated_list() {
        let one = BrokerAddresses::parse(DEFAULT_AMQP_URL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.urls(), [DEFAULT_AMQP_URL]);
        let list = BrokerAddresses::parse(
            "amqp://guest:s3cret@127.0.0.1:5681/%2f, amqp://guest:s3cret@127.0.0.1:5682/%2f,amqps://mq3:5671/%2f?heartbeat=10",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            list.urls(),
            [
                "amqp://guest:s3cret@127.0.0.1:5681/%2f",
                "amqp://guest:s3cret@127.0.0.1:5682/%2f",
                "amqps://mq3:5671/%2f?heartbeat=10"
            ]
        );
        assert_eq!(list.len(), 3);
        assert_eq!(
            list.redacted(),
            "amqp://guest:***@127.0.0.1:5681/%2f,amqp://guest:***@127.0.0.1:5682/%2f,amqps://mq3:5671/%2f?heartbeat=10"
        );
        assert!(!format!("{list:?}").contains("s3cret"));
        // A comma inside a password is part of it.
        let comma = BrokerAddresses::parse("amqp://u:pa,ss@h/%2f").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(comma.urls(), ["amqp://u:pa,ss@h/%2f"]);
        assert!(validate_amqp_url("amqp://h1,amqp://h2").is_ok());
    }

    #[test]
    fn a_bad_entry_is_named_by_position_without_its_password() {
        let cases = [
            (
                "amqp://u:s3cret@h1/%2f,http://u:s3cret@h2/",
                "entry 2 of 2",
                "amqp://",
            ),
            (
                "amqp://u:s3cret@h1/%2f,,amqp://u:s3cret@h2/",
                "entry 2 of 3",
                "empty",
            ),
            ("amqp://u:s3cret@h1/%2f,", "entry 2 of 2", "empty"),
            (
                "amqp://u:s3cret@h1:99999/%2f,amqp://h2",
                "entry 1 of 2",
                "does not parse",
            ),
            (
                "amqp://u:s3cret@h1/%2f,amqp://u:s3cret@h2/%2f?heartbeat=abc",
                "entry 2 of 2",
                "not a valid AMQP URI",
            ),
            ("", "", "empty"),
            ("mq1:5672", "", "must start with amqp://"),
        ];
        for (list, position, reason) in cases {
            let message = message(list);
            assert!(message.contains(position), "{list}: {message}");
            assert!(message.contains(reason), "{list}: {message}");
            assert!(!message.contains("s3cret"), "{list}: {message}");
        }
        // A single URL's error reads as before, with no position.
        assert!(!message("http://h/").contains("entry"));
        let many = vec!["amqp://h"; MAX_ADDRESSES + 1].join(",");
        assert!(message(&many).contains("at most"));
    }

    #[test]
    fn the_connector_starts_after_the_address_lost() {
        let connector =
            BrokerConnector::new("amqp://h1,amqp://h2,amqp://h3").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(connector.next.load(Ordering::Relaxed), 0);
        connector.current.store(2, Ordering::Relaxed);
        connector.connection_lost();
        assert_eq!(connector.next.load(Ordering::Relaxed), 0, "wraps around");
        connector.current.store(0, Ordering::Relaxed);
        connector.connection_lost();
        assert_eq!(connector.next.load(Ordering::Relaxed), 1);
        assert_eq!(connector.current(), "amqp://h1");
    }

    #[tokio::test]
    async fn no_broker_answering_names_every_address_tried() {
        // Port 1 on loopback: refused at once.
        let list = "amqp://guest:s3cret@127.0.0.1:1/%2f,amqp://guest:s3cret@127.0.0.2:1/%2f";
        let error = connect(list, "unit test")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("any of 2 brokers"), "{error}");
        assert!(
            error.contains("127.0.0.1:1") && error.contains("127.0.0.2:1"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
        let one = connect("amqp://guest:s3cret@127.0.0.1:1/%2f", "unit test")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(one, "cannot connect to amqp://guest:***@127.0.0.1:1/%2f");
    }
}
