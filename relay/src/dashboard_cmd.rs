//! `outbox dashboard`: the operator's web dashboard (crate
//! `outbox-dashboard`), in a process of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use outbox_dashboard::{Credentials, DashboardConfig, TOKEN_ENV, TOKEN_FILE_ENV};

use crate::duration::parse_duration;
use crate::relay_cmd::shutdown_signal;

/// Options of `outbox dashboard`. The token is never a flag (flags show in
/// `ps`): it comes from OUTBOX_DASHBOARD_TOKEN, or a file named by
/// --token-file / OUTBOX_DASHBOARD_TOKEN_FILE.
#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Address to listen on. Anything but loopback needs a token.
    #[arg(long, default_value = outbox_dashboard::DEFAULT_BIND)]
    bind: SocketAddr,
    /// File of operators' tokens: one a line, `token` (shared: operators
    /// name themselves at login) or `name:token` (personal), either led by
    /// `role=viewer|operator|admin ` (a token without a role is admin, as
    /// every token was before roles). Without it and without
    /// OUTBOX_DASHBOARD_TOKEN the dashboard is read-only.
    #[arg(long, env = TOKEN_FILE_ENV, hide_env_values = true)]
    token_file: Option<PathBuf>,
    /// RabbitMQ URL, for queue depths and retries; several, comma separated, for the nodes of a cluster.
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// How often the overview, listeners and timeline pages reload themselves once a viewer asks (their "Reload this page every ..." link).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    refresh: Duration,
    /// Longest wait for the broker's confirm of a retried job.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    confirm_timeout: Duration,
    /// Mark the session cookie Secure (when a TLS proxy serves the dashboard).
    #[arg(long)]
    cookie_secure: bool,
    /// Bulk actions (retry, forget) over more failed jobs than this need
    /// the admin role; up to it, the operator role.
    #[arg(long, default_value_t = outbox_dashboard::DEFAULT_BULK_ADMIN_THRESHOLD)]
    bulk_admin_threshold: u64,
    /// How long rows of the audit trail (`dashboard_audit`) are kept; older
    /// ones are deleted whenever an action writes a row.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    audit_retention: Duration,
}

/// Serves the dashboard until SIGINT or SIGTERM.
pub fn run(database_url: &str, args: &DashboardArgs) -> anyhow::Result<()> {
    let credentials = match &args.token_file {
        Some(path) => Some(Credentials::from_file(path)?),
        None => match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.is_empty() => Some(Credentials::shared(&token)?),
            _ => None,
        },
    };
    if credentials.is_none() {
        tracing::warn!("no {TOKEN_ENV} or {TOKEN_FILE_ENV}: the dashboard is read-only");
    }
    let config = DashboardConfig {
        bind: args.bind,
        credentials,
        refresh: args.refresh,
        confirm_timeout: args.confirm_timeout,
        cookie_secure: args.cookie_secure,
        bulk_admin_threshold: args.bulk_admin_threshold,
        audit_retention: args.audit_retention,
        ..DashboardConfig::new(database_url, &args.amqp_url)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(outbox_dashboard::serve(config, shutdown_signal(), |address| {
        println!("dashboard on http://{address}/");
    }))?;
    Ok(())
}
