//! The `outbox` command as operators run it: a separate process, killed,
//! signalled, misconfigured, next to real CHOM traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod bench_forwarding;
mod chom_traffic;
mod commands;
mod failed;
mod failed_e2e;
#[cfg(feature = "failpoints")]
mod failpoints;
mod help;
mod process_faults;
mod projection;
mod replay;
mod schema;
mod status;
mod topology;
mod webhooks;
