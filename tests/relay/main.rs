//! The relay against the real Postgres and RabbitMQ: what it publishes,
//! in what order, and what survives faults. Each test has its own
//! database, exchange and queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod claiming;
mod cloudevents_sdk;
mod event_log;
mod faults;
mod floor;
mod least_privilege;
mod liveness;
mod maintenance;
mod operating;
mod operator_queries;
mod ordering;
mod oversized;
mod publishing;
mod wake;
