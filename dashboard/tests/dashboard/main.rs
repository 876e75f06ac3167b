//! The dashboard against the real Postgres, RabbitMQ and (browser.rs) a
//! real headless Chromium. Each test has its own database, queues and
//! dashboard on a port of its own.

mod access;
mod browser;
mod http;
mod support;
