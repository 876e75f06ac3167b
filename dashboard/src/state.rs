//! What every handler shares: the database pool, the broker connection
//! (opened when first needed, opened again after it is lost) and the
//! settings (sessions live in Postgres: see `auth.rs`).

use std::sync::Arc;

use lapin::{Channel, Connection};
use tokio::sync::Mutex;

use crate::config::DashboardConfig;
use crate::error::{DashboardError, Result};

/// The shared state.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) config: DashboardConfig,
    pub(crate) pool: outbox::PgPool,
    broker: Mutex<Option<BrokerLink>>,
}

struct BrokerLink {
    connection: Arc<Connection>,
    /// In confirm mode, for retries.
    channel: Channel,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink").finish_non_exhaustive()
    }
}

impl AppState {
    pub(crate) fn new(config: DashboardConfig) -> Result<Self> {
        // Few connections: page reads are short; a bulk retry holds one.
        let pool = outbox::pool(&config.database_url, 4, std::time::Duration::from_secs(5))?;
        Ok(Self {
            config,
            pool,
            broker: Mutex::new(None),
        })
    }

    /// Runs diesel work on tokio's blocking pool.
    pub(crate) async fn db<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut diesel::PgConnection) -> outbox::Result<T> + Send + 'static,
    ) -> Result<T> {
        Ok(outbox::run_blocking(&self.pool, work).await?)
    }

    /// The broker connection and confirm channel, reconnecting when lost.
    pub(crate) async fn broker(&self) -> Result<(Arc<Connection>, Channel)> {
        let mut link = self.broker.lock().await;
        if let Some(existing) = link.as_ref()
            && existing.connection.status().connected()
            && existing.channel.status().connected()
        {
            return Ok((Arc::clone(&existing.connection), existing.channel.clone()));
        }
        let shown = outbox::redact_url(&self.config.amqp_url);
        let connection = outbox::amqp::connect(&self.config.amqp_url, "outbox dashboard")
            .await
            .map_err(|e| {
                DashboardError::Broker(format!("cannot reach {shown}: {}", outbox::error_chain(&e)))
            })?;
        let channel = outbox::amqp::open_channel(&connection, true)
            .await
            .map_err(|e| DashboardError::Broker(outbox::error_chain(&e)))?;
        let connection = Arc::new(connection);
        *link = Some(BrokerLink {
            connection: Arc::clone(&connection),
            channel: channel.clone(),
        });
        Ok((connection, channel))
    }

    /// Closes the broker connection (at shutdown).
    pub(crate) async fn close(&self) {
        if let Some(link) = self.broker.lock().await.take() {
            let _ = link.connection.close(200, "dashboard stopping".into()).await;
        }
    }
}
