//! # chom
//!
//! The CHOM hosting platform as a write-path service on the [`outbox`]:
//! tenants own sites, sites have backups, and every change to a site or a
//! backup records one of the seed's seven domain events in the same
//! Postgres transaction as the change. The account features add teams (roles,
//! ownership), SSL certificates, VPS credentials and API tokens (stored as
//! hashes), failed sign-ins, and quotas, with twelve more events recorded
//! the same way. `docs/adding-an-event.md` walks adding one.
//!
//! ## Map of the crate
//!
//! | concern | module | main items |
//! | --- | --- | --- |
//! | the database schema | [`migrate`](mod@migrate), [`schema`] | [`migrate()`] |
//! | rows as Rust values | [`models`] | [`Site`], [`Backup`], [`Tenant`], [`User`], [`TeamMember`](models::TeamMember), [`SslCertificate`](models::SslCertificate), ... |
//! | the nineteen domain events and their schemas (committed in `schemas/`, catalogued in `docs/events.md`) | [`events`] | [`SiteCreated`](events::SiteCreated), ..., [`EVENT_TYPES`](events::EVENT_TYPES), [`ACCOUNT_EVENT_TYPES`](events::ACCOUNT_EVENT_TYPES), [`register_schemas`](events::register_schemas) |
//! | the write path (seed) | [`services`] | [`services::sites`], [`services::backups`], [`services::tenants`] |
//! | the write path (teams, SSL, security, quotas) | [`services`] | [`services::team`], [`services::ssl`], [`services::security`], [`services::quotas`] |
//! | secrets (shown once, stored hashed, redacted in `Debug`) | [`secret`] | [`Secret`](secret::Secret) |
//! | the four listeners and the event → listener mapping | [`listeners`] | [`listeners::registry`], [`listeners::MAPPING`], [`listeners::NOTIFIED_EVENT_TYPES`] |
//! | a load generator | [`simulate`] | [`simulate::run`] |
//! | the worker (`chom work`) | [`work`] | [`work::run`] |
//! | everything at once (`chom demo`) | [`demo`] | [`demo::run`] |
//! | errors | [`error`] | [`ChomError`] |
//!
//! ## Creating a site
//!
//! ```no_run
//! use outbox::{Metadata, Outbox};
//! use chom::services::{sites, tenants};
//!
//! # fn main() -> Result<(), chom::ChomError> {
//! let mut conn = outbox::connect("postgres://postgres@127.0.0.1:5432/chom")?;
//! chom::migrate(&mut conn)?;
//! let outbox = Outbox::new();
//! let tenant = tenants::create_tenant(&mut conn, "Acme")?;
//! // The site row and its site.created event commit together.
//! let created = sites::create_site(&outbox, &mut conn, Metadata::by("user:1"), tenant.id, "acme.test")?;
//! // Simulated provisioning: the outcome is an argument.
//! sites::provision_site(&outbox, &mut conn, Metadata::system(), created.value.id, Ok(()))?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod demo;
pub mod error;
pub mod events;
pub mod listeners;
pub mod migrate;
pub mod models;
pub mod schema;
pub mod secret;
pub mod services;
pub mod simulate;
pub mod work;

pub use error::{ChomError, Result};
pub use migrate::{MIGRATIONS, migrate};
pub use models::{Backup, BackupStatus, Site, SiteStatus, Tenant, User};
pub use services::Recorded;
