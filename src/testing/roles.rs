//! Postgres roles of a test's own, for least-privilege tests. Roles are
//! cluster-wide, so each gets a unique name, and all are dropped at the
//! end, after the test's database (a role holding privileges in a live
//! database cannot be dropped).

use diesel::RunQueryDsl;
use diesel::connection::SimpleConnection;
use uuid::Uuid;

use super::{TEST_DATABASE_PREFIX, TestDatabase};
use crate::database;
use crate::error::{Error, Result};

/// The least-privilege script operators run (`docs/least-privilege.sql`).
pub const LEAST_PRIVILEGE_SQL: &str = include_str!("../../docs/least-privilege.sql");

/// The roles [`TestRoles::apply_least_privilege`] created.
#[derive(Debug, Clone)]
pub struct LeastPrivilegeRoles {
    /// The relay's role.
    pub relay: String,
    /// A write-path service's role.
    pub writer: String,
    /// A worker's role.
    pub worker: String,
}

/// A test database and the roles a test creates in it; dropping it drops
/// the database, then the roles (also when the test panicked).
#[derive(Debug)]
pub struct TestRoles {
    db: Option<TestDatabase>,
    admin_url: String,
    roles: Vec<String>,
}

impl TestRoles {
    /// Takes over `db`, which is dropped before the roles.
    pub fn new(db: TestDatabase) -> Self {
        let admin_url = db.admin_url.clone();
        Self {
            db: Some(db),
            admin_url,
            roles: Vec::new(),
        }
    }

    /// The test's database.
    ///
    /// # Panics
    /// Never: the database lives as long as `self`.
    #[allow(clippy::expect_used)]
    pub fn db(&self) -> &TestDatabase {
        self.db.as_ref().expect("the database lives until drop")
    }

    /// A unique role name (`outbox_test_<kind>_<uuid>`), dropped at the
    /// end; the test creates the role itself.
    pub fn name(&mut self, kind: &str) -> String {
        let name = format!("{TEST_DATABASE_PREFIX}{kind}_{}", Uuid::now_v7().simple());
        self.roles.push(name.clone());
        name
    }

    /// Runs [`LEAST_PRIVILEGE_SQL`] in the test database with unique role
    /// names and `password` for each.
    pub fn apply_least_privilege(&mut self, password: &str) -> Result<LeastPrivilegeRoles> {
        let roles = LeastPrivilegeRoles {
            relay: self.name("relay"),
            writer: self.name("writer"),
            worker: self.name("worker"),
        };
        // Whole identifiers only: `outbox_relay` is also the start of the
        // table name `outbox_relays`.
        let script = replace_identifier(LEAST_PRIVILEGE_SQL, "outbox_relay", &roles.relay);
        let script = replace_identifier(&script, "outbox_writer", &roles.writer);
        let script =
            replace_identifier(&script, "outbox_worker", &roles.worker).replace("change-me", password);
        self.db().connect()?.batch_execute(&script)?;
        Ok(roles)
    }

    /// The test database's URL, logging in as `role` with `password`.
    pub fn url_as(&self, role: &str, password: &str) -> Result<String> {
        let mut url =
            url::Url::parse(self.db().url()).map_err(|e| Error::Config(format!("test database URL: {e}")))?;
        if url.set_username(role).is_err() || url.set_password(Some(password)).is_err() {
            return Err(Error::Config("test database URL cannot carry a user".into()));
        }
        Ok(url.to_string())
    }
}

impl Drop for TestRoles {
    fn drop(&mut self) {
        drop(self.db.take());
        if self.roles.is_empty() {
            return;
        }
        match database::connect(&self.admin_url) {
            Ok(mut admin) => {
                for role in &self.roles {
                    if let Err(error) =
                        diesel::sql_query(format!("DROP ROLE IF EXISTS \"{role}\"")).execute(&mut admin)
                    {
                        eprintln!("could not drop role {role}: {error}");
                    }
                }
            }
            Err(error) => eprintln!("cannot connect to drop roles {:?}: {error}", self.roles),
        }
    }
}

/// `text` with every whole-identifier occurrence of `from` replaced by `to`.
fn replace_identifier(text: &str, from: &str, to: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        let before = rest[..at].chars().next_back().or_else(|| out.chars().next_back());
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}
