//! The foundation's guarantees against the real Postgres: events exist if
//! and only if their transaction commits, with every contract field right.
//! Each test creates its own database (see `outbox::TestDatabase`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod alert_rules;
mod batch;
mod migrate;
mod module_cycles;
mod payload_cap;
mod record;
mod sync_listeners;
mod writers;
