//! Fixtures for integration tests (feature `testing`): throwaway
//! databases, private exchanges, a TCP proxy that cuts connections, and
//! bounded waits and counted queries for assertions, and the delivery
//! report every fault run prints.
//!
//! Each [`TestDatabase`] is a freshly created Postgres database, dropped
//! when the value goes out of scope (also when the test panics), so tests
//! run in parallel and leave nothing behind. The server comes from
//! `TEST_DATABASE_URL`, else `DATABASE_URL`, else the local default; only
//! its host, port and credentials are used.

mod broker;
mod broker_user;
mod checks;
mod delivery_report;
mod events;
mod proxy;
mod roles;

pub use broker::{ReceivedMessage, TEST_AMQP_PREFIX, TestExchange, delete_broker_objects};
pub use broker_user::{TEST_USER_PREFIX, TestBrokerUser, literal};
pub use checks::{count, eventually, eventually_async, eventually_blocking, try_count};
pub use delivery_report::{DeliveryReport, RunRecord};
pub use events::{Ticked, record_interleaved, record_ticks, take_ticks};
pub use proxy::{Fault, TcpProxy};
pub use roles::{LEAST_PRIVILEGE_SQL, LeastPrivilegeRoles, TestRoles};

use std::fmt;

use diesel::pg::PgConnection;
use diesel::{RunQueryDsl, sql_query};
use uuid::Uuid;

use crate::database::{self, DEFAULT_DATABASE_URL, PgPool};
use crate::error::{Error, Result};

/// Prefix of every database a test creates; `.ci/run` sweeps leftovers of
/// killed test processes by it.
pub const TEST_DATABASE_PREFIX: &str = "outbox_test_";

/// A database that exists for one test.
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &database::redact_url(&self.url))
            .finish()
    }
}

impl TestDatabase {
    /// Creates an empty database and runs the library's migrations in it.
    pub fn create() -> Result<Self> {
        let db = Self::create_empty()?;
        crate::migrate(&mut db.connect()?)?;
        Ok(db)
    }

    /// Creates an empty database, without migrations.
    pub fn create_empty() -> Result<Self> {
        let server = std::env::var("TEST_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        Self::create_on(&server)
    }

    /// Creates an empty database on the server `server_url` points at (its
    /// database name is ignored), without migrations.
    pub fn create_on(server_url: &str) -> Result<Self> {
        let name = format!("{TEST_DATABASE_PREFIX}{}", Uuid::now_v7().simple());
        let url = with_database(server_url, &name)?;
        let admin_url = with_database(server_url, "postgres")?;
        let mut admin = database::connect(&admin_url)?;
        sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut admin)?;
        Ok(Self { name, url, admin_url })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL that connects to this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Opens a connection to this database.
    pub fn connect(&self) -> Result<PgConnection> {
        database::connect(&self.url)
    }

    /// A pool of up to `max_size` connections to this database.
    pub fn pool(&self, max_size: u32) -> Result<PgPool> {
        database::pool(&self.url, max_size, std::time::Duration::from_secs(10))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let dropped = database::connect(&self.admin_url).and_then(|mut admin| {
            sql_query(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
                .execute(&mut admin)
                .map_err(Error::from)
        });
        if let Err(error) = dropped {
            eprintln!("could not drop test database {}: {error}", self.name);
        }
    }
}

/// `server` with its database path replaced by `database` (one host or
/// several).
fn with_database(server: &str, database: &str) -> Result<String> {
    database::with_database(server, database)
}
