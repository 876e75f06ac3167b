//! `chom work`: the worker running CHOM's queued listeners, with
//! `/metrics` and `/health`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outbox::Health;
use outbox::{Registry, Worker, WorkerConfig};

use crate::listeners::{self, APP, ListenerConfig};

/// What `chom work` runs.
#[derive(Debug, Clone)]
pub struct WorkConfig {
    /// CHOM's database.
    pub database_url: String,
    /// RabbitMQ.
    pub amqp_url: String,
    /// The relay's exchange.
    pub exchange: String,
    /// Queue prefix. Default `chom`.
    pub app: String,
    /// Notifier and retry settings.
    pub listeners: ListenerConfig,
    /// Run only these queued listeners (empty: all).
    pub only: Vec<String>,
    /// Serve `/metrics` and `/health` here.
    pub metrics_addr: Option<SocketAddr>,
    /// How long shutdown waits for handlers in flight.
    pub shutdown_timeout: Duration,
    /// CloudEvents sources whose events are applied. Default empty: the
    /// relay's default source for this database (`/outbox/<database>`), so
    /// events another database's relay left on the broker are set aside.
    pub accept_sources: Vec<String>,
    /// Run the webhook listeners (`webhook_fanout` for every CHOM event
    /// type, `webhook_delivery`) with these settings; `None` runs neither.
    /// Default: on, with [`WebhookConfig::default`] (https receivers on
    /// public addresses only), so an endpoint added with `outbox webhooks
    /// add` gets CHOM's events without the worker being reconfigured.
    ///
    /// [`WebhookConfig::default`]: outbox::webhooks::WebhookConfig
    pub webhooks: Option<outbox::webhooks::WebhookConfig>,
    /// [`WorkerConfig::quorum_initial_group_size`]. Default `None`: the
    /// broker's default.
    pub quorum_initial_group_size: Option<u32>,
}

impl Default for WorkConfig {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/chom".into(),
            amqp_url: outbox::DEFAULT_AMQP_URL.into(),
            exchange: outbox::DEFAULT_EXCHANGE.into(),
            app: APP.into(),
            listeners: ListenerConfig::default(),
            only: Vec::new(),
            metrics_addr: None,
            shutdown_timeout: Duration::from_secs(30),
            accept_sources: Vec::new(),
            webhooks: Some(outbox::webhooks::WebhookConfig::default()),
            quorum_initial_group_size: None,
        }
    }
}

/// CHOM's registry with only the listeners `only` names (all when empty).
pub fn registry(config: &WorkConfig) -> outbox::Result<Registry> {
    let mut registry = listeners::registry(&config.listeners)?;
    if let Some(webhooks) = &config.webhooks {
        registry = outbox::webhooks::register(registry, &crate::events::EVENT_TYPES, webhooks.clone())?;
    }
    if let Some(unknown) = config
        .only
        .iter()
        .find(|name| registry.queued_listener_named(name).is_none())
    {
        return Err(outbox::Error::Config(format!(
            "no queued listener named {unknown} (this worker has {})",
            registry
                .queued_listeners()
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let only = config.only.clone();
    Ok(registry.retain_queued(move |name| only.is_empty() || only.iter().any(|o| o == name)))
}

/// The worker of `config`, ready to run.
pub fn worker(config: &WorkConfig) -> outbox::Result<Worker> {
    Worker::new(
        WorkerConfig {
            database_url: config.database_url.clone(),
            amqp_url: config.amqp_url.clone(),
            exchange: config.exchange.clone(),
            app: config.app.clone(),
            shutdown_timeout: config.shutdown_timeout,
            quorum_initial_group_size: config.quorum_initial_group_size,
            accept_sources: if config.accept_sources.is_empty() {
                vec![outbox::relay::default_source(&config.database_url)]
            } else {
                config.accept_sources.clone()
            },
            ..WorkerConfig::default()
        },
        &registry(config)?,
    )
}

/// Runs the worker until `shutdown` resolves, serving `/metrics` and
/// `/health` if asked. Calls `on_listening` with the bound metrics address.
pub async fn run(
    config: WorkConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(Option<SocketAddr>),
) -> outbox::Result<()> {
    let worker = worker(&config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server = None;
    let mut bound = None;
    if let Some(addr) = config.metrics_addr {
        let handle = outbox::metrics::install_recorder()?;
        listeners::describe_metrics();
        let health: Arc<Health> = worker.health();
        let check: outbox::metrics::HealthCheck = Arc::new(move || {
            let body = format!(
                "{{\"broker\":{},\"database\":{}}}",
                health.broker_ok(),
                health.database_ok()
            );
            (health.is_healthy(), body)
        });
        let mut stop = stop_rx.clone();
        let (address, task) = outbox::metrics::serve(addr, handle, check, async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await?;
        bound = Some(address);
        server = Some(task);
    }
    on_listening(bound);
    let result = worker.run(shutdown).await;
    let _ = stop_tx.send(true);
    if let Some(task) = server {
        let _ = task.await;
    }
    result
}
