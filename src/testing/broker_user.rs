//! A RabbitMQ user of a test's own, created and deleted with `rabbitmqctl`
//! (the broker must run on this machine), for least-privilege tests.

use std::process::Command;

use uuid::Uuid;

use crate::error::{Error, Result};

/// Prefix of every broker user a test creates.
pub const TEST_USER_PREFIX: &str = "outbox_test_user_";

/// A user with permissions on vhost `/` only; deleted when dropped (also
/// when the test panicked).
#[derive(Debug)]
pub struct TestBrokerUser {
    name: String,
    password: String,
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| Error::Config(format!("cannot run rabbitmqctl: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "rabbitmqctl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl TestBrokerUser {
    /// Creates a user whose vhost `/` permissions are the `configure`,
    /// `write` and `read` regular expressions.
    pub fn create(configure: &str, write: &str, read: &str) -> Result<Self> {
        let user = Self {
            name: format!("{TEST_USER_PREFIX}{}", Uuid::now_v7().simple()),
            password: Uuid::now_v7().simple().to_string(),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password])?;
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, configure, write, read])?;
        Ok(user)
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An AMQP URL for the local broker, logging in as this user.
    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for TestBrokerUser {
    fn drop(&mut self) {
        if let Err(error) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not delete broker user {}: {error}", self.name);
        }
    }
}

/// `name` as a regular expression matching only itself (dots escaped; the
/// names the outbox accepts have no other metacharacters).
pub fn literal(name: &str) -> String {
    name.replace('.', "\\.")
}
