//! chom's integration tests, one binary: each test creates its own
//! database on the local Postgres (`TEST_DATABASE_URL`, else
//! `DATABASE_URL`, else postgres://postgres@127.0.0.1:5432), runs
//! `chom::migrate`, and drops the database when done, so tests run in
//! parallel and leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod accounts;
mod backups;
mod cli;
mod cli_accounts;
mod contracts;
mod demo;
mod end_to_end;
mod fake;
mod guide;
mod killed_worker;
mod listeners;
mod monitoring;
mod operate;
mod pipeline;
mod projections;
mod quotas;
mod secret_scan;
mod security;
mod simulate;
mod sites;
mod ssl;
mod support;
mod team;
mod tenants;
mod webhooks;
