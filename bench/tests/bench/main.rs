//! `outbox-bench` as people run it (through `outbox bench`): a separate
//! process against the real Postgres and RabbitMQ, starting `outbox relay`
//! processes of the `outbox` beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod scenarios;
