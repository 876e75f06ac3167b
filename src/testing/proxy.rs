//! A TCP proxy in front of a server that can cut every connection and
//! refuse new ones on demand: connection loss for one client without
//! restarting the shared broker or database.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

use crate::error::{Error, Result};

#[derive(Default)]
struct ProxyState {
    refusing: bool,
    links: Vec<JoinHandle<()>>,
}

/// Forwards `127.0.0.1:<port>` to an upstream address.
pub struct TcpProxy {
    /// The local port clients connect to.
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TcpProxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Config(format!("proxy cannot listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("proxy address: {e}")))?
            .port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let upstream = upstream.to_owned();
        let accept_state = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = accept_state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.refusing {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                state.links.retain(|link| !link.is_finished());
                state.links.push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Ok(Self { port, state, accept })
    }

    /// Drops every open connection; with `refuse`, new ones are closed at
    /// once until [`TcpProxy::heal`].
    pub fn cut(&self, refuse: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.refusing = refuse;
        for link in state.links.drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).refusing = false;
    }

    /// An AMQP URL (guest/guest, vhost `/`) through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut(true);
    }
}
