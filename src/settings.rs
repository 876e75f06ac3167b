//! Where a service's database, broker and exchange are: the three settings
//! the relay, the worker and the `outbox` command share, read from the same
//! environment variables with the same defaults.
//!
//! | setting | environment | default |
//! | --- | --- | --- |
//! | [`Settings::database_url`] | `DATABASE_URL` | [`DEFAULT_DATABASE_URL`] |
//! | [`Settings::amqp_url`] | `AMQP_URL` | [`DEFAULT_AMQP_URL`] |
//! | [`Settings::exchange`] | `OUTBOX_EXCHANGE` | [`DEFAULT_EXCHANGE`] |
//!
//! A variable that is set is used as it is (an empty value is an error, as
//! it is for the `outbox` command); an error names the variable and shows
//! URLs with their password as `***`.
//!
//! ```no_run
//! use outbox::{RelayConfig, WorkerConfig};
//!
//! # fn main() -> outbox::Result<()> {
//! let settings = outbox::Settings::from_env()?;
//! let relay = RelayConfig::from_settings(&settings);
//! let worker = WorkerConfig { app: "orders".into(), ..WorkerConfig::from_settings(&settings) };
//! # let _ = (relay, worker);
//! # Ok(()) }
//! ```

use std::ffi::OsString;

use crate::amqp::{DEFAULT_AMQP_URL, DEFAULT_EXCHANGE, validate_amqp_name, validate_amqp_url};
use crate::database::{DEFAULT_DATABASE_URL, redact_url, validate_database_url};
use crate::error::{Error, Result};

/// The environment variable of [`Settings::database_url`].
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";
/// The environment variable of [`Settings::amqp_url`].
pub const AMQP_URL_ENV: &str = "AMQP_URL";
/// The environment variable of [`Settings::exchange`].
pub const EXCHANGE_ENV: &str = "OUTBOX_EXCHANGE";
/// The environment variable the commands that declare queues (`outbox
/// topology declare`, `chom work`, `chom topology`) read
/// [`WorkerConfig::quorum_initial_group_size`](crate::WorkerConfig::quorum_initial_group_size)
/// from, beside their `--quorum-initial-group-size` flag.
pub const QUORUM_INITIAL_GROUP_SIZE_ENV: &str = "OUTBOX_QUORUM_INITIAL_GROUP_SIZE";

/// The database, broker and exchange of a service: one value for its
/// relay and its worker ([`RelayConfig::from_settings`],
/// [`WorkerConfig::from_settings`]).
///
/// [`RelayConfig::from_settings`]: crate::RelayConfig::from_settings
/// [`WorkerConfig::from_settings`]: crate::WorkerConfig::from_settings
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// Postgres holding the outbox tables (and the service's own).
    /// `DATABASE_URL`, default [`DEFAULT_DATABASE_URL`].
    pub database_url: String,
    /// RabbitMQ (`amqp://` or `amqps://`). `AMQP_URL`, default
    /// [`DEFAULT_AMQP_URL`].
    pub amqp_url: String,
    /// The durable topic exchange the relay publishes to and the worker
    /// binds its queues to. `OUTBOX_EXCHANGE`, default [`DEFAULT_EXCHANGE`].
    pub exchange: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("exchange", &self.exchange)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            amqp_url: DEFAULT_AMQP_URL.to_owned(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
        }
    }
}

impl Settings {
    /// Reads `DATABASE_URL`, `AMQP_URL` and `OUTBOX_EXCHANGE`, each
    /// defaulting as the `outbox` command does, and checks them; the error
    /// names the first bad variable.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// [`from_env`](Self::from_env) with the variables looked up by
    /// `lookup` instead of in the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self> {
        let read = |name: &str, default: &str| match lookup(name) {
            None => Ok(default.to_owned()),
            Some(value) => value
                .into_string()
                .map_err(|_| Error::Config(format!("{name} is not valid UTF-8"))),
        };
        let settings = Self {
            database_url: read(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)?,
            amqp_url: read(AMQP_URL_ENV, DEFAULT_AMQP_URL)?,
            exchange: read(EXCHANGE_ENV, DEFAULT_EXCHANGE)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the three settings; the error names the environment
    /// variable of the first bad one.
    pub fn validate(&self) -> Result<()> {
        fn named(name: &'static str) -> impl Fn(Error) -> Error {
            move |error| match error {
                Error::Config(message) => Error::Config(format!("{name}: {message}")),
                other => other,
            }
        }
        validate_database_url(&self.database_url).map_err(named(DATABASE_URL_ENV))?;
        validate_amqp_url(&self.amqp_url).map_err(named(AMQP_URL_ENV))?;
        validate_amqp_name("exchange", &self.exchange).map_err(named(EXCHANGE_ENV))?;
        if self.exchange.starts_with("amq.") {
            return Err(Error::Config(format!(
                "{EXCHANGE_ENV}: exchange {:?}: names starting with amq. are reserved",
                self.exchange
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn unset_variables_take_the_commands_defaults() {
        let read = settings(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read, Settings::default());
        assert_eq!(read.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(read.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(read.exchange, DEFAULT_EXCHANGE);
        let read = settings(&[
            ("DATABASE_URL", "postgres://app@db:5432/shop"),
            ("AMQP_URL", "amqps://app:pw@mq:5671/%2f"),
            ("OUTBOX_EXCHANGE", "shop.events"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.database_url, "postgres://app@db:5432/shop");
        assert_eq!(read.amqp_url, "amqps://app:pw@mq:5671/%2f");
        assert_eq!(read.exchange, "shop.events");
        let worker = crate::WorkerConfig::from_settings(&read);
        let relay = crate::RelayConfig::from_settings(&read);
        assert_eq!(
            (&worker.database_url, &worker.amqp_url, &worker.exchange),
            (&read.database_url, &read.amqp_url, &read.exchange)
        );
        assert_eq!(
            (&relay.database_url, &relay.amqp_url, &relay.exchange),
            (&read.database_url, &read.amqp_url, &read.exchange)
        );
    }

    #[test]
    fn errors_name_the_variable_and_hide_passwords() {
        let cases = [
            ("DATABASE_URL", "mysql://u:hunter2@h/db"),
            ("AMQP_URL", "http://u:hunter2@h/"),
            ("OUTBOX_EXCHANGE", ""),
            ("OUTBOX_EXCHANGE", "bad name"),
            ("OUTBOX_EXCHANGE", "amq.topic"),
        ];
        for (name, value) in cases {
            let message = settings(&[(name, value)])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(name), "{name}={value:?}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
        let read = settings(&[("AMQP_URL", "amqp://u:hunter2@h/%2f")]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{read:?}").contains("hunter2"));
    }
}
