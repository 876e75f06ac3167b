//! The consumer framework against the real Postgres and RabbitMQ: failed
//! jobs, the inbox, topology, and the worker's retries, dead-lettering and
//! shutdown. Each test creates its own database (`outbox::TestDatabase`)
//! and its own exchange and queues (unique names), removed at the end even
//! when the test panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod batching;
mod broker;
mod brokers;
mod harness;
mod support;

mod failed_jobs;
mod faults;
mod inbox;
mod least_privilege;
mod maintenance;
mod projections;
mod rate_limits;
mod readme_example;
mod registration;
mod sources;
mod stuck_retries;
mod traces;
mod upcasting;
mod webhooks;
mod worker;
