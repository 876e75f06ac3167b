//! `outbox relay`: publish committed events to RabbitMQ until SIGINT or
//! SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outbox::RelayConfig;

use crate::duration::parse_duration;

/// Options of `outbox relay`; defaults are the library's.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// RabbitMQ URL (amqp:// or amqps://); several, comma separated, for the nodes of a cluster (the first that answers is used).
    #[arg(long, env = outbox::settings::AMQP_URL_ENV, default_value = outbox::DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Topic exchange to publish to; declared durable if missing.
    #[arg(long, env = outbox::settings::EXCHANGE_ENV, default_value = outbox::DEFAULT_EXCHANGE, hide_env_values = true)]
    exchange: String,
    /// Rows claimed per query.
    #[arg(
        long,
        env = "OUTBOX_BATCH_SIZE",
        default_value_t = 500,
        hide_env_values = true
    )]
    batch_size: usize,
    /// Rows held at once (publishing or waiting behind their aggregate).
    #[arg(
        long,
        env = "OUTBOX_MAX_IN_FLIGHT",
        default_value_t = 2000,
        hide_env_values = true
    )]
    max_in_flight: usize,
    /// How long a claim stays this relay's without a heartbeat (renewed every third of it); a crashed relay's rows are taken over after this.
    #[arg(long, env = "OUTBOX_LEASE", default_value = "3s", value_parser = parse_duration, hide_env_values = true)]
    lease: Duration,
    /// How long to wait for the broker's confirm of a message.
    #[arg(long, env = "OUTBOX_CONFIRM_TIMEOUT", default_value = "10s", value_parser = parse_duration, hide_env_values = true)]
    confirm_timeout: Duration,
    /// Shortest wait between claims while rows keep coming.
    #[arg(long, env = "OUTBOX_POLL_MIN", default_value = "5ms", value_parser = parse_duration, hide_env_values = true)]
    poll_min: Duration,
    /// Longest wait between claims when idle.
    #[arg(long, env = "OUTBOX_POLL_MAX", default_value = "100ms", value_parser = parse_duration, hide_env_values = true)]
    poll_max: Duration,
    /// Failed attempts after which a row is marked failed.
    #[arg(
        long,
        env = "OUTBOX_MAX_ATTEMPTS",
        default_value_t = 20,
        hide_env_values = true
    )]
    max_attempts: u32,
    /// Wait before a row's next publish try after its first failed one
    /// (then doubling, +-20% jitter).
    #[arg(long, alias = "retry-initial", env = "OUTBOX_BACKOFF_INITIAL", default_value = "1s", value_parser = parse_duration, hide_env_values = true)]
    backoff_initial: Duration,
    /// Longest wait between a row's publish tries.
    #[arg(long, alias = "retry-max", env = "OUTBOX_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration, hide_env_values = true)]
    backoff_max: Duration,
    /// Keep published rows in outbox_events this long, then move them into
    /// the event log (or, with --no-event-log, delete them; 0 then deletes
    /// them on publish).
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "7d", value_parser = parse_duration, hide_env_values = true)]
    retention: Duration,
    /// Delete published rows past --retention instead of keeping them in the
    /// event log (outbox_event_log, read by replays and projection rebuilds).
    #[arg(long, env = "OUTBOX_NO_EVENT_LOG", hide_env_values = true)]
    no_event_log: bool,
    /// Drop event log months once they ended this long ago (at least 1d)
    /// [default: keep the log forever].
    #[arg(long, env = "OUTBOX_LOG_RETENTION", value_parser = parse_duration, hide_env_values = true)]
    log_retention: Option<Duration>,
    /// How often to prune published rows past retention.
    #[arg(long, env = "OUTBOX_PRUNE_INTERVAL", default_value = "60s", value_parser = parse_duration, hide_env_values = true)]
    prune_interval: Duration,
    /// How long shutdown waits for outstanding confirms.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration, hide_env_values = true)]
    shutdown_timeout: Duration,
    /// Lease owner name; must be unique among running relays [default: <host>-<pid>-<random>].
    #[arg(long, env = "OUTBOX_RELAY_ID", hide_env_values = true)]
    relay_id: Option<String>,
    /// CloudEvents `source` attribute of published events, which workers can filter on [default: /outbox/<database name>].
    #[arg(long, env = "OUTBOX_SOURCE", hide_env_values = true)]
    source: Option<String>,
    /// Start of each event's CloudEvents `dataschema` URI: the base where the files of `schema export` are served (`https://schemas.example.com/chom/` gives `.../site.created.v1.schema.json`) [default: urn:outbox:schema:<event type>:v<version>].
    #[arg(long, env = outbox::contract::DATASCHEMA_BASE_ENV, hide_env_values = true)]
    dataschema_base: Option<String>,
    /// Retry an event no queue is bound to (holding its aggregate back) instead of keeping it as unroutable and going on.
    #[arg(long, env = "OUTBOX_STRICT_ROUTING", hide_env_values = true)]
    strict_routing: bool,
    /// Do not LISTEN for writers' wake-ups; find new events by polling only.
    #[arg(long, env = "OUTBOX_NO_WAKE_UP", hide_env_values = true)]
    no_wake_up: bool,
    /// The phantom guard: publish a claimed batch only once a streaming standby has flushed it, waiting at most this long per batch (at most half the lease; the role needs pg_monitor) [default: off].
    #[arg(long, env = "OUTBOX_WAIT_FOR_STANDBY", value_parser = parse_duration, hide_env_values = true)]
    wait_for_standby: Option<Duration>,
    /// Address for GET /metrics and /health; "off" disables it. Without it, 127.0.0.1:9187, or a free port if another process (a second relay on this host) has that one [default: 127.0.0.1:9187].
    #[arg(long, env = "OUTBOX_METRICS_ADDR", hide_env_values = true)]
    metrics_addr: Option<String>,
}

/// Where `/metrics` is served when `--metrics-addr` is not given.
const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9187);

/// Binds the metrics listener. An address the operator gave must be free;
/// the default may be taken by another relay on the same host, and then a
/// free port is used instead (logged), so running several relays with
/// defaults works.
async fn bind_metrics(addr: SocketAddr, explicit: bool) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(addr.ip(), 0);
            let listener = tokio::net::TcpListener::bind(any).await.with_context(|| {
                format!("cannot serve metrics: {addr} is in use and no free port is left")
            })?;
            tracing::warn!(
                taken = %addr,
                addr = %listener.local_addr().unwrap_or(any),
                "the default metrics address is in use (another relay on this host?): serving on a free port; give each relay --metrics-addr to scrape it"
            );
            Ok(listener)
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot serve metrics: cannot listen on {addr}: {e}"
        )),
    }
}

impl RelayArgs {
    fn config(&self, database_url: &str) -> RelayConfig {
        // The same three settings (and variables) as the library's
        // `Settings::from_env`.
        let defaults = RelayConfig::from_settings(&outbox::Settings {
            database_url: database_url.to_owned(),
            amqp_url: self.amqp_url.clone(),
            exchange: self.exchange.clone(),
        });
        RelayConfig {
            relay_id: self.relay_id.clone().unwrap_or(defaults.relay_id.clone()),
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            lease: self.lease,
            confirm_timeout: self.confirm_timeout,
            poll_min: self.poll_min,
            poll_max: self.poll_max,
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            retention: self.retention,
            event_log: !self.no_event_log,
            log_retention: self.log_retention,
            prune_interval: self.prune_interval,
            shutdown_timeout: self.shutdown_timeout,
            source: self.source.clone(),
            dataschema_base: self.dataschema_base.clone(),
            strict_routing: self.strict_routing,
            wake_up: !self.no_wake_up,
            wait_for_standby: self.wait_for_standby,
            ..defaults
        }
    }
}

/// Runs the relay until a signal asks it to stop.
pub fn run(database_url: &str, args: &RelayArgs) -> anyhow::Result<()> {
    let config = args.config(database_url);
    let metrics_addr: Option<(SocketAddr, bool)> = match args.metrics_addr.as_deref() {
        None => Some((DEFAULT_METRICS_ADDR, false)),
        Some("off" | "") => None,
        Some(addr) => Some((
            addr.parse().with_context(|| {
                format!("--metrics-addr {addr:?} is not host:port (e.g. 127.0.0.1:9187) or off")
            })?,
            true,
        )),
    };
    let relay = outbox::Relay::new(config).context("invalid relay configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some((addr, explicit)) = metrics_addr {
            let listener = bind_metrics(addr, explicit).await?;
            let handle = outbox::metrics::install_recorder()?;
            let health = relay.health();
            let check: outbox::metrics::HealthCheck = Arc::new(move || {
                let body = format!(
                    "{{\"broker\":{},\"database\":{}}}",
                    health.broker_ok(),
                    health.database_ok()
                );
                (health.is_healthy(), body)
            });
            let mut stop = stop_rx.clone();
            let (bound, _task) = outbox::metrics::serve_on(listener, handle, check, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .context("cannot serve metrics")?;
            tracing::info!(addr = %bound, "serving /metrics and /health");
        }
        let outcome = relay.run(shutdown_signal()).await;
        let _ = stop_tx.send(true);
        outcome.context("relay failed")
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
